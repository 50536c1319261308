"""What confidence-audit measures beyond the calibration metrics, on the probabilities a model
serves (numpy only): per-class accuracy and ECE, the confusion matrix, conformal coverage and
set sizes, selective prediction (risk-coverage, AURC, a certified abstain threshold), and
in-distribution vs out-of-distribution separation.
"""

from __future__ import annotations

import numpy as np

from cigl import calibration as cal
from cigl import conformal, selective

CURVE_POINTS = 200  # risk-coverage points kept in report.json
MAX_CONFUSION_CLASSES = 50


def served_metrics(probs: np.ndarray, labels: np.ndarray, *, n_bins: int, n_boot: int, seed: int) -> dict:
    """Accuracy, NLL, Brier and ECE of served probabilities, with the bias-corrected ECE and its
    basic bootstrap interval (cigl.calibration.debiased_ece) when n_boot > 0."""
    s = cal.summary(probs, labels, kind="probs", n_bins=n_bins)
    out = {"n": int(labels.size)} | {k: s[k] for k in ("accuracy", "nll", "brier", "ece", "mean_confidence")}
    if n_boot:
        est, lo, hi = cal.debiased_ece(probs, labels, kind="probs", n_boot=n_boot, seed=seed, n_bins=n_bins)
        out |= {"ece_debiased": est, "ece_ci": [lo, hi]}
    return out


def per_class(probs: np.ndarray, labels: np.ndarray, classes: list[str], n_bins: int) -> list[dict]:
    """Per true class: samples, accuracy and ECE (of the samples of that class; None if too few)."""
    rows = []
    for k, name in enumerate(classes):
        mine = labels == k
        n = int(mine.sum())
        row = {"class": name, "n": n, "accuracy": None, "ece": None}
        if n:
            row["accuracy"] = float((probs[mine].argmax(axis=1) == k).mean())
            row["ece"] = cal.ece(probs[mine], labels[mine], kind="probs", n_bins=n_bins)
        rows.append(row)
    return rows


def confusion(probs: np.ndarray, labels: np.ndarray) -> list[list[int]] | None:
    """counts[true][predicted]; None above MAX_CONFUSION_CLASSES classes (unreadable)."""
    k = probs.shape[1]
    if k > MAX_CONFUSION_CLASSES:
        return None
    return np.bincount(labels * k + probs.argmax(axis=1), minlength=k * k).reshape(k, k).tolist()


def conformal_report(
    probs: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    alphas: list[float],
    method: str,
    card: tuple[str, dict[float, float]] | None,
) -> dict:
    """Coverage, set sizes and class-conditional coverage. The thresholds are the model card's
    (as served; measured on every sample) when it has them, else calibrated on the fit split
    and measured on the report split."""
    fit, report = split
    if card is not None:
        method, thresholds = card
        source, report = "model card", np.arange(labels.size)
    else:
        usable = [a for a in alphas if fit.size >= conformal.min_samples(a)]
        thresholds = conformal.calibrate(probs[fit], labels[fit], usable, method) if usable else {}
        source = f"fit split ({fit.size} samples)"
    per_alpha = {}
    for alpha, q in sorted(thresholds.items(), reverse=True):
        sets = conformal.prediction_sets(probs[report], q, method, seed=1)
        per_alpha[f"{alpha:g}"] = {
            "threshold": q,
            "coverage": conformal.coverage(sets, labels[report]),
            **conformal.set_size_summary(sets),
            "class_coverage": conformal.class_coverage(sets, labels[report], probs.shape[1]),
        }
    return {"method": method, "source": source, "n": int(report.size), "alphas": per_alpha}


def selective_report(
    probs: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    target_risk: float | None,
    card_threshold: float,
) -> dict:
    """Risk-coverage curve, AURC and excess AURC on all samples; the abstain threshold (chosen
    for --target-risk on the fit split, else the card's) with its realised risk and coverage on
    the report split."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    cov, risk = selective.risk_coverage_curve(conf, correct)
    keep = np.unique(np.linspace(0, cov.size - 1, min(CURVE_POINTS, cov.size)).round().astype(int))
    out = {
        "aurc": selective.aurc(conf, correct),
        "excess_aurc": selective.excess_aurc(conf, correct),
        "curve": {"coverage": cov[keep].tolist(), "risk": risk[keep].tolist()},
    }
    fit, report = split
    if target_risk is not None:
        chosen = selective.risk_threshold(conf[fit], correct[fit], target_risk)
        threshold, source = chosen["threshold"], f"fit split, target risk {target_risk:g}"
    elif card_threshold > 0:
        threshold, source, report = card_threshold, "model card", np.arange(labels.size)
    else:
        return out
    realised = selective.selective_metrics(conf[report], correct[report], threshold)
    return out | {"threshold": {"value": threshold, "source": source, **realised}}


def ood_report(id_confidence: np.ndarray, ood_confidence: np.ndarray) -> dict:
    """How well the served confidence tells in-distribution (positive) from OOD inputs: AUROC
    (ties count half) and the false-positive rate at 95% true-positive rate."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[id_confidence, ood_confidence])  # Mann-Whitney U with average ranks
    n_id, n_ood = id_confidence.size, ood_confidence.size
    auroc = (ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * n_ood)
    cut = np.quantile(id_confidence, 0.05)  # 95% of in-distribution inputs score >= cut
    return {"auroc": float(auroc), "fpr_at_95_tpr": float((ood_confidence >= cut).mean()), "n_ood": int(n_ood)}
