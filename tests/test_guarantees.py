"""Conformal sets, certified abstention, selective metrics, corruptions and OOD scores on real
data: a logistic regression on scikit-learn's digits (fast enough to repeat hundreds of
calibration/test splits), checked against the finite-sample guarantees and independent code."""

import math

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cigl import calibration, conformal, selective
from cigl.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from cigl.data import load_dataset
from cigl.errors import InputError
from cigl.serve.guarantees import ood_report

N_CAL, N_SPLITS = 500, 200


@pytest.fixture(scope="module")
def digits_probs():
    """Held-out probabilities (and labels) of a deliberately weak model: 600 training images,
    strong regularisation, so that sets and abstentions have something to do."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, rest = order[:600], order[600:]
    model = LogisticRegression(max_iter=2000, C=0.01).fit(x[train] / 16, y[train])
    return calibration.softmax(model.decision_function(x[rest] / 16)), y[rest]


def _splits(n: int):
    for seed in range(N_SPLITS):
        order = np.random.default_rng(seed).permutation(n)
        yield seed, order[:N_CAL], order[N_CAL:]


def _coverage_within_bounds(probs, labels, method: str, alpha: float) -> float:
    """Assert that coverage averaged over N_SPLITS random calibration/test splits lies in
    [1 - a, 1 - a + 1/(n+1)] up to 3 standard errors of the average; return the mean set size."""
    covered, sizes = [], []
    for seed, cal, test in _splits(len(labels)):
        q = conformal.calibrate(probs[cal], labels[cal], [alpha], method, seed=seed)[alpha]
        sets = conformal.prediction_sets(probs[test], q, method, seed=seed + 10_000, nonempty=False)
        covered.append(conformal.coverage(sets, labels[test]))
        sizes.append(sets.sum(axis=1).mean())
    mean, se = np.mean(covered), np.std(covered) / math.sqrt(N_SPLITS)
    assert 1 - alpha - 3 * se <= mean <= 1 - alpha + 1 / (N_CAL + 1) + 3 * se, (mean, se)
    return float(np.mean(sizes))


@pytest.mark.parametrize("method", conformal.METHODS)
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_split_conformal_coverage_lies_within_its_finite_sample_bounds(digits_probs, method, alpha):
    """Averaged over random calibration/test splits, coverage is in [1 - a, 1 - a + 1/(n+1)]
    (Vovk; Angelopoulos & Bates, thm. 1 and D.1) up to the Monte-Carlo error of the average."""
    # sets are informative: more than the top class on hard inputs, far from all 10
    assert 1 < _coverage_within_bounds(*digits_probs, method, alpha) < 4


def test_scores_match_a_direct_implementation(digits_probs):
    """LAC, randomised APS and RAPS scores against a per-sample loop over the sorted classes."""
    probs, _ = digits_probs
    probs = probs[:50]
    u = np.random.default_rng(3).random(len(probs))
    for method in conformal.METHODS:
        ours = conformal.class_scores(probs, method, seed=3)
        for i, p in enumerate(probs):
            order = sorted(range(10), key=lambda k: -p[k])
            for rank, k in enumerate(order, start=1):
                above = sum(p[j] for j in order[: rank - 1])
                expected = {
                    "lac": 1 - p[k],
                    "aps": above + u[i] * p[k],
                    "raps": above + u[i] * p[k] + conformal.RAPS_LAMBDA * max(0, rank - conformal.RAPS_K_REG),
                }[method]
                assert ours[i, k] == pytest.approx(expected, abs=1e-12)


def test_conformal_refuses_too_few_samples_and_reports_class_coverage(digits_probs):
    probs, labels = digits_probs
    with pytest.raises(InputError, match="alpha 0.01 needs at least 99 calibration samples, got 50"):
        conformal.calibrate(probs[:50], labels[:50], [0.01])
    q = conformal.calibrate(probs[:500], labels[:500], [0.1], "lac")[0.1]
    sets = conformal.prediction_sets(probs[500:], q, "lac")
    per_class = conformal.class_coverage(sets, labels[500:], 10)
    hits = sets[np.arange(len(sets)), labels[500:]]
    assert per_class[3] == pytest.approx(hits[labels[500:] == 3].mean())
    summary = conformal.set_size_summary(sets)
    assert sum(summary["size_distribution"].values()) == pytest.approx(1.0) and summary["mean_size"] >= 1


def test_guarantee_functions_name_bad_inputs(digits_probs, digits_images):
    """Labels past the classes, NaN probabilities or thresholds, an empty input, an unknown
    corruption: one InputError each, not an IndexError or silently wrong sets."""
    probs, labels = digits_probs
    nan = probs.copy()
    nan[0, 0] = np.nan
    cases = [
        (lambda: conformal.calibrate(probs, labels + 10, [0.1]), "labels out of range: expected 0..9"),
        (lambda: conformal.calibrate(nan, labels, [0.1]), "probs contain NaN or Inf"),
        (lambda: conformal.prediction_sets(probs, float("nan")), "threshold must be a finite number"),
        (lambda: conformal.prediction_sets(probs * 3, 0.5), r"probs must lie in \[0, 1\]"),
        (lambda: selective.risk_threshold(np.zeros(0), np.zeros(0, bool), 0.2), "empty input"),
        (lambda: corrupt(digits_images[0][:2], "rain", 1, 0), "unknown corruption 'rain'"),
        (lambda: corrupt(digits_images[0][:2], "contrast", 6, 0), "severity must be 1..5"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_certified_abstention_keeps_the_risk_on_held_out_data(digits_probs):
    """The threshold chosen on one half keeps the other half's selective risk <= R in at least
    1 - delta of the splits (the guarantee is on the true risk; the held-out half estimates it),
    while still answering most inputs."""
    probs, labels = digits_probs
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    target, delta = 0.05, 0.1
    violations, coverages = 0, []
    for _, cal, test in _splits(len(labels)):
        chosen = selective.risk_threshold(conf[cal], correct[cal], target, delta)
        assert chosen["threshold"] is not None and chosen["risk_upper_bound"] <= target
        held_out = selective.selective_metrics(conf[test], correct[test], chosen["threshold"])
        violations += held_out["risk"] > target
        coverages.append(held_out["coverage"])
    assert violations / N_SPLITS <= delta
    assert np.mean(coverages) > 0.3  # answers a good share of the inputs (this model is weak on purpose)
    # an unreachable target certifies nothing: abstain on everything rather than promise it
    assert selective.risk_threshold(conf[:100], correct[:100], 0.001, delta)["threshold"] is None


def test_clopper_pearson_bound_against_its_definition():
    from scipy.stats import binom

    for errors, n in ((0, 50), (3, 50), (20, 400)):
        upper = float(selective.clopper_pearson_upper(np.array([errors]), np.array([n]), 0.1)[0])
        # the bound is the rate at which seeing <= `errors` errors has probability delta
        assert binom.cdf(errors, n, upper) == pytest.approx(0.1, abs=1e-6)


def test_aurc_against_a_direct_implementation(digits_probs):
    probs, labels = digits_probs
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risks = [sum(not correct[j] for j in order[: k + 1]) / (k + 1) for k in range(len(order))]
    assert selective.aurc(conf, correct) == pytest.approx(np.mean(risks))
    best = sorted(range(len(conf)), key=lambda i: not correct[i])
    oracle = np.mean([sum(not correct[j] for j in best[: k + 1]) / (k + 1) for k in range(len(best))])
    assert selective.excess_aurc(conf, correct) == pytest.approx(np.mean(risks) - oracle)
    assert 0 < selective.excess_aurc(conf, correct) < selective.aurc(conf, correct)


def test_ood_auroc_matches_scikit_learn(digits_probs):
    probs, _ = digits_probs
    rng = np.random.default_rng(0)
    id_conf, ood_conf = probs.max(axis=1), rng.uniform(0.1, 0.9, 300).round(2)  # ties on purpose
    found = ood_report(id_conf, ood_conf)
    expected = roc_auc_score(np.r_[np.ones(id_conf.size), np.zeros(ood_conf.size)], np.r_[id_conf, ood_conf])
    assert found["auroc"] == pytest.approx(expected)
    cut = np.quantile(id_conf, 0.05)
    assert found["fpr_at_95_tpr"] == pytest.approx((ood_conf >= cut).mean())


def test_bias_corrected_ece_interval_contains_its_estimate(digits_probs):
    probs, labels = digits_probs
    plug_in = calibration.ece(probs, labels, kind="probs")
    estimate, lo, hi = calibration.debiased_ece(probs, labels, kind="probs", n_boot=300, seed=1)
    assert lo <= estimate <= hi and estimate < plug_in
    assert calibration.debiased_ece(probs, labels, kind="probs", n_boot=300, seed=1) == (estimate, lo, hi)


@pytest.fixture(scope="module")
def digits_images():
    """The digits test split as uint8 images and a classifier trained on the training split."""
    data = load_dataset("digits", val_size=0)
    model = LogisticRegression(max_iter=2000).fit(data.train.x.reshape(len(data.train.x), -1) / 255, data.train.y)
    return data.test.x, data.test.y, model


def test_corruptions_are_deterministic_and_accuracy_falls_with_severity(digits_images):
    x, y, model = digits_images

    def accuracy(images):
        return (model.predict(images.reshape(len(images), -1) / 255) == y).mean()

    clean = accuracy(x)
    by_severity = {s: [] for s in SEVERITIES}
    for name in CORRUPTIONS:
        assert np.array_equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=0)), name
        out = corrupt(x, name, 5)
        assert out.dtype == np.uint8 and out.shape == x.shape
        for s in SEVERITIES:
            by_severity[s].append(accuracy(corrupt(x, name, s)))
        assert by_severity[5][-1] <= clean, name
    means = [np.mean(by_severity[s]) for s in SEVERITIES]
    assert clean >= means[0] and means == sorted(means, reverse=True) and means[-1] < clean - 0.05, (clean, means)
    rgb = np.repeat(x[:20], 3, axis=3)
    assert not np.array_equal(corrupt(rgb, "gaussian_noise", 1, seed=0), corrupt(rgb, "gaussian_noise", 1, seed=1))


@pytest.fixture(scope="module")
def cifar_probs(tmp_path_factory):
    """Held-out probabilities of a real (weak) CIFAR-10 classifier: a logistic regression on the
    pixels of 100 training images per class, applied to 1,000 test images."""
    from conftest import CIFAR_ARCHIVE

    from cigl.data import extract_archive_subset, load_image_folder

    root = extract_archive_subset(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cifar-lr"), {"train": 100, "test": 100})
    train, _ = load_image_folder(root / "train")
    test, _ = load_image_folder(root / "test")
    model = LogisticRegression(max_iter=300, C=0.001).fit(train.x.reshape(len(train.x), -1) / 255, train.y)
    return model.predict_proba(test.x.reshape(len(test.x), -1) / 255), test.y


@pytest.mark.parametrize("method", conformal.METHODS)
def test_conformal_coverage_on_cifar10(cifar_probs, method):
    """The same finite-sample bounds on CIFAR-10, where the model is right a third of the time
    and the sets must grow large to keep their promise."""
    probs, labels = cifar_probs
    assert 0.2 < (probs.argmax(axis=1) == labels).mean() < 0.5
    assert 3 < _coverage_within_bounds(probs, labels, method, 0.1) < 9  # uncertain model: large, not trivial sets
