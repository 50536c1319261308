"""cigl.calibration against independent implementations (torchmetrics, netcal, scikit-learn)
and against the properties the metrics must have."""

import numpy as np
import pytest
import torch
from netcal.metrics import ECE as NetcalECE
from netcal.metrics import MCE as NetcalMCE
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from cigl import calibration as cal
from cigl.errors import InputError


def random_predictions(n=5000, k=10, seed=0, sharp=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * sharp
    labels = rng.integers(0, k, size=n)
    return logits, labels


@pytest.fixture(scope="module")
def digits_predictions():
    """Real predictions: a logistic regression on scikit-learn's digits, evaluated on held-out rows.
    (Regularised so no confidence is within float32 rounding of 1: torchmetrics computes in
    float32 and puts a confidence of exactly 1.0 into an extra bin of its own.)"""
    d = load_digits()
    clf = LogisticRegression(C=0.01, max_iter=500).fit(d.data[:1000], d.target[:1000])
    return clf.predict_proba(d.data[1000:]), d.target[1000:]


def _torchmetrics(probs, labels, norm):
    return float(
        multiclass_calibration_error(
            torch.from_numpy(probs),
            torch.from_numpy(labels),
            num_classes=probs.shape[1],
            n_bins=10,
            norm=norm,
        )
    )


@pytest.mark.parametrize("source", ["random", "digits"])
def test_top_label_metrics_match_torchmetrics_and_netcal(source, digits_predictions):
    if source == "random":
        logits, labels = random_predictions()
        probs = cal.softmax(logits)
    else:
        probs, labels = digits_predictions
        logits = np.log(probs)
    assert not np.any(probs.astype(np.float32).max(1) == 1.0)
    ours = cal.ece(probs, labels, kind="probs")
    assert ours == pytest.approx(_torchmetrics(probs, labels, "l1"), abs=1e-6)
    assert ours == pytest.approx(NetcalECE(bins=10).measure(probs, labels), abs=1e-6)
    assert cal.ece(logits, labels, kind="logits") == pytest.approx(ours, abs=1e-6)
    assert cal.mce(probs, labels, kind="probs") == pytest.approx(_torchmetrics(probs, labels, "max"), abs=1e-6)
    assert cal.mce(probs, labels, kind="probs") == pytest.approx(NetcalMCE(bins=10).measure(probs, labels), abs=1e-6)
    assert cal.rms_calibration_error(probs, labels, kind="probs") == pytest.approx(
        _torchmetrics(probs, labels, "l2"), abs=1e-6
    )


@pytest.mark.parametrize("source", ["random", "digits"])
def test_nll_brier_accuracy_match_scikit_learn(source, digits_predictions):
    if source == "random":
        logits, labels = random_predictions(sharp=1.0)
        probs = cal.softmax(logits)
    else:
        probs, labels = digits_predictions
        logits = np.log(probs)
    k = probs.shape[1]
    assert cal.nll(probs, labels, kind="probs") == pytest.approx(log_loss(labels, probs, labels=range(k)), abs=1e-6)
    assert cal.nll(logits, labels, kind="logits") == pytest.approx(log_loss(labels, probs, labels=range(k)), abs=1e-6)
    assert cal.brier(probs, labels, kind="probs") == pytest.approx(
        brier_score_loss(labels, probs, labels=range(k)), abs=1e-6
    )
    assert cal.accuracy(logits, labels, kind="logits") == pytest.approx(np.mean(probs.argmax(1) == labels))


def _adaptive_reference(probs, labels, n_bins):
    """Textbook equal-mass ECE: sort by confidence, split into n_bins consecutive groups."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for group in np.array_split(order, n_bins):
        if len(group) == 0:
            continue
        total += len(group) / len(conf) * abs(correct[group].mean() - conf[group].mean())
    return total


def _classwise_reference(probs, labels, n_bins):
    edges = np.arange(n_bins + 1) / n_bins
    out = []
    for k in range(probs.shape[1]):
        p, hit = probs[:, k], labels == k
        e = 0.0
        for b in range(n_bins):
            upper = p < edges[b + 1] if b < n_bins - 1 else p <= 1.0
            inside = (p >= edges[b]) & upper
            if inside.any():
                e += inside.mean() * abs(hit[inside].mean() - p[inside].mean())
        out.append(e)
    return float(np.mean(out))


def test_adaptive_and_classwise_match_reference_loops(digits_predictions):
    probs, labels = digits_predictions
    for n_bins in (1, 7, 15):
        assert cal.adaptive_ece(probs, labels, kind="probs", n_bins=n_bins) == pytest.approx(
            _adaptive_reference(probs, labels, n_bins), abs=1e-9
        )
        assert cal.classwise_ece(probs, labels, kind="probs", n_bins=n_bins) == pytest.approx(
            _classwise_reference(probs, labels, n_bins), abs=1e-9
        )


def test_adaptive_bins_with_ties_follow_input_order():
    rng = np.random.default_rng(2)
    rows = np.array([[0.9, 0.1], [0.6, 0.4], [1.0, 0.0], [0.75, 0.25]])
    probs = rows[rng.integers(0, 4, size=103)]  # four distinct confidences, many ties
    labels = rng.integers(0, 2, size=103)
    for n_bins in (2, 3, 10, 103, 150):
        assert cal.adaptive_ece(probs, labels, kind="probs", n_bins=n_bins) == pytest.approx(
            _adaptive_reference(probs, labels, n_bins), abs=1e-12
        )


def test_reliability_bins_and_summary_agree():
    logits, labels = random_predictions(n=2000)
    b = cal.reliability_bins(logits, labels, kind="logits")
    assert b.count.sum() == 2000 and len(b.edges) == 11
    filled = b.count > 0
    assert np.all((b.confidence[filled] >= b.edges[:-1][filled]) & (b.confidence[filled] <= b.edges[1:][filled]))
    s = cal.summary(logits, labels, kind="logits")
    assert s["ece"] == pytest.approx(cal.ece(logits, labels, kind="logits"))
    assert s["adaptive_ece"] == pytest.approx(cal.adaptive_ece(logits, labels, kind="logits"))
    assert s["nll"] == pytest.approx(cal.nll(logits, labels, kind="logits"))
    assert s["brier"] == pytest.approx(cal.brier(logits, labels, kind="logits"))
    assert s["mce"] == pytest.approx(cal.mce(logits, labels, kind="logits"))


def test_uniform_bins_follow_the_exact_edges():
    edges = np.arange(11) / 10
    conf = np.concatenate(
        [edges, np.nextafter(edges, 0), np.nextafter(edges, 1), np.random.default_rng(0).random(1000)]
    )
    conf = np.clip(conf, 0.0, 1.0)
    expected = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, 9)
    assert np.array_equal(cal._uniform_index(conf, 10), expected)


def test_permutation_invariance():
    logits, labels = random_predictions(n=3000)
    perm = np.random.default_rng(5).permutation(3000)
    for fn in (cal.ece, cal.adaptive_ece, cal.mce, cal.classwise_ece, cal.nll, cal.brier):
        assert fn(logits[perm], labels[perm], kind="logits") == pytest.approx(fn(logits, labels, kind="logits"))


def test_perfectly_calibrated_data_ece_vanishes():
    rng = np.random.default_rng(0)
    values = []
    for n in (1_000, 30_000, 1_000_000):
        probs = rng.dirichlet(np.ones(4) * 0.5, size=n)
        labels = (rng.random(n)[:, None] > probs.cumsum(1)).sum(1)  # y ~ Categorical(p)
        values.append(cal.ece(probs, labels, kind="probs"))
    assert values[0] > values[2] and values[2] < 0.003


def test_edge_cases():
    one = np.array([[0.2, 0.8]])
    assert cal.ece(one, [1], kind="probs") == pytest.approx(0.2)
    assert cal.ece(one, [0], kind="probs") == pytest.approx(0.8)
    # confidence exactly 1.0 falls in the last bin
    b = cal.reliability_bins(np.array([[1.0, 0.0], [0.95, 0.05]]), [0, 1], kind="probs")
    assert b.count[-1] == 2 and cal.ece(np.array([[1.0, 0.0]]), [0], kind="probs") == 0.0
    # a confidence on a bin edge belongs to the bin it opens: 0.5 -> [0.5, 0.6)
    b = cal.reliability_bins(np.array([[0.5, 0.5], [0.7, 0.3]]), [0, 0], kind="probs")
    assert b.count[5] == 1 and b.count[7] == 1 and b.count.sum() == 2
    # a class probability of exactly 0 (classwise bins) is fine
    assert cal.classwise_ece(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1], kind="probs") == 0.0
    assert cal.mce(np.array([[0.9, 0.1]]), [0], kind="probs", n_bins=1) == pytest.approx(0.1)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_t(t_true):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40_000, 10)) * 3
    probs = cal.softmax(logits, t_true)
    labels = (rng.random(40_000)[:, None] > probs.cumsum(1)).sum(1)
    labels = np.minimum(labels, 9)
    t = cal.fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.04)
    # the fit minimises NLL: nearby temperatures are not better
    best = cal.nll(logits / t, labels, kind="logits")
    assert best <= cal.nll(logits / (t * 1.05), labels, kind="logits")
    assert best <= cal.nll(logits / (t / 1.05), labels, kind="logits")


def test_fit_temperature_always_positive():
    logits = np.array([[50.0, -50.0], [-50.0, 50.0]])
    assert 0 < cal.fit_temperature(logits, [0, 1]) <= 1.0  # separable: NLL ~ 0 for any T <= 1
    assert 99 <= cal.fit_temperature(logits, [1, 0]) <= 100  # always wrong: as flat as allowed
    probs = cal.softmax(np.random.default_rng(0).normal(size=(100, 3)))
    assert cal.fit_temperature(probs, np.zeros(100, int), kind="probs") > 0


def test_bootstrap_is_seeded_and_brackets_the_estimate(digits_predictions):
    probs, labels = digits_predictions
    a = cal.bootstrap_ci(probs, labels, kind="probs", n_boot=300, seed=3)
    assert a == cal.bootstrap_ci(probs, labels, kind="probs", n_boot=300, seed=3)
    assert a != cal.bootstrap_ci(probs, labels, kind="probs", n_boot=300, seed=4)
    assert a[0] < cal.ece(probs, labels, kind="probs") < a[1]
    for metric in cal.BOOTSTRAP_METRICS:
        lo, hi = cal.bootstrap_ci(probs, labels, kind="probs", metric=metric, n_boot=100)
        assert lo <= hi


@pytest.mark.parametrize(
    "scores,labels,kind,kw,message",
    [
        (np.array([[np.nan, 0.0]]), [0], "logits", {}, "NaN or Inf"),
        (np.array([[np.inf, 0.0]]), [0], "logits", {}, "NaN or Inf"),
        (np.zeros((3, 2)), [0, 1], "logits", {}, "shape mismatch"),
        (np.zeros((2, 2)), [0, 2], "logits", {}, "labels out of range"),
        (np.zeros((2, 2)), [-1, 0], "logits", {}, "labels out of range"),
        (np.array([[0.5, 0.6]]), [0], "probs", {}, "do not sum to 1"),
        (np.array([[2.0, -1.0]]), [0], "probs", {}, "must lie in \\[0, 1\\]"),
        (np.zeros((0, 3)), [], "logits", {}, "empty input"),
        (np.zeros((2, 2)), [0, 1], "logits", {"n_bins": 0}, "n_bins must be an integer >= 1"),
        (np.zeros((2, 2)), [0, 1], "scores", {}, "kind must be 'logits' or 'probs'"),
        (np.zeros(4), [0], "logits", {}, "2-D array"),
        (np.zeros((2, 2)), [0.5, 1], "logits", {}, "labels must be integers"),
    ],
)
def test_bad_input_is_named(scores, labels, kind, kw, message):
    with pytest.raises(InputError, match=message):
        cal.ece(scores, np.asarray(labels), kind=kind, **kw)
