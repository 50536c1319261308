"""cigl's sparse CPU engine against onnxruntime, side by side in one process.

For ResNet-20, WRN-22-2 and CIFAR ResNet-18 with ERK masks (the RigL/CigL allocation) at density
0.1 and 0.05, batch 64 and batch 1, fp32, all cores:
  - dense onnxruntime: the same architecture exported dense (the baseline of every ratio),
  - onnxruntime on the sparse model (it densifies the weights at load),
  - the sparse engine, and what --engine auto picks.
Speed does not depend on the weights' values, so the models are untrained (cigl.testing).
onnxruntime's threads never spin; each of the last three runs in turn with dense onnxruntime, one
timed run each per round, in a fresh seeded order (serve.engines.time_in_turn): every timed run
comes right after an untimed one of its own engine (back to back, as in a busy server; auto
times batch 1 as lone requests instead, the sparse engine's worst case), at least SETTLE
seconds after the other engine's last run, whose spinning worker threads would take a core
from it (before, a dense onnxruntime run right after a sparse engine's lost one: batch-1
ResNet-18 at density 0.1 ran 6.1 ms instead of 3.6-4.0). The median of the rounds counts, so
drift in this shared machine's speed within a minute reaches both alike. Pairs, not all four in
one turn: a sparse engine run just before another keeps numba's worker thread awake for it.
The machine's speed also drifts from minute to minute, the sparse engine's more than onnxruntime's
(ResNet-20 at density 0.1: 2.0x to 2.7x in runs minutes apart), so --passes (default 3) times
every model that many times, one pass over all models after the other: a row reports each
engine's median time over the passes, the median of the passes' ratios, and every pass's ratio.
Also written: the per-step profile of each sparse model, the FLOP-reduction limit (dense /
sparse multiply-adds) and the weight bytes held.
Goals (issue 18): >= 2.5x at density 0.1, >= 3.5x at 0.05 (batch 64); >= 1.3x at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, write_results

from cigl.data import CIFAR10_CLASSES, extract_archive_subset
from cigl.export import cli
from cigl.serve.engines import SMALL_BATCH, Auto, OnnxRuntime, open_engine, time_in_turn
from cigl.serve.sparse_engine import SparseEngine
from cigl.testing import fake_model_file

ARCHS = ("resnet20", "wrn22_2", "resnet18")
DENSITIES = (0.1, 0.05)
BATCHES = (64, 1)
ROUNDS = {64: 9, 1: 40}  # timed rounds per pass (milliseconds each at batch 1: noise needs more)


def export(root: Path, arch: str, density: float) -> bytes:
    """model.onnx of an ERK-masked `arch` at `density`, exported (and checked) on real CIFAR-10 images."""
    check = root / "check" / "test"
    if not check.is_dir():
        extract_archive_subset(CIFAR_ARCHIVE, root / "check", {"test": 2})
    src = root / f"{arch}-{density}" / "model.pt"
    fake_model_file(src, arch, density=density, classes=list(CIFAR10_CLASSES))
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main([str(src), "--check-data", str(check)])
    return (src.parent / "model.onnx").read_bytes()


def weight_bytes(engine: SparseEngine) -> dict:
    """Bytes the engine holds for its layers (after running at 32x32), against their dense fp32 weights."""
    weights = [s.weight for s in engine.program.steps if s.weight is not None]
    return {"engine_bytes": engine.nbytes, "dense_fp32_bytes": sum(4 * int(np.prod(w.shape)) for w in weights)}


def picked(auto, batch: int) -> str:
    """The engine auto runs a batch on ("onnxruntime" when it kept onnxruntime without timing)."""
    if not isinstance(auto, Auto):
        return "onnxruntime"
    return auto.small if batch <= SMALL_BATCH else auto.large


@dataclass
class Case:
    """One sparse model and the engines timed on it (dense onnxruntime shared by its architecture)."""

    arch: str
    density: float
    engines: dict  # dense, ort (onnxruntime on the sparse model), engine, auto
    auto: object
    limit: float  # FLOP-reduction limit
    sparse_macs: float  # per image
    profile: list[dict]
    weight_bytes: dict


def prepare(root: Path, arch: str) -> list[Case]:
    """Export `arch` dense and at each density, open the engines and profile the sparse engine."""
    dense = export(root, arch, 1.0)
    dense_macs = sum(p["macs_per_image"] for p in SparseEngine(dense).profile(np.zeros((1, 3, 32, 32), np.float32)))
    dense_ort = OnnxRuntime(dense, device="cpu", threads=0, source=arch)
    cases = []
    for density in DENSITIES:
        model = export(root, arch, density)
        engine = SparseEngine(model)
        auto = open_engine(model, engine="auto", device="cpu")
        profile = engine.profile(np.zeros((64, 3, 32, 32), np.float32))
        sparse_macs = sum(p["macs_per_image"] for p in profile)
        ort = OnnxRuntime(model, device="cpu", threads=0, source=arch)
        engines = {"dense": dense_ort, "ort": ort, "engine": engine, "auto": auto}
        cases.append(
            Case(arch, density, engines, auto, dense_macs / sparse_macs, sparse_macs, profile, weight_bytes(engine))
        )
    return cases


PAIRED = ("ort", "engine", "auto")  # each timed in turn with dense onnxruntime


def time_pass(case: Case, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """name -> (dense onnxruntime's seconds, its seconds), each pair timed in turn on its own."""
    dense, rounds = case.engines["dense"], ROUNDS[len(x)]
    pairs = {name: time_in_turn({"dense": dense, name: case.engines[name]}, x, rounds) for name in PAIRED}
    return {name: (t["dense"], t[name]) for name, t in pairs.items()}


def summarise(case: Case, batch: int, passes: list[dict[str, tuple[float, float]]]) -> dict:
    """A results row: each engine's median time over the passes (dense onnxruntime's over its
    three pairings), and the ratios (medians of the passes' ratios, and the engine's ratio in
    every pass: how much the minute mattered)."""
    ms = {name: 1000 * statistics.median(t[name][1] for t in passes) for name in PAIRED}
    ms["dense"] = 1000 * statistics.median(t[name][0] for t in passes for name in PAIRED)
    ratios = {name: [t[name][0] / t[name][1] for t in passes] for name in PAIRED}
    ratio = {name: statistics.median(r) for name, r in ratios.items()}
    return {
        "arch": case.arch,
        "density": case.density,
        "batch": batch,
        "dense_onnxruntime_ms": ms["dense"],
        "onnxruntime_on_sparse_ms": ms["ort"],
        "engine_ms": ms["engine"],
        "auto_ms": ms["auto"],
        "auto_picks": picked(case.auto, batch),
        "engine_vs_dense_onnxruntime": ratio["engine"],
        "engine_vs_dense_onnxruntime_passes": ratios["engine"],
        "engine_vs_onnxruntime_on_sparse": ms["ort"] / ms["engine"],
        "auto_vs_dense_onnxruntime": ratio["auto"],
        "flop_reduction_limit": case.limit,
        "engine_gmacs_per_s": case.sparse_macs * batch / (ms["engine"] / 1000) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--passes", type=int, default=3, help="timing passes over all models (default 3)")
    args = parser.parse_args()
    if not 1 <= args.passes <= 20:
        parser.error("--passes must be 1..20")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [case for arch in args.archs for case in prepare(Path(tmp), arch)]
        times: dict[tuple[int, int], list[dict[str, tuple[float, float]]]] = {}
        for n in range(args.passes):  # passes minutes apart: this shared machine's speed drifts by the minute
            for i, case in enumerate(cases):
                for batch in BATCHES:
                    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
                    t = time_pass(case, x)
                    times.setdefault((i, batch), []).append(t)
                    (dense, ort), (base, engine) = t["ort"], t["engine"]
                    print(
                        f"pass {n + 1}: {case.arch:9s} density {case.density:<5} batch {batch:2d}: "
                        f"ORT on sparse {1000 * ort:7.2f} ms (dense {1000 * dense:7.2f}), "
                        f"engine {1000 * engine:7.2f} ms (dense {1000 * base:7.2f}; {base / engine:.2f}x, "
                        f"limit {case.limit:.1f}x), auto {picked(case.auto, batch)}",
                        flush=True,
                    )
    rows = []
    for i, case in enumerate(cases):
        rows += [summarise(case, batch, times[i, batch]) for batch in BATCHES]
        rows[-1] |= {"profile_batch64": case.profile, **case.weight_bytes}
    path = write_results("sparse_inference", {"passes": args.passes, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
