"""The newcomer's chain, shortened: train -> export -> predict -> audit on digits (tools/demo.py)."""

import json

from conftest import ROOT, RUN_FILES, run_cli

METHODS = ("dense", "rigl", "cigl")


def test_demo_pipeline_leaves_every_artefact(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(str(ROOT / "tools" / "demo.py"), "--epochs", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for m in METHODS:
        run = out / m
        for name in (*RUN_FILES, "model.safetensors", "model.onnx"):
            assert (run / name).stat().st_size > 0, (m, name)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == m and summary["target_density"] == (1.0 if m == "dense" else 0.1)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["top_k"]) == 2 and r["class"] in r["prediction_set"] for r in records)
    report = json.loads((out / "audit" / "report.json").read_text())
    assert list(report["models"]) == list(METHODS)
    for m in METHODS:
        measured = report["models"][m]
        summary = json.loads((out / m / "summary.json").read_text())
        assert abs(measured["ece"] - summary["test"]["ece"]) < 1e-4  # the export serves what training measured
        assert abs(measured["served"]["ece"] - summary["test_calibrated"]["ece"]) < 1e-4
        assert len(measured["shift"]["corruptions"]) == 9
        assert (out / "audit" / f"predictions-{m}.npz").is_file()
    assert (out / "audit" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "audit" / "report.html").stat().st_size > 50_000  # plots embedded
    assert "| metric | dense | rigl | cigl |" in proc.stdout
    assert "reliability diagram" in proc.stdout and "model.safetensors sizes" in proc.stdout
