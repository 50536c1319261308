"""Selective prediction (numpy; scipy for the binomial bound): answer only when confident.

A threshold t accepts the predictions whose confidence (the top served probability) is >= t.
Coverage is the share accepted, selective risk the error rate among them. The risk-coverage
curve sweeps t over all confidences; AURC is the area under it (mean selective risk over
coverages, Geifman et al. 2019), and excess AURC subtracts the AURC an oracle ordering of the
same predictions (all errors rejected first) would reach.

`risk_threshold` picks t on held-out data so that, with probability >= 1 - delta over that
data, the selective risk at t stays <= the target R: SGR, the selection-with-guaranteed-risk
algorithm of Geifman & El-Yaniv (NeurIPS 2017). A binary search over the sorted held-out
confidences tests k = ceil(log2 n) thresholds, each with the Clopper-Pearson upper bound of its
risk at level delta / k (a union bound over the tested thresholds), moving down while the
bound holds; the lowest threshold whose bound held is returned.
"""

from __future__ import annotations

import math

import numpy as np

from cigl.errors import InputError


def _check(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if confidence.ndim != 1 or confidence.shape != correct.shape:
        raise InputError(f"need equal-length 1-D confidence and correctness, got {confidence.shape}, {correct.shape}")
    if confidence.size == 0:
        raise InputError("empty input: no samples to evaluate")
    return confidence, correct


def risk_coverage_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk) after accepting the k most confident samples, k = 1..N
    (ties broken by the order given)."""
    confidence, correct = _check(confidence, correct)
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, confidence.size + 1)
    return k / confidence.size, errors / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: the mean of the selective risks at k = 1..N."""
    return float(risk_coverage_curve(confidence, correct)[1].mean())


def excess_aurc(confidence, correct) -> float:
    """AURC minus the AURC of the best possible ordering of the same predictions."""
    _, correct = _check(confidence, correct)
    return aurc(confidence, correct) - aurc(correct.astype(np.float64), correct)


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """One-sided (1 - delta) upper confidence bound on a binomial rate with `errors` in `n` trials."""
    from scipy.stats import beta

    errors, n = np.asarray(errors, dtype=np.float64), np.asarray(n, dtype=np.float64)
    bound = beta.ppf(1 - delta, errors + 1, n - errors)
    return np.where(errors >= n, 1.0, bound)


def risk_threshold(confidence, correct, target_risk: float, delta: float = 0.1) -> dict:
    """The lowest confidence threshold whose selective risk SGR certifies <= target_risk (module
    docstring). Returns the threshold, the held-out coverage and risk at it and the risk's upper
    bound; threshold None when no tested threshold could be certified on this data."""
    confidence, correct = _check(confidence, correct)
    if not 0 < target_risk < 1 or not 0 < delta < 1:
        raise InputError(f"need 0 < target risk < 1 and 0 < delta < 1, got {target_risk}, {delta}")
    sorted_conf = np.sort(confidence)
    steps = max(1, math.ceil(math.log2(confidence.size)))
    low, high = 0, confidence.size - 1  # indices into sorted_conf
    result = {"target_risk": target_risk, "delta": delta, "threshold": None, "coverage": 0.0, "risk": None}
    for _ in range(steps):
        mid = math.ceil((low + high) / 2)
        accepted = confidence >= sorted_conf[mid]
        n, errors = int(accepted.sum()), int((accepted & ~correct).sum())
        bound = float(clopper_pearson_upper(np.array([errors]), np.array([n]), delta / steps)[0])
        if bound <= target_risk:
            high = mid
            result |= {
                "threshold": float(sorted_conf[mid]),
                "coverage": n / confidence.size,
                "risk": errors / n,
                "risk_upper_bound": bound,
            }
        else:
            low = mid
    return result


def selective_metrics(confidence, correct, threshold: float | None) -> dict:
    """Coverage and selective risk of `threshold` on labelled data (threshold None: all rejected)."""
    confidence, correct = _check(confidence, correct)
    accepted = confidence >= threshold if threshold is not None else np.zeros_like(correct)
    n = int(accepted.sum())
    return {"coverage": n / confidence.size, "risk": float((~correct[accepted]).mean()) if n else None}
