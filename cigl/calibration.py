"""Calibration metrics as pure numpy functions (no torch).

Every metric takes `scores` of shape (N, K) and integer `labels` of shape (N,), and says
explicitly whether the scores are `kind="logits"` or `kind="probs"`; nothing is guessed from
the values. Inputs are validated first (InputError naming the problem), then computed with
vectorised numpy. Notation: p_i is the predicted distribution of sample i, conf_i = max_k p_ik
its confidence, pred_i = argmax_k p_ik, and c_i = [pred_i == y_i].

Binning: "uniform" bins are [e_b, e_{b+1}) with e_b = b / B; a confidence of
exactly 1.0 belongs to the last bin. "adaptive" bins hold equal numbers of samples
(confidences ranked, ties in input order, then split into B consecutive groups whose sizes
differ by at most one, the larger ones first).

    ECE   = sum_b n_b/N * |acc_b - conf_b|          (Guo et al., 2017)
    MCE   = max_b |acc_b - conf_b| over non-empty bins
    RMSCE = sqrt(sum_b n_b/N * (acc_b - conf_b)^2)
    classwise ECE = 1/K sum_k sum_b n_kb/N * |freq_kb - mean p_k over bin kb|
                    (bins over p_ik for every class k, freq = share of y == k)
    NLL   = -1/N sum_i log p_{i,y_i}
    Brier = 1/N sum_i sum_k (p_ik - [k == y_i])^2
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cigl.errors import InputError, is_int_in

KINDS = ("logits", "probs")
SCHEMES = ("uniform", "adaptive")
MAX_BINS = 10_000  # bins are per-sample work: a bound keeps a typo from costing minutes and gigabytes
BOOTSTRAP_METRICS = ("ece", "adaptive_ece", "mce", "rmsce", "accuracy", "nll", "brier")
_PROB_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- validation


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"kind must be 'logits' or 'probs', got {kind!r}")


def _check_bins(n_bins: int, scheme: str = "uniform") -> None:
    if not is_int_in(n_bins, 1, MAX_BINS):
        raise InputError(f"n_bins must be an integer >= 1 and <= {MAX_BINS}, got {n_bins!r}")
    if scheme not in SCHEMES:
        raise InputError(f"scheme must be 'uniform' or 'adaptive', got {scheme!r}")


def validate(scores, labels, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores as float32/float64 (N, K), labels as int64 (N,)) or raise InputError."""
    _check_kind(kind)
    scores = validate_scores(np.asarray(scores), kind)
    n, k = scores.shape
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise InputError(f"shape mismatch: {n} rows of {kind} but labels have shape {labels.shape}")
    if labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.min() < 0 or labels.max() >= k:
        raise InputError(f"labels out of range: expected 0..{k - 1}, got {labels.min()}..{labels.max()}")
    return scores, labels


def validate_scores(scores: np.ndarray, kind: str) -> np.ndarray:
    """A finite real (N, K) array with N >= 1 and K >= 2; probabilities in [0, 1] summing to 1."""
    if scores.ndim != 2:
        raise InputError(f"{kind} must be a 2-D array (samples, classes), got shape {scores.shape}")
    n, k = scores.shape
    if n == 0:
        raise InputError("empty input: no samples to evaluate")
    if k < 2:
        raise InputError(f"{kind} need at least 2 classes, got {k}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise InputError(f"{kind} must be real numbers, got dtype {scores.dtype}")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise InputError(f"{kind} contain NaN or Inf values")
    if kind == "probs":
        if scores.min() < 0 or scores.max() > 1:
            raise InputError("probs must lie in [0, 1]; pass kind='logits' for raw model outputs")
        worst = np.abs(scores.sum(axis=1, dtype=np.float64) - 1.0).max()
        if worst > _PROB_SUM_TOL:
            raise InputError(
                f"probs do not sum to 1 (largest deviation {worst:.3g}); "
                "pass kind='logits' for raw model outputs or normalise the rows"
            )
    return scores


# --------------------------------------------------------------------------- transforms


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (numerically stable)."""
    z = np.asarray(logits) / temperature
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def to_probs(scores: np.ndarray, kind: str) -> np.ndarray:
    """Probabilities from validated scores."""
    return softmax(scores) if kind == "logits" else scores


@dataclass(frozen=True)
class _PerSample:
    conf: np.ndarray  # max_k p_ik
    correct: np.ndarray  # pred_i == y_i
    log_p_true: np.ndarray | None = None  # log p_{i, y_i}
    brier: np.ndarray | None = None  # sum_k (p_ik - [k == y_i])^2


def _per_sample(scores: np.ndarray, labels: np.ndarray, kind: str, losses: bool = True) -> _PerSample:
    """The per-sample quantities of the metrics (with `losses`, also NLL and Brier terms), in
    one pass over a class-major copy of the scores: reductions over a short class axis are
    several times faster that way."""
    z = np.ascontiguousarray(scores.T)  # (K, N), our own copy
    cols = np.arange(z.shape[1])
    top = z.max(axis=0)
    z_true = z[labels, cols]
    # correct = (argmax == label), with argmax's first-maximum rule for ties
    correct = z_true == top
    tied = np.flatnonzero(correct & (np.add.reduce(z == top, axis=0, dtype=np.int8) > 1))
    correct[tied] = z[:, tied].argmax(axis=0) == labels[tied]
    if kind == "probs":
        if not losses:
            return _PerSample(top.astype(np.float64), correct)
        p_true = z_true.astype(np.float64)
        eps = np.finfo(scores.dtype).eps
        sq = np.einsum("kn,kn->n", z, z, dtype=np.float64)
        return _PerSample(
            top.astype(np.float64), correct, np.log(np.clip(p_true, eps, 1 - eps)), sq - 2.0 * p_true + 1.0
        )
    z -= top
    np.exp(z, out=z)
    total = z.sum(axis=0, dtype=np.float64)  # sum_k exp(z_k - max z) = 1 / confidence
    if not losses:
        return _PerSample(1.0 / total, correct)
    log_p_true = z_true.astype(np.float64) - top - np.log(total)
    sq = np.einsum("kn,kn->n", z, z, dtype=np.float64) / total**2
    return _PerSample(1.0 / total, correct, log_p_true, sq - 2.0 * np.exp(log_p_true) + 1.0)


# --------------------------------------------------------------------------- binning


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (empty bins have count 0 and NaN means)."""

    edges: np.ndarray  # (B + 1,) bin edges; adaptive: min, the confidences at the split ranks, max
    count: np.ndarray  # (B,) samples per bin
    confidence: np.ndarray  # (B,) mean confidence
    accuracy: np.ndarray  # (B,) share correct

    @property
    def weight(self) -> np.ndarray:
        return self.count / self.count.sum()

    @property
    def gap(self) -> np.ndarray:
        """|accuracy - confidence| per bin, 0 for empty bins."""
        return np.nan_to_num(np.abs(self.accuracy - self.confidence))


def _uniform_edges(n_bins: int) -> np.ndarray:
    """Edges b / B, each the double nearest to the exact fraction (linspace is off by an ulp)."""
    return np.arange(n_bins + 1) / n_bins


def _uniform_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b with e_b <= conf < e_{b+1} (conf == 1 in the last bin): floor(conf * B), then
    moved by one where rounding put a value next to an edge on the wrong side."""
    edges = _uniform_edges(n_bins)
    index = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    index -= conf < edges[index]
    index += (conf >= edges[index + 1]) & (index < n_bins - 1)
    return index


def _adaptive_index(conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of each sample, bin edges) when samples are ranked by confidence (ties in input
    order) and the ranks split into n_bins groups as np.array_split does. Uses a partition
    (O(N)), not a sort: a sample's bin is the number of boundary values below its confidence,
    and only samples equal to a boundary value need their exact rank."""
    n = conf.shape[0]
    sizes = np.full(n_bins, n // n_bins)
    sizes[: n % n_bins] += 1  # the first n % B bins hold one sample more
    bounds = np.cumsum(sizes)[:-1]  # first rank of bins 1..B-1
    inside = bounds[bounds < n]  # with fewer samples than bins the last bins stay empty
    parted = np.partition(conf, [0, *inside, n - 1])
    values = np.concatenate([parted[inside], np.full(bounds.size - inside.size, np.inf)])
    index = np.searchsorted(values, conf, side="left")
    for v in np.unique(values):
        tied = np.flatnonzero(conf == v)
        first = bounds[np.searchsorted(values, v)] if tied.size == 1 else np.count_nonzero(conf < v)
        index[tied] = np.searchsorted(bounds, first + np.arange(tied.size), side="right")
    return index, np.concatenate([parted[:1], np.minimum(values, parted[-1]), parted[-1:]])


def _bin_stats(conf: np.ndarray, correct: np.ndarray, index: np.ndarray, n_bins: int):
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, conf_sum / count, acc_sum / count


def _bins(conf: np.ndarray, correct: np.ndarray, n_bins: int, scheme: str) -> ReliabilityBins:
    if scheme == "uniform":
        index = _uniform_index(conf, n_bins)
        edges = _uniform_edges(n_bins)
    else:
        index, edges = _adaptive_index(conf, n_bins)
    count, mean_conf, acc = _bin_stats(conf, correct.astype(np.float64), index, n_bins)
    return ReliabilityBins(edges=edges, count=count, confidence=mean_conf, accuracy=acc)


def _ece(b: ReliabilityBins) -> float:
    return float((b.weight * b.gap).sum())


def _mce(b: ReliabilityBins) -> float:
    return float(b.gap[b.count > 0].max())


def _rmsce(b: ReliabilityBins) -> float:
    return float(np.sqrt((b.weight * b.gap**2).sum()))


def _prepared(scores, labels, kind, n_bins, scheme="uniform"):
    _check_bins(n_bins, scheme)
    scores, labels = validate(scores, labels, kind)
    ps = _per_sample(scores, labels, kind, losses=False)
    return ps.conf, ps.correct


# --------------------------------------------------------------------------- public metrics


def reliability_bins(scores, labels, *, kind: str, n_bins: int = 10, scheme: str = "uniform") -> ReliabilityBins:
    """Reliability-diagram data: per bin the count, mean confidence and accuracy."""
    conf, correct = _prepared(scores, labels, kind, n_bins, scheme)
    return _bins(conf, correct, n_bins, scheme)


def ece(scores, labels, *, kind: str, n_bins: int = 10) -> float:
    """Top-label expected calibration error with equal-width bins."""
    return _ece(reliability_bins(scores, labels, kind=kind, n_bins=n_bins))


def adaptive_ece(scores, labels, *, kind: str, n_bins: int = 10) -> float:
    """Top-label ECE with equal-mass bins (Nixon et al., 2019)."""
    return _ece(reliability_bins(scores, labels, kind=kind, n_bins=n_bins, scheme="adaptive"))


def mce(scores, labels, *, kind: str, n_bins: int = 10, scheme: str = "uniform") -> float:
    """Maximum calibration error: the largest bin gap."""
    return _mce(reliability_bins(scores, labels, kind=kind, n_bins=n_bins, scheme=scheme))


def rms_calibration_error(scores, labels, *, kind: str, n_bins: int = 10, scheme: str = "uniform") -> float:
    """Root-mean-square calibration error (bin gaps weighted by bin mass)."""
    return _rmsce(reliability_bins(scores, labels, kind=kind, n_bins=n_bins, scheme=scheme))


def classwise_ece(scores, labels, *, kind: str, n_bins: int = 10) -> float:
    """Classwise ECE (Kull et al., 2019): the uniform-bin ECE of every class's probability, averaged."""
    _check_bins(n_bins)
    scores, labels = validate(scores, labels, kind)
    probs = to_probs(scores, kind).astype(np.float64, copy=False)
    n, k = probs.shape
    index = _uniform_index(probs.ravel(), n_bins) + np.tile(np.arange(k) * n_bins, n)
    hits = (labels[:, None] == np.arange(k)[None, :]).ravel().astype(np.float64)
    p_sum = np.bincount(index, weights=probs.ravel(), minlength=k * n_bins)
    hit_sum = np.bincount(index, weights=hits, minlength=k * n_bins)
    return float(np.abs(hit_sum - p_sum).sum() / (n * k))


def nll(scores, labels, *, kind: str) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    scores, labels = validate(scores, labels, kind)
    return float(-_per_sample(scores, labels, kind).log_p_true.mean())


def brier(scores, labels, *, kind: str) -> float:
    """Multiclass Brier score: mean squared distance between p and the one-hot label."""
    scores, labels = validate(scores, labels, kind)
    return float(_per_sample(scores, labels, kind).brier.mean())


def accuracy(scores, labels, *, kind: str) -> float:
    """Share of samples whose highest score is the true class."""
    scores, labels = validate(scores, labels, kind)
    return float((scores.argmax(axis=1) == labels).mean())


def summary(scores, labels, *, kind: str, n_bins: int = 10) -> dict[str, float]:
    """The audit metric set in one pass (one softmax): accuracy, ECE, adaptive ECE, MCE,
    RMSCE, NLL, Brier and mean confidence."""
    _check_bins(n_bins)
    scores, labels = validate(scores, labels, kind)
    ps = _per_sample(scores, labels, kind)
    uniform = _bins(ps.conf, ps.correct, n_bins, "uniform")
    return {
        "n": int(labels.shape[0]),
        "accuracy": float(ps.correct.mean()),
        "ece": _ece(uniform),
        "adaptive_ece": _ece(_bins(ps.conf, ps.correct, n_bins, "adaptive")),
        "mce": _mce(uniform),
        "rmsce": _rmsce(uniform),
        "nll": float(-ps.log_p_true.mean()),
        "brier": float(ps.brier.mean()),
        "mean_confidence": float(ps.conf.mean()),
    }


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    scores,
    labels,
    *,
    kind: str,
    metric: str = "ece",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric (samples drawn with replacement,
    `n_boot` replicates from a seeded generator, so the same seed gives the same interval)."""
    values = _bootstrap_values(scores, labels, kind, metric, n_boot, level, seed, n_bins)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def debiased_ece(
    scores, labels, *, kind: str, n_boot: int = 1000, level: float = 0.95, seed: int = 0, n_bins: int = 10
) -> tuple[float, float, float]:
    """(bias-corrected ECE, lower, upper): the binned ECE overestimates the true calibration
    error (noise in each bin's accuracy only adds to |accuracy - confidence|), by about the
    amount a bootstrap replicate overestimates the sample's own ECE. So

        ECE_bc = ECE - (mean_b ECE_b - ECE) = 2 ECE - mean_b ECE_b

    and the interval is the basic (reverse-percentile) bootstrap interval
    [2 ECE - q_hi, 2 ECE - q_lo], which is centred on the corrected estimate, unlike the
    percentile interval of a biased statistic (it can lie wholly above a small plug-in ECE).
    All three are clipped at 0 (Efron & Tibshirani 1993, ch. 10 and 13)."""
    plug_in = ece(scores, labels, kind=kind, n_bins=n_bins)
    values = _bootstrap_values(scores, labels, kind, "ece", n_boot, level, seed, n_bins)
    alpha = (1.0 - level) / 2.0
    q_lo, q_hi = np.quantile(values, [alpha, 1.0 - alpha])
    clip = lambda v: float(max(0.0, v))  # noqa: E731
    return clip(2 * plug_in - values.mean()), clip(2 * plug_in - q_hi), clip(2 * plug_in - q_lo)


def _bootstrap_values(scores, labels, kind, metric, n_boot, level, seed, n_bins) -> np.ndarray:
    """The metric on `n_boot` resamples (with replacement) of the samples."""
    if metric not in BOOTSTRAP_METRICS:
        raise InputError(f"metric must be one of {', '.join(BOOTSTRAP_METRICS)}, got {metric!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level!r}")
    _check_bins(n_bins)
    scores, labels = validate(scores, labels, kind)
    ps = _per_sample(scores, labels, kind)
    conf, correct = ps.conf, ps.correct
    per_sample = {"accuracy": correct.astype(np.float64), "nll": -ps.log_p_true, "brier": ps.brier}
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    values = np.empty(n_boot)
    if metric in per_sample:
        x = per_sample[metric]
        for start in range(0, n_boot, 64):
            idx = rng.integers(0, n, size=(min(64, n_boot - start), n))
            values[start : start + idx.shape[0]] = x[idx].mean(axis=1)
    else:
        scheme = "adaptive" if metric == "adaptive_ece" else "uniform"
        reduce = {"ece": _ece, "adaptive_ece": _ece, "mce": _mce, "rmsce": _rmsce}[metric]
        for i in range(n_boot):
            idx = rng.integers(0, n, size=n)
            values[i] = reduce(_bins(conf[idx], correct[idx], n_bins, scheme))
    return values


# --------------------------------------------------------------------------- temperature


def fit_temperature(scores, labels, *, kind: str = "logits", t_min: float = 0.01, t_max: float = 100.0) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    NLL is convex in beta = 1/T, so Newton's method on beta, kept inside [1/t_max, 1/t_min]
    by bisection, finds the global minimum. Probabilities are turned into logits by log.
    """
    scores, labels = validate(scores, labels, kind)
    z = scores.astype(np.float64)
    if kind == "probs":
        z = np.log(np.clip(z, 1e-300, None))
    z_true = np.take_along_axis(z, labels[:, None], axis=1)[:, 0]
    lo, hi = 1.0 / t_max, 1.0 / t_min

    def derivatives(beta: float) -> tuple[float, float]:
        p = softmax(z * beta)
        mean_z = (p * z).sum(axis=1)
        grad = float((mean_z - z_true).mean())
        curv = float(((p * z * z).sum(axis=1) - mean_z**2).mean())
        return grad, curv

    beta = 1.0
    for _ in range(100):
        grad, curv = derivatives(beta)
        if abs(grad) < 1e-10:
            break
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / curv if curv > 1e-12 else np.nan
        beta = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-12 * hi:
            break
    temperature = float(1.0 / np.clip(beta, 1.0 / t_max, 1.0 / t_min))
    if temperature >= t_max * (1 - 1e-6) or temperature <= t_min * (1 + 1e-6):
        warnings.warn(
            f"the fitted temperature reached its bound {temperature:g} (allowed {t_min:g}..{t_max:g}) and is "
            "clamped there: the scores carry almost no information about these labels",
            RuntimeWarning,
            stacklevel=2,
        )
    return temperature
