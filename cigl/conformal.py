"""Split conformal prediction sets (numpy only): "the true class is in this set 1 - alpha of the time".

Calibrate on n held-out labelled samples, then for a new input return every class whose
nonconformity score is at most the calibrated threshold q. For exchangeable data the set
contains the true class with probability at least 1 - alpha, and (with continuous, untied
scores) at most 1 - alpha + 1 / (n + 1) (Vovk et al. 2005; Angelopoulos & Bates 2021).

Scores s(x, y), from the probabilities p = softmax(logits / T) the model serves:

    lac   s = 1 - p_y                                   (Sadinle et al. 2019; "THR")
    aps   s = sum of p_j over classes ranked above y + u * p_y          (Romano et al. 2020)
    raps  s = aps + lam * max(0, rank(y) - k_reg)                        (Angelopoulos et al. 2021)

with u ~ Uniform(0, 1) drawn independently per sample: APS and RAPS are randomised, as the
papers define them; without u they include the whole last class and give much larger sets.
Use temperature-scaled probabilities (RAPS's own recommendation): the served ones are.

Threshold: q = the ceil((n + 1)(1 - alpha))-th smallest calibration score. That needs
n >= (1 - alpha) / alpha samples (99 for alpha = 0.01); with fewer the only valid set is every
class, and `calibrate` refuses.
"""

from __future__ import annotations

import math

import numpy as np

from cigl.calibration import validate, validate_scores
from cigl.errors import InputError

METHODS = ("lac", "aps", "raps")
DEFAULT_ALPHAS = (0.1, 0.05, 0.01)
RAPS_LAMBDA, RAPS_K_REG = 0.01, 5


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"conformal method must be one of {', '.join(METHODS)}, got {method!r}")


def _check(probs: np.ndarray, method: str) -> np.ndarray:
    """Probabilities as float64 (N, K) (finite, in [0, 1], rows summing to 1: cigl.calibration)."""
    _check_method(method)
    return validate_scores(np.asarray(probs), "probs").astype(np.float64, copy=False)


def _uniforms(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def class_scores(probs: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(N, K) nonconformity score of every class of every sample (one u per sample)."""
    return _scores(_check(probs, method), method, seed)


def _scores(probs: np.ndarray, method: str, seed: int) -> np.ndarray:
    """class_scores of probabilities already checked (`_check`)."""
    if method == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    above = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the classes ranked above each
    u = _uniforms(probs.shape[0], seed)[:, None]
    scores_sorted = above + u * sorted_p
    if method == "raps":
        rank = np.arange(1, probs.shape[1] + 1)[None, :]
        scores_sorted = scores_sorted + RAPS_LAMBDA * np.maximum(0, rank - RAPS_K_REG)
    scores = np.empty_like(scores_sorted)
    np.put_along_axis(scores, order, scores_sorted, axis=1)
    return scores


def min_samples(alpha: float) -> int:
    """Fewest calibration samples for which a finite threshold exists at `alpha`."""
    return math.ceil((1 - alpha) / alpha - 1e-9)


def calibrate(probs, labels, alphas=DEFAULT_ALPHAS, method: str = "aps", seed: int = 0) -> dict[float, float]:
    """alpha -> threshold q from labelled calibration data (see the module docstring)."""
    _check_method(method)
    probs, labels = validate(np.asarray(probs), labels, "probs")
    probs = probs.astype(np.float64, copy=False)
    n = labels.size
    scores = np.sort(np.take_along_axis(_scores(probs, method, seed), labels[:, None], axis=1)[:, 0])
    thresholds = {}
    for alpha in alphas:
        if not 0 < alpha < 1:
            raise InputError(f"alpha must lie in (0, 1), got {alpha}")
        rank = math.ceil((n + 1) * (1 - alpha))
        if rank > n:
            raise InputError(
                f"alpha {alpha:g} needs at least {min_samples(alpha)} calibration samples, got {n}; "
                "use a larger alpha or more held-out data"
            )
        thresholds[float(alpha)] = float(scores[rank - 1])
    return thresholds


def prediction_sets(probs, threshold: float, method: str = "aps", seed: int = 0, nonempty: bool = True) -> np.ndarray:
    """(N, K) boolean: class k is in sample i's set when its score is <= threshold. With
    `nonempty` the top class is always included (an empty set says nothing a user can act on;
    it only raises coverage, so the 1 - alpha guarantee stands, the upper bound does not)."""
    probs = _check(probs, method)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise InputError(f"threshold must be a finite number (from calibrate), got {threshold!r}")
    sets = _scores(probs, method, seed) <= threshold
    if nonempty:
        sets[np.arange(probs.shape[0]), probs.argmax(axis=1)] = True
    return sets


def coverage(sets: np.ndarray, labels) -> float:
    """Share of samples whose set holds the true class."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(sets[np.arange(labels.size), labels].mean())


def class_coverage(sets: np.ndarray, labels, n_classes: int) -> list[float | None]:
    """Coverage among the samples of each class (None for a class with no samples)."""
    labels = np.asarray(labels, dtype=np.int64)
    hit = sets[np.arange(labels.size), labels]
    return [float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(n_classes)]


def set_size_summary(sets: np.ndarray) -> dict:
    """Mean set size and its distribution (share of samples with a set of each size)."""
    sizes = sets.sum(axis=1)
    counts = np.bincount(sizes, minlength=sets.shape[1] + 1)
    return {
        "mean_size": float(sizes.mean()),
        "size_distribution": {int(k): float(c / sizes.size) for k, c in enumerate(counts) if c},
    }
