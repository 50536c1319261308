"""Images/s of a dense ResNet-20 training step at batch 128 (CPU, and CUDA when present), and
the share of the step spent in data loading + augmentation (goal < 5%).

On CUDA also as the trainer runs it there: the step, batch pipeline included, replayed as one
CUDA graph, timed against the same graph on a fixed batch; the difference is what data costs.

Uses the training loop's own pieces (cigl.pipeline and cigl.train.train_step)
on real CIFAR-10 images from ../shared/data.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, write_results

from cigl.data import extract_archive_subset, load_image_folder
from cigl.models import create_model
from cigl.pipeline import augment, epoch_order, normalize, to_device
from cigl.train import train_step
from cigl.train.graphed import GraphedStep, graph_autocast

BATCH, WARMUP, STEPS = 128, 3, 20
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def measure(device: torch.device, split) -> dict:
    cuda = device.type == "cuda"
    x_all, y_all = to_device(split, device)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    order = epoch_order(x_all.shape[0], 0, 0, device)
    data_t = step_t = 0.0
    for i in range(WARMUP + STEPS):
        idx = order[(i * BATCH) % (x_all.shape[0] - BATCH) :][:BATCH]
        sync()
        t0 = time.perf_counter()
        x = normalize(augment(x_all[idx], 4, True), MEAN, STD)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y_all[idx]
        sync()
        t1 = time.perf_counter()
        train_step(model, opt, None, x, y, i, amp)
        sync()
        t2 = time.perf_counter()
        if i >= WARMUP:
            data_t += t1 - t0
            step_t += t2 - t1
    total = data_t + step_t
    return {
        "device": str(device),
        "images_per_s": STEPS * BATCH / total,
        "step_ms": 1000 * total / STEPS,
        "data_ms": 1000 * data_t / STEPS,
        "data_share": data_t / total,
    }


def measure_graphed(split) -> dict:
    """CUDA: replays of the whole step with the batch pipeline inside the graph and of the same
    step on a fixed batch, interleaved; data's share = 1 - fixed / with data (medians)."""
    x_all, y_all = to_device(split, torch.device("cuda"))
    order = epoch_order(x_all.shape[0], 0, 0, x_all.device)

    def batch(idx):
        return normalize(augment(x_all[idx], 4, True), MEAN, STD).contiguous(memory_format=torch.channels_last)

    steps = {}
    for with_data in (True, False):
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        fixed = batch(order[:BATCH])

        def body(idx, o, i, model=model, fixed=fixed, with_data=with_data):
            return train_step(model, o, None, batch(idx) if with_data else fixed, y_all[idx], i, graph_autocast)

        steps[with_data] = (GraphedStep(body, opt, BATCH), body, opt)

    def timed(with_data: bool, i: int) -> float:
        graph, body, opt = steps[with_data]
        idx = order[(i * BATCH) % (x_all.shape[0] - BATCH) :][:BATCH]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if graph.step(idx, 0.1, i) is None:
            body(idx, opt, i)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {True: [], False: []}
    for i in range(WARMUP + 2 + STEPS):
        for with_data in (True, False):
            t = timed(with_data, i)
            if i >= WARMUP + 2:
                times[with_data].append(t)
    if any(s[0].graph is None for s in steps.values()):
        raise RuntimeError("the step could not be captured as a CUDA graph")
    full, fixed = statistics.median(times[True]), statistics.median(times[False])
    return {
        "device": "cuda (CUDA graph)",
        "images_per_s": BATCH / full,
        "step_ms": 1000 * full,
        "data_ms": 1000 * (full - fixed),
        "data_share": (full - fixed) / full,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_archive_subset(CIFAR_ARCHIVE, tmp, {"train": 128})
        split, _ = load_image_folder(root / "train")
    results = {
        "model": "resnet20",
        "batch": BATCH,
        "steps": STEPS,
        "runs": [measure(torch.device("cpu"), split)],
    }
    if torch.cuda.is_available():
        results["runs"] += [measure(torch.device("cuda"), split), measure_graphed(split)]
    results["goal"] = {"data_share": 0.05}
    print(write_results("train_step", results))
    for r in results["runs"]:
        print(
            f"{r['device']}: {r['images_per_s']:.0f} images/s, step {r['step_ms']:.1f} ms, "
            f"data+augmentation {r['data_ms']:.2f} ms ({100 * r['data_share']:.2f}%)"
        )


if __name__ == "__main__":
    main()
