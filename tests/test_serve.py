"""Predictor, cigl-predict and confidence-audit on exported models (onnxruntime, no torch)."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BLOCK_TORCH, assert_one_line_error, run_cli
from PIL import Image
from sklearn.metrics import roc_auc_score

import cigl.export as cx
from cigl.data import CIFAR10_CLASSES, load_dataset
from cigl.errors import InputError
from cigl.serve.audit import main as audit_main
from cigl.serve.predictor import Predictor
from cigl.train import TrainConfig, train

BIN = os.path.dirname(sys.executable)
PREDICT, AUDIT, EXPORT = (os.path.join(BIN, n) for n in ("cigl-predict", "confidence-audit", "cigl-export"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real CigL run on digits, exported (`cigl-export RUN` exports RUN/model.pt)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    cfg = TrainConfig(method="cigl", epochs=4, batch_size=64, update_every=5, target_risk=0.2, out=str(out))
    summary = train(cfg, quiet=True)
    assert run_cli(EXPORT, str(out)).returncode == 0
    return out, summary


def test_predictor_matches_torch_on_digits(digits_run):
    out, _ = digits_run
    p = Predictor(out / "model.onnx", device="cpu", engine="onnxruntime")
    assert p.provider == "CPUExecutionProvider"
    assert p.card.input_size == (1, 8, 8) and p.card.classes == [str(i) for i in range(10)]
    test = load_dataset("digits").test
    x = p.normalize(test.x)
    logits, probs = p.predict(x)
    model = cx.load_model(out / "model.safetensors")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    z = logits / p.card.temperature
    e = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)


def test_predictor_validates_inputs(digits_run):
    out, _ = digits_run
    p = Predictor(out / "model.onnx", device="cpu", max_batch=8)
    good = np.zeros((2, 1, 8, 8), np.float32)
    channels = r"^the model takes 1 channel\(s\), the input has "
    cases = [
        (good.astype(np.int64), "must be uint8 images .* or normalised float"),
        (np.zeros((2, 8, 8), np.float32), channels + r"2 in axis 0 of one \(C, H, W\) image$"),
        (np.zeros((8, 8, 1), np.float32), r"looks like an \(H, W, C\) image: pass it as uint8"),
        (np.zeros((2, 3, 8, 8), np.float32), channels + r"3 in axis 1 of \(N, C, H, W\)$"),
        (np.zeros((2, 8, 8, 1), np.float32), r"looks like \(N, H, W, C\) images: pass them as uint8"),
        (np.zeros((2, 1, 16, 16), np.float32), "8x8 images"),
        (np.zeros((9, 1, 8, 8), np.float32), "exceeds the limit of 8"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN or Inf"),
        (np.zeros((2, 2, 1, 8, 8), np.float32), r"\(batch, 1, 8, 8\) or one image \(1, 8, 8\), got \(2, 2, 1, 8, 8\)"),
    ]
    for x, needle in cases:
        with pytest.raises(InputError, match=needle):
            p.predict(x)
    if not torch.cuda.is_available():  # no GPU: asking for CUDA is an error, never a silent CPU fallback
        with pytest.raises(InputError, match="device cuda requested"):
            Predictor(out / "model.onnx", device="cuda")


def test_cigl_predict_on_real_jpegs_with_a_corrupt_file(tmp_path, cifar_small, cifar_onnx):
    folder = tmp_path / "imgs"
    shutil.copytree(cifar_small / "test" / "cat", folder / "cat")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "preds.jsonl"
    proc = run_cli(PREDICT, str(cifar_onnx), str(folder), "--top-k", "3", "--abstain-below", "0.99", "--out", str(out))
    assert proc.returncode == 1, proc.stderr  # some inputs unreadable
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 11
    broken = [r for r in records if "error" in r]
    assert len(broken) == 1 and broken[0]["source"].endswith("broken.jpg") and "cannot read image" in broken[0]["error"]
    ok = [r for r in records if "error" not in r]
    for r in ok:
        assert r["class"] in CIFAR10_CLASSES and len(r["top_k"]) == 3
        assert r["top_k"][0] == [r["class"], r["confidence"]]
        assert r["top_k"][0][1] >= r["top_k"][1][1] >= r["top_k"][2][1]
        assert r["abstained"] == (r["confidence"] < 0.99)
    assert any(r["abstained"] for r in ok)
    assert "10 predicted, 1 unreadable" in proc.stderr
    strict = run_cli(PREDICT, str(cifar_onnx), str(folder), "--strict", "--out", str(tmp_path / "strict.jsonl"))
    assert_one_line_error(strict, "broken.jpg")
    assert not (tmp_path / "strict.jsonl").exists()
    clean = run_cli(PREDICT, str(cifar_onnx), str(folder / "cat"), "--format", "csv")
    assert (
        clean.returncode == 0
        and clean.stdout.splitlines()[0] == "source,class,confidence,top_k,abstained,prediction_set,error"
    )
    assert len(clean.stdout.splitlines()) == 11


def test_predictions_stream_batch_by_batch(tmp_path, cifar_small, cifar_onnx):
    """Records leave as each batch is run, in input order (an error record in its place), so
    cigl-predict's output starts before the last image is decoded; --strict on stdout stays
    all-or-nothing."""
    from cigl.serve.predict import predict_all

    folder = tmp_path / "imgs"
    shutil.copytree(cifar_small / "test" / "cat", folder)
    files = sorted(folder.iterdir())
    (folder / "zz-broken.jpg").write_bytes(b"not an image")
    predictor = Predictor(cifar_onnx)
    stream = predict_all(
        predictor,
        [*files[:3], folder / "zz-broken.jpg", *files[3:]],
        batch=2,
        make_records=predictor.records,
        strict=True,
        progress=False,
    )
    first = [next(stream), next(stream)]  # the first batch, before the broken file is reached
    assert [r["source"] for r in first] == [str(f) for f in files[:2]] and all("class" in r for r in first)
    with pytest.raises(InputError, match="zz-broken.jpg"):
        list(stream)
    inputs = [files[0], folder / "zz-broken.jpg", files[1]]
    lenient = predict_all(predictor, inputs, batch=2, make_records=predictor.records, strict=False, progress=False)
    assert ["error" in r for r in lenient] == [False, True, False]
    strict = run_cli(PREDICT, str(cifar_onnx), *map(str, [*files, folder / "zz-broken.jpg"]), "--strict")
    assert_one_line_error(strict, "zz-broken.jpg")
    assert strict.stdout == ""


class _Pipe(io.StringIO):
    """stdout as a pipe sees it: what was flushed so far, at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_predict_flushes_each_record_into_a_pipe(tmp_path, cifar_small, cifar_onnx, monkeypatch):
    """Piped into `tee` or a consumer, stdout is block-buffered: records must be flushed as they
    come, or a long run shows nothing for minutes."""
    from cigl.serve.predict import main as predict_main

    pipe = _Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert predict_main([str(cifar_onnx), str(cifar_small / "test" / "cat"), "--batch-size", "3"]) == 0
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 10 and [p.count("\n") for p in pipe.flushed[:10]] == list(range(1, 11))


def test_cigl_predict_npy_and_errors(tmp_path, digits_run):
    out, _ = digits_run
    test = load_dataset("digits").test
    np.save(tmp_path / "raw.npy", test.x[:5])
    p = Predictor(out / "model.onnx")
    np.save(tmp_path / "norm.npy", p.normalize(test.x[:5]))
    a = run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "raw.npy"))
    b = run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "norm.npy"))
    assert a.returncode == 0 and b.returncode == 0
    ra, rb = [json.loads(x) for x in a.stdout.splitlines()], [json.loads(x) for x in b.stdout.splitlines()]
    assert [r["class"] for r in ra] == [r["class"] for r in rb] and ra[0]["source"].endswith("raw.npy[0]")
    by_run = run_cli(PREDICT, str(out), str(tmp_path / "raw.npy"))  # a run directory means its model.onnx
    assert by_run.returncode == 0
    run_records = [json.loads(x) for x in by_run.stdout.splitlines()]  # auto may pick another engine: 1e-6 apart
    assert [(r["source"], r["class"]) for r in run_records] == [(r["source"], r["class"]) for r in ra]
    assert [r["confidence"] for r in run_records] == pytest.approx([r["confidence"] for r in ra], abs=1e-5)
    assert_one_line_error(run_cli(PREDICT, str(tmp_path / "none.onnx"), str(tmp_path / "raw.npy")), "model not found")
    assert_one_line_error(run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "missing")), "input not found")
    assert_one_line_error(
        run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "raw.npy"), "--abstain-below", "2"), "--abstain-below"
    )
    top_k = run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "raw.npy"), "--top-k", "0")
    assert_one_line_error(top_k, "--top-k must be >= 1, got 0")
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    assert_one_line_error(
        run_cli(PREDICT, str(tmp_path / "bad.onnx"), str(tmp_path / "raw.npy")), "not a loadable ONNX"
    )


def test_a_file_that_is_not_the_exported_model_names_the_export(tmp_path, capsys, digits_run):
    out, _ = digits_run
    shutil.copy(out / "model.pt", tmp_path / "model.pt")
    shutil.copy(out / "last.pt", tmp_path / "last.pt")
    cases = [
        (out / "model.pt", f"{out / 'model.pt'} is a torch file, not an exported model.onnx; cigl-export"),
        (out / "model.safetensors", "is a safetensors file, not an exported model.onnx; cigl-export"),
        (tmp_path / "last.pt", f"is a torch file, not an exported model.onnx; cigl-export {tmp_path / 'model.pt'}"),
        (tmp_path, f"{tmp_path} holds no model.onnx yet; cigl-export {tmp_path / 'model.pt'} writes it"),
        (tmp_path.parent, "is a folder without a model.onnx"),
        (tmp_path / "none.onnx", "model not found"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            Predictor(path)
    with pytest.raises(SystemExit) as stop:  # the audit, given the model.pt for a prediction file or model
        audit_main([str(out / "model.pt")])
    assert stop.value.code == 2 and cases[0][1] in capsys.readouterr().err


def test_audit_onnx_reproduces_the_run_summary(tmp_path, digits_run):
    out, summary = digits_run
    # the digits test split written out as an ImageFolder of PNGs
    test = load_dataset("digits").test
    for i, (img, label) in enumerate(zip(test.x, test.y, strict=True)):
        (tmp_path / "folder" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / "folder" / str(label) / f"{i:04d}.png")
    # the model given as its model.onnx, then as its run directory
    for model, source in ((out / "model.onnx", ["--dataset", "digits"]), (out, ["--data", str(tmp_path / "folder")])):
        report_dir = tmp_path / f"report{len(source[1])}"
        proc = run_cli(
            AUDIT,
            f"cigl={model}",
            *source,
            "--temperature",
            "none",
            "--bootstrap",
            "200",
            "--out",
            str(report_dir),
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        m = json.loads(proc.stdout)["models"]["cigl"]
        for name in ("accuracy", "ece", "nll", "brier"):
            assert m[name] == pytest.approx(summary["test"][name], abs=1e-4)
        assert m["model"]["recorded"]["ece"] == pytest.approx(summary["test"]["ece"])
        # the served probabilities (the model's own temperature) reproduce training's calibrated test metrics
        assert m["served"]["ece"] == pytest.approx(summary["test_calibrated"]["ece"], abs=1e-4)
        assert m["model"]["recorded"]["served_ece"] == pytest.approx(summary["test_calibrated"]["ece"])
        assert m["model"]["ece_drift"] is False
        assert m["model"]["actual_density"] == pytest.approx(summary["actual_density"])
        saved = np.load(report_dir / "predictions-cigl.npz")
        assert saved["logits"].shape == (len(test), 10)
        assert "served ECE recorded in training" in (report_dir / "report.md").read_text()
    # --temperature model: the ECE of the served probs equals training's calibrated test ECE
    proc = run_cli(
        AUDIT,
        str(out / "model.onnx"),
        "--dataset",
        "digits",
        "--temperature",
        "model",
        "--json",
        "--bootstrap",
        "0",
        "--out",
        str(tmp_path / "served"),
    )
    m = json.loads(proc.stdout)["models"]["model"]
    assert m["temperature"] == pytest.approx(summary["temperature"])
    assert m["ece_after_t"] == pytest.approx(summary["test_calibrated"]["ece"], abs=1e-4)
    with_file = run_cli(
        AUDIT,
        str(tmp_path / "served" / "predictions-model.npz"),
        "--temperature",
        "model",
        "--out",
        str(tmp_path / "y"),
    )
    assert_one_line_error(with_file, "needs a .onnx model")
    assert_one_line_error(run_cli(AUDIT, str(out / "model.onnx"), "--out", str(tmp_path / "x")), "needs --data")


def test_serving_never_imports_torch(tmp_path, digits_run):
    out, _ = digits_run
    np.save(tmp_path / "raw.npy", load_dataset("digits").test.x[:3])
    code = BLOCK_TORCH + (
        "from cigl.serve.predict import main\n"
        f"rc = main([{str(out / 'model.onnx')!r}, {str(tmp_path / 'raw.npy')!r}])\n"
        "from cigl.serve.audit import main as audit\n"
        f"rc += audit([{str(out / 'model.onnx')!r}, '--dataset', 'digits', '--out', {str(tmp_path / 'a')!r}])\n"
        "assert 'torch' not in sys.modules\n"
        "raise SystemExit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 3


def test_confidence_guarantees_travel_from_training_to_serving(tmp_path, digits_run):
    """Conformal thresholds and the certified abstain threshold are calibrated on the validation
    split at the end of training, written into the model card, and served by cigl-predict."""
    out, summary = digits_run
    found = summary["conformal"]
    assert found["method"] == "aps" and set(found["thresholds"]) == {"0.1", "0.05", "0.01"}
    assert found["n_calibration"] > 100  # the validation split
    assert found["test_coverage"]["0.1"] >= 0.82 and found["test_mean_size"]["0.1"] < 5
    chosen = summary["selective"]
    assert chosen["threshold"] is not None and chosen["risk_upper_bound"] <= 0.2
    p = Predictor(out / "model.onnx", device="cpu")
    assert p.card.conformal_threshold(0.1) == ("aps", pytest.approx(found["thresholds"]["0.1"]))
    assert p.card.abstain_threshold() == pytest.approx(chosen["threshold"])
    test = load_dataset("digits").test
    _, probs = p.predict(p.normalize(test.x))
    # uint8 images go in as they are (normalised inside), one image or a batch; other ints are refused
    # (auto may run batch 1 on another engine: equal to float rounding)
    assert np.array_equal(p.predict(test.x)[1], probs)
    assert np.allclose(p.predict(test.x[3])[1], probs[3:4], rtol=0, atol=1e-6)
    with pytest.raises(InputError, match=r"uint8 images \(N, H, W, C\) or normalised float"):
        p.predict(test.x.astype(np.int64))
    records = p.records([str(i) for i in range(len(test.y))], probs, alpha=0.1)
    covered = np.mean([str(y) in r["prediction_set"] for r, y in zip(records, test.y, strict=True)])
    assert covered >= 0.82
    assert all(r["abstained"] == (r["confidence"] < chosen["threshold"]) for r in records)
    np.save(tmp_path / "x.npy", test.x[:5])
    proc = run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "x.npy"), "--alpha", "0.05", "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].endswith("prediction_set,error")
    bad = run_cli(PREDICT, str(out / "model.onnx"), str(tmp_path / "x.npy"), "--alpha", "0.2")
    assert_one_line_error(bad, "alpha 0.2 is not in the model card (calibrated: 0.1, 0.05, 0.01)")


def test_audit_gates_what_is_served_and_writes_a_readable_report(tmp_path, digits_run, cifar_small):
    """--max-ece judges the served (temperature-scaled) probabilities of an exported model, the
    shift audit runs every corruption, and report.html is one self-contained page."""
    out, _ = digits_run
    common = [str(out / "model.onnx"), "--dataset", "digits", "--bootstrap", "100", "--json"]
    first = json.loads(run_cli(AUDIT, *common, "--out", str(tmp_path / "a")).stdout)["models"]["model"]
    served, raw = first["served"]["ece"], first["ece"]
    # the temperature makes the served probabilities better calibrated than the raw logits
    assert served < raw
    gate = f"{(served + raw) / 2:.4f}"
    report_dir = tmp_path / "report"
    ood = ["--ood-data", str(cifar_small / "test")]  # natural photos are out of distribution for digits
    proc = run_cli(
        AUDIT, *common, "--max-ece", gate, "--min-coverage", "0.8", "--shift", *ood, "--out", str(report_dir)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["gate"]["passed"] and result["gate"]["max_ece"] == float(gate)
    m = result["models"]["model"]
    assert m["conformal"]["source"] == "model card" and set(m["conformal"]["alphas"]) == {"0.1", "0.05", "0.01"}
    assert m["selective"]["threshold"]["source"] == "model card"
    shift = m["shift"]
    assert len(shift["corruptions"]) == 9 and all(len(v) == 5 for v in shift["corruptions"].values())
    assert shift["mean_by_severity"]["5"]["accuracy"] < m["served"]["accuracy"]
    # AUROC of the served confidence, digits (in distribution) vs CIFAR-10 photos, recomputed here
    p = Predictor(out / "model.onnx", device="cpu")
    photos = sorted((cifar_small / "test").rglob("*.jpg"))
    in_conf = p.predict(p.normalize(load_dataset("digits").test.x))[1].max(axis=1)
    out_conf = p.predict(p.normalize(np.stack([p.load_image(f) for f in photos])))[1].max(axis=1)
    truth = np.r_[np.ones(in_conf.size), np.zeros(out_conf.size)]
    assert m["ood"]["n_ood"] == len(photos) == 100
    assert m["ood"]["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[in_conf, out_conf]), abs=1e-4)
    page = (report_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "Confusion matrix" in page and "Conformal prediction sets" in page and "Distribution shift" in page
    failing = run_cli(AUDIT, *common, "--max-ece", f"{served / 2:.4f}", "--out", str(tmp_path / "f"))
    assert failing.returncode == 1 and json.loads(failing.stdout)["gate"]["failed"] == ["model"]


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_html_renders_its_plots_in_headless_chromium(tmp_path, digits_run):
    """The report opened in a real browser shows its plots: the screenshot has the plots' pixels."""
    out, _ = digits_run
    report_dir = tmp_path / "report"
    proc = run_cli(AUDIT, str(out / "model.onnx"), "--dataset", "digits", "--bootstrap", "50", "--out", str(report_dir))
    assert proc.returncode == 0, proc.stderr
    shot = tmp_path / "shot.png"
    browser = subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            (report_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), browser.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    # plot lines and markers are coloured (matplotlib's blue): a text-only page has none
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
    assert blue.sum() > 2000, blue.sum()


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
