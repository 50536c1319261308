"""What sparse training costs on top of dense training, measured side by side in one process.

1. Sparse bookkeeping per step for CIFAR ResNet-50 masks at density 0.1 with the random mask
   (DPNUM 100): cigl's Masking (sample the dropped set in O(nnz/DPNUM) as one index list over
   all layers and zero it in place, mask the gradients in one in-place pass, restore the
   dropped weights) against a
   reference-style loop per parameter (full-size uniform random mask, clone, multiply, restore,
   re-apply the mask). Goal: >= 10x faster.
2. CigL step time / dense step time, ResNet-20, batch 128, on CPU. Goal: <= 1.03.
3. On CUDA (when present): the same ratio for CIFAR ResNet-50 at batch 128, eager and with the
   step replayed as a CUDA graph (what the trainer does). Goal: <= 1.02.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, write_results

from cigl.models import create_model
from cigl.sparse import METHODS, Masking
from cigl.train import train_step
from cigl.train.graphed import UPDATE_WARMUP, GraphedStep, graph_autocast

DPNUM = 100


def reference_bookkeeping(params: dict, masks: dict, scale: float) -> None:
    """One step of the reference's random-mask handling, a Python loop over parameters."""
    saved = {}
    keep = {}
    for name, w in params.items():  # before the forward pass
        keep[name] = torch.rand_like(w) >= 1.0 / DPNUM
        saved[name] = w.detach().clone()
        w.data.mul_(masks[name] * keep[name] * scale)
    for name, w in params.items():  # after the optimiser step: restore dropped, re-apply mask
        w.data.copy_(torch.where(keep[name], w.data / scale, saved[name]))
        w.data.mul_(masks[name])


def cigl_bookkeeping(masking: Masking) -> None:
    masking.begin_step()
    masking.mask_gradients()
    masking.end_step()


def bookkeeping(device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=10, image_size=32).to(device)
    masking = Masking(model, METHODS["rigl"], density=0.1, dpnum=DPNUM, update_until=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    masks = {n: m.float() for n, m in masking.masks.items()}
    for p in masking.params.values():  # gradients as a backward pass leaves them
        p.grad = torch.randn_like(p)
    with torch.no_grad():
        ref = median_time(lambda: (reference_bookkeeping(masking.params, masks, masking.scale), sync()), 5)
        ours = median_time(lambda: (cigl_bookkeeping(masking), sync()), 20)
    return {
        "device": str(device),
        "model": "resnet50 (CIFAR stem)",
        "params_masked": sum(p.numel() for p in masking.params.values()),
        "reference_ms": 1000 * ref,
        "cigl_ms": 1000 * ours,
        "speedup": ref / ours,
        "goal_speedup": 10,
    }


def make_run(model_name: str, method: str, x: torch.Tensor, y: torch.Tensor, graphed: bool) -> tuple:
    """(model, optimiser, masking, GraphedStep or None) of a dense or CigL step on batch (x, y)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, image_size=32).to(x.device)
    if x.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    masking = None
    if method == "cigl":  # mask-update steps (every 100 steps) are timed separately
        masking = Masking(model, METHODS["rigl"], density=0.1, dpnum=DPNUM, update_every=10**9, update_until=10**9)
    if not graphed:
        return model, opt, masking, None
    return (
        model,
        opt,
        masking,
        GraphedStep(lambda _idx, o, s: train_step(model, o, masking, x, y, s, graph_autocast), opt, len(x)),
    )


def _scheduled_step(model, masking, x, y, _idx, optimizer, step) -> torch.Tensor:
    """The step a GraphedStep captures, its mask update's host part left to the replay's caller."""
    return train_step(model, optimizer, masking, x, y, step, graph_autocast, scheduled=True)


def update_seconds(model, opt, x, y, amp, graphed: bool) -> tuple[float, float]:
    """(the mask-update step, its drop and grow alone) in seconds, for a CigL masking of `model`:
    the step (dense gradient, drop and grow in every layer, no SGD) eager, or (graphed) replayed
    from a graph of its own after the host's part of the update, as the trainer does; the drop
    and grow alone on the gradient the last step left, eager."""
    cuda = x.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    idx = torch.arange(x.shape[0], device=x.device)
    upd = Masking(model, METHODS["rigl"], density=0.1, dpnum=DPNUM, update_every=1, update_until=10**9)
    graph = None
    if graphed:
        graph = GraphedStep(functools.partial(_scheduled_step, model, upd, x, y), opt, len(x), upd.schedule_update)

    def update_step() -> None:
        if graph is None or graph.step(idx, 0.01, 1, update=True) is None:
            train_step(model, opt, upd, x, y, 1, amp)

    if graph is not None:
        for _ in range(UPDATE_WARMUP + 1):  # eagerly, then the capture
            update_step()
        if True not in graph.graphs:
            raise RuntimeError("the mask-update step could not be captured as a CUDA graph")
    update_s = median_time(lambda: (update_step(), sync()), 5 if graphed else 3)
    return update_s, median_time(lambda: (upd.update(1, opt), sync()), 3)


def step_ratio(device: torch.device, model_name: str, pairs: int = 25, graphed: bool = False) -> dict:
    """Dense and CigL steps on the same batch, interleaved one by one (order alternating) so
    that machine noise hits both alike; the ratio is the median of the per-pair ratios.
    `graphed`: each step is replayed as a CUDA graph (cigl.train.graphed), as the trainer does."""
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    runs = {method: make_run(model_name, method, x, y, graphed) for method in ("dense", "cigl")}
    idx = torch.arange(128, device=device)

    def timed(method: str) -> float:
        model, opt, masking, graph = runs[method]
        sync()
        t0 = time.perf_counter()
        if graph is None or graph.step(idx, 0.01, 1) is None:
            train_step(model, opt, masking, x, y, 1, amp)
        sync()
        return time.perf_counter() - t0

    for method in runs:
        for _ in range(5):  # warm-up (and the capture)
            timed(method)
    times = {"dense": [], "cigl": []}
    for i in range(pairs):
        for method in ("dense", "cigl") if i % 2 == 0 else ("cigl", "dense"):
            times[method].append(timed(method))
    ratios = sorted(c / d for c, d in zip(times["cigl"], times["dense"], strict=True))
    med = {m: statistics.median(t) for m, t in times.items()}
    masking = runs["cigl"][2]
    if graphed and any(r[3].graph is None for r in runs.values()):
        raise RuntimeError("the step could not be captured as a CUDA graph")
    book = median_time(lambda: (masking.begin_step(), masking.mask_gradients(), masking.end_step(), sync()), 20)
    model, opt, *_ = runs["cigl"]
    update_s, drop_grow_s = update_seconds(model, opt, x, y, amp, graphed)
    ratio = ratios[len(ratios) // 2]
    return {
        "device": str(device),
        "model": model_name,
        "cuda_graph": graphed,
        "batch": 128,
        "pairs": pairs,
        "dense_step_ms": 1000 * med["dense"],
        "cigl_step_ms": 1000 * med["cigl"],
        "ratio": ratio,
        "ratio_quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]],
        "bookkeeping_ms": 1000 * book,
        "bookkeeping_share_of_dense_step": book / med["dense"],
        "update_step_ms": 1000 * update_s,
        "drop_and_grow_ms": 1000 * drop_grow_s,
        "ratio_with_updates_every_100": ratio + (update_s - med["cigl"]) / 100 / med["dense"],
    }


def main() -> None:
    cpu = torch.device("cpu")
    results = {
        "bookkeeping": [bookkeeping(cpu)],
        "step_ratio": [step_ratio(cpu, "resnet20")],
        "goals": {"bookkeeping_speedup": 10, "cpu_resnet20_ratio": 1.03, "cuda_resnet50_ratio": 1.02},
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        results["bookkeeping"].append(bookkeeping(gpu))
        results["step_ratio"] += [step_ratio(gpu, "resnet50"), step_ratio(gpu, "resnet50", graphed=True)]
    print(write_results("sparse_overhead", results))
    for b in results["bookkeeping"]:
        print(
            f"bookkeeping {b['device']}: reference {b['reference_ms']:.1f} ms, "
            f"cigl {b['cigl_ms']:.2f} ms, {b['speedup']:.1f}x"
        )
    for r in results["step_ratio"]:
        print(
            f"{r['model']} {r['device']}{' graphed' if r.get('cuda_graph') else ''}: "
            f"dense {r['dense_step_ms']:.1f} ms, cigl {r['cigl_step_ms']:.1f} ms, "
            f"ratio {r['ratio']:.3f} (quartiles {r['ratio_quartiles'][0]:.3f}-{r['ratio_quartiles'][1]:.3f}; "
            f"with updates {r['ratio_with_updates_every_100']:.3f}); bookkeeping {r['bookkeeping_ms']:.2f} ms "
            f"= {100 * r['bookkeeping_share_of_dense_step']:.2f}% of a dense step; update step "
            f"{r['update_step_ms']:.1f} ms, its drop and grow {r['drop_and_grow_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
