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
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import CIFAR_ARCHIVE, write_results

from cigl.data import extract_archive_subset, load_dataset
from cigl.models import create_model
from cigl.pipeline import normalize, shuffled_batches, to_device
from cigl.sparse import recalibrate_bn
from cigl.train import TrainConfig, predict_logits, train


def variants(train_x: torch.Tensor, batch: int, seed: int, data) -> dict:
    """name -> an iterable of normalised recalibration batches."""
    return {
        "dataset_order": [
            normalize(train_x[i : i + batch], data.mean, data.std) for i in range(0, train_x.shape[0], batch)
        ],
        "shuffled": shuffled_batches(train_x, batch, seed, data.mean, data.std),
        "shuffled_augmented": shuffled_batches(train_x, batch, seed, data.mean, data.std, data.pad, data.flip),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_archive_subset(
            CIFAR_ARCHIVE, Path(tmp) / "cifar", {"train": args.per_class, "test": args.test_per_class}
        )
        data = load_dataset("cifar10", root, val_size=0.1)
        train_x, _ = to_device(data.train, torch.device("cpu"))
        test_x, _ = to_device(data.test, torch.device("cpu"))
        for seed in args.seeds:
            out = Path(tmp) / f"run{seed}"
            cfg = TrainConfig(
                dataset="cifar10", data_dir=str(root), method="cigl", epochs=args.epochs, seed=seed, out=str(out)
            )
            summary = train(cfg, quiet=True)
            state = torch.load(out / "model.pt", weights_only=True)
            model = create_model("resnet20", num_classes=10, in_chans=3, image_size=32)
            model.load_state_dict(state["state_dict"])
            row = {"seed": seed, "final_weights": summary["final_weights"]["test"]["acc"]}
            for name, batches in variants(train_x, 128, seed, data).items():
                recalibrate_bn(model, batches)
                logits = predict_logits(model, test_x, data.mean, data.std, 512, nullcontext)
                row[name] = float((logits.argmax(1) == data.test.y).mean())
            rows.append(row)
            print(row, flush=True)
    names = ["final_weights", "dataset_order", "shuffled", "shuffled_augmented"]
    mean = {n: statistics.mean(r[n] for r in rows) for n in names}
    sd = {n: statistics.stdev(r[n] for r in rows) if len(rows) > 1 else 0.0 for n in names}
    gap = [r["shuffled"] - r["final_weights"] for r in rows]
    result = {
        "setup": f"CigL ResNet-20, CIFAR-10 {args.per_class}/class train (10% val), "
        f"{args.test_per_class}/class test, {args.epochs} epochs, default averaging (last 20% of epochs), 2 threads",
        "runs": rows,
        "mean_test_acc": mean,
        "sd_test_acc": sd,
        "averaged_minus_final_shuffled": {"mean": float(np.mean(gap)), "sd": float(np.std(gap, ddof=1))},
    }
    print(write_results("bn_recalibration", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
