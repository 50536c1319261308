"""Bytes on disk of exported models and export time, for ResNet-20, WRN-22-2 and CIFAR
ResNet-50 at density 0.1 and 0.05 (ERK masks; sizes depend on the masks, not on training).

Per model: dense safetensors, packed fp32, packed fp16, dense ONNX, sparse (packed) ONNX, and
the formula 4 x nnz + numel / 8 + dense tensors x 4. Goals: packed fp32 <= 1.02x the formula;
sparse ONNX <= 0.25x dense ONNX at density 0.1.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR_ARCHIVE, write_results

from cigl.data import extract_archive_subset
from cigl.export import cli, onnx_export
from cigl.testing import fake_model_file


def export(args: list[str]) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(args)
    return time.perf_counter() - t0


def measure(arch: str, density: float, root: Path, check: Path) -> dict:
    src = root / f"{arch}-{density}" / "model.pt"
    model, masks = fake_model_file(src, arch, density=density)
    state = model.state_dict()
    formula = sum(
        4 * int(masks[n].sum()) + math.ceil(t.numel() / 8)
        if n in masks and not masks[n].all()
        else t.numel() * t.element_size()
        for n, t in state.items()
    )
    sizes = {}
    for label, extra in (("dense_safetensors", ["--dense", "--no-onnx"]), ("packed_fp16", ["--fp16", "--no-onnx"])):
        export([str(src), "--out", str(src.parent / label), *extra])
        sizes[label] = (src.parent / label / "model.safetensors").stat().st_size
    seconds = export([str(src), "--out", str(src.parent / "packed"), "--check-data", str(check)])
    sizes["packed_fp32"] = (src.parent / "packed" / "model.safetensors").stat().st_size
    sizes["sparse_onnx"] = (src.parent / "packed" / "model.onnx").stat().st_size
    dense_onnx = onnx_export.torch_to_onnx(model.eval(), 1.0, (3, 32, 32), 18)
    sizes["dense_onnx"] = len(dense_onnx.SerializeToString())
    return {
        "model": arch,
        "density": density,
        "elements": sum(t.numel() for t in state.values()),
        "nonzeros_masked": int(sum(m.sum() for m in masks.values())),
        "formula_bytes": formula,
        **sizes,
        "packed_vs_formula": sizes["packed_fp32"] / formula,
        "sparse_onnx_vs_dense_onnx": sizes["sparse_onnx"] / sizes["dense_onnx"],
        "export_seconds": seconds,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        check = extract_archive_subset(CIFAR_ARCHIVE, Path(tmp) / "check", {"test": 10}) / "test"
        for arch in ("resnet20", "wrn22_2", "resnet50"):
            for density in (0.1, 0.05):
                rows.append(measure(arch, density, Path(tmp), check))
                r = rows[-1]
                print(
                    f"{arch:>9} d={density}: dense {r['dense_safetensors']:>11,}  packed {r['packed_fp32']:>10,} "
                    f"({r['packed_vs_formula']:.4f}x formula)  fp16 {r['packed_fp16']:>10,}  "
                    f"onnx dense {r['dense_onnx']:>11,} sparse {r['sparse_onnx']:>10,} "
                    f"({r['sparse_onnx_vs_dense_onnx']:.3f}x)  export {r['export_seconds']:.1f}s"
                )
    print(
        write_results(
            "export_size",
            {"rows": rows, "goals": {"packed_vs_formula": 1.02, "sparse_onnx_vs_dense_onnx_at_0.1": 0.25}},
        )
    )


if __name__ == "__main__":
    main()
