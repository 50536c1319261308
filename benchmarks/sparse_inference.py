"""cigl's sparse CPU engine against onnxruntime, side by side in one process.

For ResNet-20, WRN-22-2 and CIFAR ResNet-18 with ERK masks (the RigL/CigL allocation) at density
0.1 and 0.05, batch 64 and batch 1, fp32, all cores:
  - dense onnxruntime: the same architecture exported dense (the baseline of every ratio),
  - onnxruntime on the sparse model (it densifies the weights at load),
  - the sparse engine, and what --engine auto picks.
Speed does not depend on the weights' values, so the models are untrained (cigl.testing).
onnxruntime's threads never spin; the engines run in turn, one run each per round (in a fresh
seeded order, each round opened by an untimed run: serve.engines.time_in_turn), and the
median of the rounds is reported, so drift in this shared machine's speed reaches all alike.
Also written: the per-step profile of each sparse model, the FLOP-reduction limit (dense /
sparse multiply-adds) and the weight bytes held.
Goals (issue 18): >= 2.5x at density 0.1, >= 3.5x at 0.05 (batch 64); >= 1.3x at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
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
PAUSE = 0.2  # seconds between rounds


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


def bench_model(root: Path, arch: str, dense_ort: OnnxRuntime, dense_macs: float) -> list[dict]:
    rows = []
    for density in DENSITIES:
        model = export(root, arch, density)
        sparse_ort = OnnxRuntime(model, device="cpu", threads=0, source=arch)
        engine = SparseEngine(model)
        auto = open_engine(model, engine="auto", device="cpu")
        profile = engine.profile(np.zeros((64, 3, 32, 32), np.float32))
        sparse_macs = sum(p["macs_per_image"] for p in profile)
        engines = {"dense": dense_ort, "ort": sparse_ort, "engine": engine, "auto": auto}
        for batch in (64, 1):
            x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            t = time_in_turn(engines, x, rounds=40 if batch == 1 else 9, pause=PAUSE)
            t_dense, t_ort, t_engine, t_auto = t["dense"], t["ort"], t["engine"], t["auto"]
            rows.append(
                {
                    "arch": arch,
                    "density": density,
                    "batch": batch,
                    "dense_onnxruntime_ms": 1000 * t_dense,
                    "onnxruntime_on_sparse_ms": 1000 * t_ort,
                    "engine_ms": 1000 * t_engine,
                    "auto_ms": 1000 * t_auto,
                    "auto_picks": picked(auto, batch),
                    "engine_vs_dense_onnxruntime": t_dense / t_engine,
                    "engine_vs_onnxruntime_on_sparse": t_ort / t_engine,
                    "auto_vs_dense_onnxruntime": t_dense / t_auto,
                    "flop_reduction_limit": dense_macs / sparse_macs,
                    "engine_gmacs_per_s": sparse_macs * batch / t_engine / 1e9,
                }
            )
            print(
                f"{arch:9s} density {density:<5} batch {batch:2d}: dense ORT {1000 * t_dense:7.2f} ms, "
                f"ORT on sparse {1000 * t_ort:7.2f} ms, engine {1000 * t_engine:7.2f} ms "
                f"({t_dense / t_engine:.2f}x; limit {dense_macs / sparse_macs:.1f}x), auto {rows[-1]['auto_picks']}",
                flush=True,
            )
        rows[-1]["profile_batch64"] = profile
        rows[-1].update(weight_bytes(engine))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.archs:
            dense = export(root, arch, 1.0)
            profile = SparseEngine(dense).profile(np.zeros((1, 3, 32, 32), np.float32))
            dense_macs = sum(p["macs_per_image"] for p in profile)
            rows += bench_model(root, arch, OnnxRuntime(dense, device="cpu", threads=0, source=arch), dense_macs)
    path = write_results("sparse_inference", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
