#!/usr/bin/env python
"""The whole chain on the bundled digits data, as `make demo` runs it:

train Dense, RigL and CigL (density 0.1; conformal thresholds and a certified abstain threshold
calibrated on the validation split) -> export each to safetensors + ONNX -> cigl-predict on a few
images with 90% prediction sets -> confidence-audit of the three exported models side by side,
also on corrupted copies of the test images.
Every step runs the real command-line tool, exactly as a user would.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from cigl.errors import ArgumentParser

METHODS = ("dense", "rigl", "cigl")
BIN = Path(sys.executable).parent


def tool(name: str, *args: str) -> str:
    """Run a cigl console script; stop the demo with its one-line error (exit code 2) if it fails."""
    proc = subprocess.run([str(BIN / name), *args], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"{name}: {last.removeprefix('error: ')}", file=sys.stderr)
        sys.exit(2)
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="training epochs of each model (default 30)")
    p.add_argument("--out", default="runs/demo", help="folder for the runs, images and audit (default runs/demo)")
    args = p.parse_args(argv)
    out = Path(args.out)
    for method in METHODS:
        run = out / method
        shutil.rmtree(run, ignore_errors=True)
        print(f"[1/4] training {method} on digits ({args.epochs} epochs) ...", flush=True)
        tool(
            "cigl-train",
            "--dataset",
            "digits",
            "--method",
            method,
            *(["--density", "0.1"] if method != "dense" else []),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            "64",
            "--target-risk",
            "0.1",
            "--out",
            str(run),
            "--quiet",
        )
        print(f"[2/4] exporting {method} ...", flush=True)
        tool("cigl-export", str(run / "model.pt"))
    from PIL import Image

    from cigl.data import load_dataset

    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    test = load_dataset("digits").test
    for i in range(5):
        Image.fromarray(test.x[i, :, :, 0]).save(images / f"digit{i}_label{test.y[i]}.png")
    print("[3/4] cigl-predict with the CigL model on 5 test digits (with 90% prediction sets):", flush=True)
    records = tool(
        "cigl-predict",
        str(out / "cigl" / "model.onnx"),
        str(images),
        "--top-k",
        "2",
        "--alpha",
        "0.1",
        "--out",
        str(out / "predictions.jsonl"),
    )
    print((out / "predictions.jsonl").read_text() + records, end="")
    print("[4/4] confidence-audit of the three exported models on the digits test split:", flush=True)
    table = tool(
        "confidence-audit",
        *(f"{m}={out / m / 'model.onnx'}" for m in METHODS),
        "--dataset",
        "digits",
        "--temperature",
        "model",
        "--shift",
        "--out",
        str(out / "audit"),
    )
    print(table)
    sizes = {m: (out / m / "model.safetensors").stat().st_size for m in METHODS}
    print("model.safetensors sizes: " + ", ".join(f"{m} {s / 1024:.0f} KB" for m, s in sizes.items()))
    print(f"runs: {out}/<method>/ (summary.json, model.pt, model.safetensors, model.onnx)")
    print(f"report: {out / 'audit' / 'report.html'}   reliability diagram: {out / 'audit' / 'reliability.png'}")
    assert np.isfinite(list(sizes.values())).all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
