"""Training images/s for 1 vs several torchrun processes: CigL ResNet-20 on real CIFAR-10
images, global batch 128, the same machine split into processes (gloo on CPU; NCCL over the
GPUs when more than one is present).

Each configuration is a real `tools/train.py` run launched by torchrun; images/s comes from the
per-epoch times it writes to metrics.jsonl (epochs 2 and 3: no warm-up, no evaluation).
The ratio is against the single-process run of the same script on the same machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, write_results

from cigl.data import extract_archive_subset

ROOT = Path(__file__).resolve().parents[1]
BATCH, EPOCHS, PER_CLASS = 128, 4, 300


def run(data: Path, out: Path, procs: int, device: str, threads: int | None) -> dict:
    """images/s of one torchrun launch of `procs` processes, each with `threads` torch threads."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    cmd += [str(ROOT / "tools" / "train.py"), "--dataset", "cifar10", "--data-dir", str(data), "--method", "cigl"]
    cmd += ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--eval-every", str(EPOCHS), "--quiet"]
    cmd += ["--device", device, "--out", str(out)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torchrun's default for several processes is 1
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
    config = json.loads((out / "config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["time_s"] for r in rows[1 : EPOCHS - 1]]
    images = config["steps_per_epoch"] * BATCH
    return {
        "device": device,
        "processes": procs,
        "threads_per_process": threads or torch.get_num_threads(),
        "images_per_s": images * len(seconds) / sum(seconds),
        "epoch_s": seconds,
    }


def main() -> None:
    plans = [(1, "cpu", None), (1, "cpu", 1), (2, "cpu", 1)]
    if torch.cuda.device_count() > 1:
        plans += [(1, "cuda", None), (torch.cuda.device_count(), "cuda", None)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = extract_archive_subset(CIFAR_ARCHIVE, Path(tmp) / "cifar10", {"train": PER_CLASS, "test": 10})
        for i, (procs, device, threads) in enumerate(plans):
            runs.append(run(data, Path(tmp) / f"run{i}", procs, device, threads))
    for r in runs:
        alone = [b for b in runs if b["device"] == r["device"] and b["processes"] == 1]
        whole = alone[0]  # the whole machine in one process
        same_threads = next(b for b in alone if b["threads_per_process"] == r["threads_per_process"])
        r["vs_one_process"] = r["images_per_s"] / whole["images_per_s"]
        r["vs_one_process_same_threads"] = r["images_per_s"] / same_threads["images_per_s"]
    results = {"model": "resnet20", "method": "cigl", "global_batch": BATCH, "train_images_per_class": PER_CLASS}
    print(write_results("distributed", {**results, "runs": runs}))
    for r in runs:
        print(
            f"{r['device']} {r['processes']} process(es) x {r['threads_per_process']} thread(s): "
            f"{r['images_per_s']:.0f} images/s, {r['vs_one_process']:.2f}x one process"
        )


if __name__ == "__main__":
    main()
