"""confidence-audit on real prediction files: report contents, plot, gate, errors."""

import csv
import io
import json
import os
import re
import sys
import zipfile

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from cigl import calibration as cal

AUDIT = os.path.join(os.path.dirname(sys.executable), "confidence-audit")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two real models on digits: a logistic regression (probs) and an over-sharpened copy (logits)."""
    d = load_digits()
    clf = LogisticRegression(max_iter=300).fit(d.data[:1000], d.target[:1000])
    probs, labels = clf.predict_proba(d.data[1000:]), d.target[1000:]
    root = tmp_path_factory.mktemp("preds")
    np.savez(root / "calm.npz", probs=probs, labels=labels)
    np.savez(root / "sharp.npz", logits=np.log(probs) * 4, labels=labels)
    with open(root / "calm.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label"] + [f"digit{k}" for k in range(10)])
        for p, y in zip(probs, labels, strict=True):
            w.writerow([y] + [repr(float(v)) for v in p])
    return root, probs, labels


def audit(*args):
    return run_cli("-c", "from cigl.serve.audit import main; raise SystemExit(main())", *args)


def test_report_contents_and_plot(files, tmp_path):
    root, probs, labels = files
    out = tmp_path / "report"
    proc = run_cli(
        AUDIT,
        f"lr={root / 'calm.npz'}",
        str(root / "sharp.npz"),
        "--temperature",
        "none",
        "--bootstrap",
        "200",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["lr", "sharp"]
    lr = report["models"]["lr"]
    assert lr["ece"] == pytest.approx(cal.ece(probs, labels, kind="probs"))
    assert lr["nll"] == pytest.approx(cal.nll(probs, labels, kind="probs"))
    assert lr["brier"] == pytest.approx(cal.brier(probs, labels, kind="probs"))
    assert lr["adaptive_ece"] == pytest.approx(cal.adaptive_ece(probs, labels, kind="probs"))
    served = lr["served"]  # a probs file serves its probabilities as given
    assert served["ece"] == pytest.approx(lr["ece"]) and served["what"] == "as given"
    # the bias-corrected ECE lies inside its interval and below the (upward-biased) plug-in estimate
    assert served["ece_ci"][0] <= served["ece_debiased"] <= served["ece_ci"][1]
    assert served["ece_debiased"] < served["ece"]
    assert sum(lr["bins"]["count"]) == len(labels) and lr["temperature"] == 1.0
    sharp = report["models"]["sharp"]
    assert sharp["ece"] > lr["ece"] and sharp["accuracy"] == lr["accuracy"]
    md = (out / "report.md").read_text()
    assert "| metric | lr | sharp |" in md and "bias-corrected [95% CI]" in md and f"{100 * lr['ece']:.2f}%" in md
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| metric | lr | sharp |" in proc.stdout


def test_temperature_fit_on_split_improves_the_sharp_model(files, tmp_path):
    root, _, labels = files
    proc = audit(
        str(root / "sharp.npz"),
        "--fit-split",
        "0.5",
        "--bootstrap",
        "0",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["models"]["sharp"]
    assert m["n"] + m["n_fit"] == len(labels) and m["n_fit"] == round(0.5 * len(labels))
    assert m["temperature"] > 2.0  # logits were sharpened 4x
    assert m["ece_after_t"] < m["ece"] and m["nll_after_t"] < m["nll"] and "ece_ci" not in m["served"]


def test_csv_matches_npz(files, tmp_path):
    root, _, _ = files
    a = json.loads(
        audit(str(root / "calm.csv"), "--temperature", "none", "--json", "--out", str(tmp_path / "a")).stdout
    )
    b = json.loads(
        audit(str(root / "calm.npz"), "--temperature", "none", "--json", "--out", str(tmp_path / "b")).stdout
    )
    for key in ("ece", "nll", "brier", "accuracy", "adaptive_ece", "mce"):
        assert a["models"]["calm"][key] == pytest.approx(b["models"]["calm"][key], abs=1e-9)


def test_csv_dialects_class_name_labels_and_named_cells(files, tmp_path, monkeypatch):
    """Spreadsheet exports: semicolons or tabs, labels written as class names; a number is always
    a class index (classes named "1", "2", ... keep their meaning); a bad cell names its line."""
    from cigl.errors import CiglError
    from cigl.serve.audit_inputs import load_predictions

    _, probs, labels = files
    names = [f"digit{k}" for k in range(10)]
    for sep in (";", "\t"):
        path = tmp_path / f"sep{len(sep)}{sep == ';'}.csv"
        lines = [sep.join(["label", *names])] + [
            sep.join([names[y], *(repr(float(v)) for v in p)]) for p, y in zip(probs, labels, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
        loaded = load_predictions(str(path))
        assert np.array_equal(loaded.labels, labels) and np.allclose(loaded.scores, probs)
    european = tmp_path / "european.csv"  # Excel in many locales: ; between cells, decimal commas
    lines = ["label;" + ";".join(names)] + [
        ";".join([str(y), *(repr(float(v)).replace(".", ",") for v in p)]) for p, y in zip(probs, labels, strict=True)
    ]
    european.write_text("\n".join(lines) + "\n")
    loaded = load_predictions(str(european))
    assert np.array_equal(loaded.labels, labels) and np.allclose(loaded.scores, probs)
    numeric = tmp_path / "numeric.csv"
    numeric.write_text("label,1,2,3\n1,0.1,0.8,0.1\n2,0.2,0.2,0.6\n")
    assert load_predictions(str(numeric)).labels.tolist() == [1, 2]  # indices, not the classes named 1 and 2
    cases = {
        "label,a,b\n0,0.5,0.5\nc,0.5,0.5\n": "line 3 holds 'c' where a class index or one of a, b belongs",
        "label,a,b\n0,0.5,0.5\n1,x,0.5\n": "line 3 holds 'x' where a number belongs",
        "label,a,b\n0,3.0,-1.0\n": "pass --csv-kind logits",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"bad{i}.csv").write_text(text)
        with pytest.raises(CiglError, match=re.escape(message)):
            load_predictions(str(tmp_path / f"bad{i}.csv"))
    monkeypatch.setattr("cigl.serve.audit_inputs.MAX_CSV_BYTES", 20)  # a CSV is bounded before it is parsed
    with pytest.raises(CiglError, match=r"over the CSV limit of 20; save the predictions as .npz"):
        load_predictions(str(numeric))


def test_npz_class_name_labels(files, tmp_path):
    """An .npz may hold its labels as class names, looked up in its 'classes' array as a CSV's are."""
    from cigl.errors import CiglError
    from cigl.serve.audit_inputs import load_predictions

    _, probs, labels = files
    names = np.array([f"digit{k}" for k in range(10)])
    np.savez(tmp_path / "named.npz", probs=probs, labels=names[labels], classes=names)
    loaded = load_predictions(str(tmp_path / "named.npz"))
    assert np.array_equal(loaded.labels, labels) and loaded.classes == names.tolist()
    np.savez(tmp_path / "nameless.npz", probs=probs, labels=names[labels])
    with pytest.raises(CiglError, match="holds class names but there is no 'classes' array"):
        load_predictions(str(tmp_path / "nameless.npz"))
    np.savez(tmp_path / "stranger.npz", probs=probs[:2], labels=np.array(["digit1", "cat"]), classes=names)
    with pytest.raises(CiglError, match="label 'cat' is not one of the classes digit0, digit1"):
        load_predictions(str(tmp_path / "stranger.npz"))


def test_adaptive_scheme(files, tmp_path):
    root, probs, labels = files
    proc = audit(
        str(root / "calm.npz"),
        "--scheme",
        "adaptive",
        "--temperature",
        "none",
        "--bins",
        "5",
        "--bootstrap",
        "50",
        "--json",
        "--out",
        str(tmp_path / "o"),
    )
    m = json.loads(proc.stdout)["models"]["calm"]
    assert m["ece"] == pytest.approx(cal.adaptive_ece(probs, labels, kind="probs", n_bins=5))
    assert len(set(m["bins"]["count"])) <= 2  # equal mass


def test_gate_exit_codes(files, tmp_path):
    root, _, _ = files
    calm, sharp = str(root / "calm.npz"), str(root / "sharp.npz")
    ok = audit(calm, "--max-ece", "0.2", "--temperature", "none", "--out", str(tmp_path / "a"))
    assert ok.returncode == 0 and "PASS" in ok.stdout
    bad = audit(calm, sharp, "--max-ece", "0.05", "--temperature", "none", "--out", str(tmp_path / "b"))
    assert bad.returncode == 1 and "FAIL (sharp: ECE" in bad.stdout
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    gate = report["gate"]
    assert gate["max_ece"] == 0.05 and gate["passed"] is False and gate["failed"] == ["sharp"]
    assert gate["reasons"]["sharp"][0].startswith("ECE ")
    assert "Gate: ECE <= 5.00%: FAIL (sharp: ECE " in (tmp_path / "b" / "report.md").read_text()


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _declaring_4gb(path) -> str:
    """An .npz of a few hundred bytes whose logits header declares 4 GB (a decompression bomb's
    effect, without the gigabytes): its size must be refused before np.load reads it."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 10), np.float32))
    raw = bytearray(buf.getvalue())
    old, new = b"(1, 10)", b"(100000000, 10)"
    at = raw.index(old)
    raw[at : at + len(old)] = new
    end = raw.index(b"\n")
    del raw[end - (len(new) - len(old)) : end]  # as many padding spaces: the header keeps its length
    labels = io.BytesIO()
    np.save(labels, np.zeros(10, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("logits.npy", bytes(raw))
        z.writestr("labels.npy", labels.getvalue())
    return str(path)


def test_bad_inputs_one_line_and_nothing_written(files, tmp_path):
    root, probs, labels = files
    calm = str(root / "calm.npz")
    nan = probs.copy()
    nan[3, 2] = np.nan
    bad_csv = tmp_path / "nolabel.csv"
    bad_csv.write_text("a,b\n0.5,0.5\n")
    cases = [
        ([str(tmp_path / "missing.npz")], "prediction file not found"),
        ([_write(tmp_path / "nokeys.npz", scores=probs)], "needs arrays 'labels' and 'logits' or 'probs'"),
        ([_write(tmp_path / "nan.npz", probs=nan, labels=labels)], "NaN or Inf"),
        ([_write(tmp_path / "shape.npz", probs=probs, labels=labels[:-1])], "shape mismatch"),
        ([_write(tmp_path / "oor.npz", probs=probs, labels=labels + 5)], "labels out of range"),
        ([_write(tmp_path / "sum.npz", probs=probs * 0.5, labels=labels)], "do not sum to 1"),
        ([str(bad_csv)], "no 'label' column"),
        ([calm, f"calm={root / 'sharp.npz'}"], "share the name 'calm'"),
        ([calm, "--temperature", "hot"], "--temperature must be fit, none, model or a number > 0"),
        ([calm, "--bins", "0"], "--bins must be >= 1"),
        ([calm, "--max-ece", "5"], "--max-ece must lie in [0, 1]"),
        ([calm, "--scheme", "quantile"], "invalid choice"),
        ([str(root / "calm.txt")], "prediction file not found"),
        ([_declaring_4gb(tmp_path / "bomb.npz")], "declares 4,000,000,080 bytes of arrays, over the limit of 2,147,48"),
    ]
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    cases.append(([str(tmp_path / "corrupt.npz")], "not a readable .npz"))
    for args, needle in cases:
        out = tmp_path / "never"
        proc = audit(*args, "--out", str(out))
        assert_one_line_error(proc, needle)
        assert not out.exists(), args


def test_ece_drift_compares_with_trainings_binning(files):
    """The card records the served ECE with 10 equal-width bins; --bins 3 or 40 must not turn the
    same probabilities into 'drift', and a recorded value far off must still be flagged."""
    from cigl.serve.audit import Settings, ece_drift
    from cigl.serve.guarantees import served_metrics

    _, probs, labels = files
    soft = cal.softmax(np.log(probs) * 0.5)  # confidences spread over the bins, so binning matters
    recorded = cal.ece(soft, labels, kind="probs", n_bins=10)
    for bins in (3, 10, 40):
        s = Settings(n_bins=bins, n_boot=200)
        served = served_metrics(soft, labels, n_bins=bins, n_boot=200, seed=0)
        assert ece_drift(soft, labels, recorded, served, s) is False
        assert ece_drift(soft, labels, recorded + 0.2, served, s) is True
        if bins != 10:  # compared at --bins, these probabilities would read as drift
            low, high = served["ece_ci"]
            assert abs(recorded - served["ece"]) > (high - low) / 2


def test_dataset_audit_resizes_as_training_did(tmp_path):
    """A digits model trained with --image-size 16: the export check and `--dataset digits` feed
    it 16 x 16 digits, as training did (both used the 8 x 8 arrays and refused the model)."""
    from conftest import make_model_pt

    from cigl.data import load_dataset

    src = make_model_pt(tmp_path / "run" / "model.pt", "resnet20", size=16)
    export = run_cli(os.path.join(os.path.dirname(sys.executable), "cigl-export"), str(src))
    assert export.returncode == 0, export.stderr
    argv = ["--dataset", "digits", "--temperature", "none", "--bootstrap", "0", "--json", "--out", str(tmp_path / "a")]
    proc = audit(str(src.parent), *argv)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["models"]["run"]["n"] == len(load_dataset("digits").test)
