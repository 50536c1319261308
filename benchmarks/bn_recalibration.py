#!/usr/bin/env python
"""Which batches the averaged model's batch-norm statistics should be recomputed from.

CigL's product is the weight average; its batch-norm statistics are recomputed afterwards
(METHOD.md section 3). This trains CigL (ResNet-20, a class-balanced CIFAR-10 subset stored class
by class, as an ImageFolder is) for a few seeds, then recomputes the averaged model's statistics
from three kinds of batches and reports its test accuracy beside the final training weights':

- dataset order: consecutive stored images (cigl <= 0.1): batches of one class each
- shuffled: a seeded random order, full batches (what cigl-train does now)
- shuffled + augmented: the same with training's random crop and flip

    python benchmarks/bn_recalibration.py          # -> benchmarks/results/bn_recalibration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from common import CIFAR_ARCHIVE, write_results

from cigl.data import extract_archive_subset, load_dataset
from cigl.models import create_model
from cigl.pipeline import normalize, shuffled_batches, to_device
from cigl.sparse import recalibrate_bn
from cigl.train import TrainConfig, train
from cigl.train.evaluate import predict_logits

VARIANTS = ("dataset_order", "shuffled", "shuffled_augmented")


def variants(train_x: torch.Tensor, batch: int, seed: int, data) -> dict:
    """name -> an iterable of normalised recalibration batches."""
    return {
        "dataset_order": [
            normalize(train_x[i : i + batch], data.mean, data.std) for i in range(0, train_x.shape[0], batch)
        ],
        "shuffled": shuffled_batches(train_x, batch, seed, data.mean, data.std),
        "shuffled_augmented": shuffled_batches(train_x, batch, seed, data.mean, data.std, data.pad, data.flip),
    }


def variant_accuracies(model_pt: Path, data, seed: int) -> dict[str, float]:
    """Test accuracy of a model.pt's (averaged) weights under each recalibration choice."""
    state = torch.load(model_pt, weights_only=True)
    model = create_model(state["arch"], **state["model_kwargs"])
    model.load_state_dict(state["state_dict"])
    train_x, _ = to_device(data.train, torch.device("cpu"))
    test_x, _ = to_device(data.test, torch.device("cpu"))
    row = {}
    for name, batches in variants(train_x, 128, seed, data).items():
        recalibrate_bn(model, batches)
        logits = predict_logits(model, test_x, data.mean, data.std, 512, nullcontext)
        row[name] = float((logits.argmax(1) == data.test.y).mean())
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean and sd over seeds of every column, and of each variant's gap to the final weights."""
    names = ["final_weights", *VARIANTS]
    spread = {n: statistics.stdev(r[n] for r in rows) if len(rows) > 1 else 0.0 for n in names}
    gaps = {n: [r[n] - r["final_weights"] for r in rows] for n in VARIANTS}
    return {
        "mean_test_acc": {n: statistics.mean(r[n] for r in rows) for n in names},
        "sd_test_acc": spread,
        "averaged_minus_final": {
            n: {"mean": statistics.mean(g), "sd": statistics.stdev(g) if len(g) > 1 else 0.0} for n, g in gaps.items()
        },
    }


def study_runs(run_dirs: list[str]) -> int:
    """The same comparison on finished cigl-train runs (e.g. the CPU study's CigL runs)."""
    rows = []
    for run in map(Path, run_dirs):
        cfg = json.loads((run / "config.json").read_text())
        data = load_dataset(
            cfg["dataset"], cfg["data_dir"], val_size=cfg["val_size"], train_per_class=cfg["train_per_class"]
        )
        summary = json.loads((run / "summary.json").read_text())
        row = {"run": run.name, "final_weights": summary["final_weights"]["test"]["accuracy"]}
        rows.append(row | variant_accuracies(run / "model.pt", data, cfg["seed"]))
        print(rows[-1], flush=True)
    print(write_results("bn_recalibration_study", {"runs": rows, **summarize(rows)}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--runs", nargs="+", help="instead: compare on these finished CigL run folders")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.runs:
        return study_runs(args.runs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_archive_subset(
            CIFAR_ARCHIVE, Path(tmp) / "cifar", {"train": args.per_class, "test": args.test_per_class}
        )
        data = load_dataset("cifar10", root, val_size=0.1)
        for seed in args.seeds:
            out = Path(tmp) / f"run{seed}"
            cfg = TrainConfig(
                dataset="cifar10", data_dir=str(root), method="cigl", epochs=args.epochs, seed=seed, out=str(out)
            )
            summary = train(cfg, quiet=True)
            row = {"seed": seed, "final_weights": summary["final_weights"]["test"]["accuracy"]}
            row |= variant_accuracies(out / "model.pt", data, seed)
            rows.append(row)
            print(row, flush=True)
    result = {
        "setup": f"CigL ResNet-20, CIFAR-10 {args.per_class}/class train (10% val), "
        f"{args.test_per_class}/class test, {args.epochs} epochs, default averaging (last 20% of epochs), 2 threads",
        "runs": rows,
        **summarize(rows),
    }
    print(write_results("bn_recalibration", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
