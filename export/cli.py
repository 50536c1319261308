"""`cigl-export RUN/model.pt`: packed safetensors + ONNX with the model card, checked at export.

`cigl-export --inspect FILE` prints the per-tensor table of an existing .safetensors or .onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cigl import packing
from cigl.card import write_card
from cigl.errors import ArgumentParser, FormatError, InputError, cli_entry
from cigl.export import onnx_export, packed, save
from cigl.io import atomic_open, check_output_dir, make_output_dir
from cigl.runfiles import load_model_file, run_file
from cigl.serve.session import open_session
from cigl.tables import format_bytes, format_table, tensor_row

CHECK_IMAGES = 256
# ONNX must reproduce torch's logits to 1e-4 of their scale: max |diff| <= 1e-4 * max(1, max |logit|).
# float32 kernels differ in summation order, so the absolute error grows with the logits' size.
LOGIT_RTOL = 1e-4
MAX_OPSET = 23  # the newest opset torch.onnx exports and onnxruntime runs


# --------------------------------------------------------------------------- loading and checking


def load_run_model(path: Path) -> tuple[dict, torch.nn.Module]:
    """model.pt (cigl.runfiles) -> (its contents, the model with its weights) or a one-line error."""
    from cigl.models import create_model

    model_file = load_model_file(path)
    packed.check_finite(model_file["state_dict"], str(path))  # before the ONNX export, which comes first
    try:
        model = create_model(model_file["arch"], **model_file["model_kwargs"])
        model.load_state_dict(model_file["state_dict"])
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: weights do not fit {model_file['arch']} ({first[:200]})") from None
    return model_file, model.eval()


def check_images(ckpt: dict, check_data: str | None) -> torch.Tensor:
    """Normalised float images to compare ORT with torch: --check-data (ImageFolder) or the
    run's own test split."""
    from cigl.data import Split, load_dataset, load_image_folder, test_folder
    from cigl.images import convert_channels
    from cigl.pipeline import normalize, to_device

    size = ckpt["model_kwargs"]["image_size"]
    if check_data:
        split, _ = load_image_folder(test_folder(Path(check_data)), size)
    else:
        cfg = ckpt.get("config", {})
        try:
            split = load_dataset(cfg.get("dataset", "digits"), cfg.get("data_dir"), val_size=0, image_size=size).test
        except InputError as exc:
            raise InputError(
                f"cannot load the run's test data to check the export ({exc}); pass --check-data DIR"
            ) from None
    split = Split(convert_channels(split.x, ckpt["model_kwargs"]["in_chans"]), split.y)  # as cigl-predict would
    x, _ = to_device(split, torch.device("cpu"))
    # spread over the split: a test split stored class by class would otherwise check few classes
    pick = torch.from_numpy(np.unique(np.linspace(0, len(x) - 1, min(CHECK_IMAGES, len(x))).round().astype(np.int64)))
    return normalize(x[pick], ckpt["mean"], ckpt["std"])


def onnx_bytes(model, ckpt: dict, card: dict[str, str], opset: int, images: torch.Tensor) -> tuple[bytes, list[dict]]:
    """Export, pack, check (onnx.checker, then ORT vs torch on real images) and serialise."""
    import onnx

    kw = ckpt["model_kwargs"]
    proto = onnx_export.torch_to_onnx(
        model, float(ckpt.get("temperature", 1.0)), (kw["in_chans"], kw["image_size"], kw["image_size"]), opset
    )
    rows = onnx_export.pack_initializers(proto)
    for key, value in sorted(card.items()):
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    session = open_session(data, threads=1, source="the exported ONNX model")
    ort_logits, ort_probs = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = model(images).numpy()
    parity_problem = logits_mismatch(ort_logits, ref)
    if parity_problem:
        raise FormatError(f"ONNX export does not match torch ({parity_problem}); no file written")
    if not np.allclose(ort_probs.sum(1), 1.0, atol=1e-5):
        raise FormatError("ONNX probs do not sum to 1; no file written")
    return data, rows


def logits_mismatch(ours: np.ndarray, ref: np.ndarray) -> str | None:
    """Why ONNX logits `ours` differ from torch's `ref` beyond float32 rounding, or None: max
    |diff| must stay within LOGIT_RTOL of the logits' scale, and the top class may only differ
    where torch's two best logits are closer than that tolerance (a tie)."""
    scale = max(1.0, float(np.abs(ref).max()))
    tol = LOGIT_RTOL * scale
    diff = float(np.abs(ours - ref).max())
    if diff > tol:
        return f"max |logits diff| {diff:.2e} > {tol:.2e} = {LOGIT_RTOL:g} x the logits' scale {scale:.3g}"
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    flipped = (ours.argmax(1) != ref.argmax(1)) & (top2[:, 1] - top2[:, 0] > 2 * tol)
    if flipped.any():
        return f"the top class differs on {int(flipped.sum())} of {len(ref)} images"
    return None


# --------------------------------------------------------------------------- tables


def print_table(rows: list[dict], sizes: dict[str, int]) -> None:
    """The per-tensor table (biases, norms and buffers on one line), then the file sizes."""
    print(format_table(rows, title="tensor", group_small=True))
    numel, nnz = sum(r["numel"] for r in rows), sum(r["nnz"] for r in rows)
    print(f"elements {numel:,}   nonzeros {nnz:,} (density {nnz / max(numel, 1):.4f})")
    for key, size in {"dense fp32": 4 * numel, **sizes}.items():
        print(f"  {key:<11} {format_bytes(size):>12}")
    if "packed" in sizes:
        print(f"  compression {4 * numel / sizes['packed']:.2f}x (dense fp32 / packed)")


def safetensors_rows(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> list[dict]:
    """Per-tensor rows of a packed safetensors file (its tensors and its `packed` shapes)."""
    rows = [
        tensor_row(name, t.shape, int((t != 0).sum()), "dense", t.numel() * t.element_size())
        for name, t in tensors.items()
        if not name.endswith((packing.VALUES, packing.MASK))
    ]
    for name, shape in shapes.items():
        values, mask = tensors[name + packing.VALUES], tensors[name + packing.MASK]
        rows.append(
            tensor_row(name, shape, values.numel(), "packed", values.numel() * values.element_size() + mask.numel())
        )
    return sorted(rows, key=lambda r: r["name"])


def inspect(path: Path) -> None:
    """Print the metadata and per-tensor table of an exported file. Whatever the file holds, the
    outcome is the table or a FormatError: its metadata is checked, never trusted. A run
    directory stands for its model.safetensors."""
    path = run_file(path, "model.safetensors")
    if path.is_dir():
        fix = f"cigl-export {path / 'model.pt'} writes it" if (path / "model.pt").is_file() else "pass an exported file"
        raise InputError(f"{path} is a folder without a model.safetensors; {fix}")
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    if path.suffix not in (".safetensors", ".onnx"):
        raise InputError(f"{path}: --inspect reads .safetensors or .onnx files")
    if path.stat().st_size == 0:
        raise FormatError(f"{path} is empty (0 bytes); export the model again")
    try:
        rows, meta = _inspect_rows(path)
    except FormatError as exc:
        raise FormatError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise FormatError(f"{path} has malformed cigl metadata or tensors ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise FormatError(f"{path} holds no weight tensors; it is not a model exported by cigl-export")
    for key in ("arch", "method", "target_density", "actual_density", "temperature", "test_accuracy", "test_ece"):
        if key in meta:
            print(f"{key}: {meta[key]}")
    print_table(rows, {("onnx" if path.suffix == ".onnx" else "packed"): path.stat().st_size})


def _inspect_rows(path: Path) -> tuple[list[dict], dict[str, str]]:
    """(per-tensor rows, metadata) of a .safetensors or .onnx file."""
    if path.suffix == ".safetensors":
        tensors, meta = packed.read(path)
        rows = safetensors_rows(tensors, packed.shapes_of(meta))
    elif path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise FormatError(f"{path} is not a valid ONNX file ({type(exc).__name__})") from None
        if any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
            raise FormatError(f"{path} keeps weights in external data files; cigl reads single-file ONNX only")
        meta = {p.key: p.value for p in proto.metadata_props}
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        rows = []
        for name, arr in inits.items():
            if name.endswith(packing.VALUES):
                base = name[: -len(packing.VALUES)]
                nbytes = arr.nbytes + inits[base + packing.MASK].nbytes
                rows.append(tensor_row(base, inits[base + packing.SHAPE].tolist(), arr.size, "packed", nbytes))
            elif arr.dtype == np.float32 and arr.ndim >= 2:
                rows.append(tensor_row(name, arr.shape, int((arr != 0).sum()), "dense", arr.nbytes))
    return rows, meta


# --------------------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cigl-export",
        description="Export a trained run's model.pt to packed safetensors "
        "and ONNX (with sparsity and calibration metadata), or --inspect an exported file.",
        examples=[
            "cigl-export runs/demo-cigl/model.pt                 # model.safetensors + model.onnx beside it",
            "cigl-export runs/demo-cigl/model.pt --fp16 --no-onnx --out exported/",
            "cigl-export --inspect runs/demo-cigl/model.onnx | head",
        ],
    )
    p.add_argument("model", nargs="?", help="RUN/model.pt written by cigl-train")
    p.add_argument("--out", help="output folder (default: next to model.pt)")
    p.add_argument("--fp16", action="store_true", help="store packed values as float16")
    p.add_argument("--dense", action="store_true", help="plain tensors that timm's load_state_dict accepts")
    p.add_argument("--no-onnx", action="store_true", help="write only model.safetensors")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument(
        "--check-data",
        help="class folders of images to compare ONNX with torch, or a dataset folder (its test/) "
        "(default: the run's test set)",
    )
    p.add_argument(
        "--inspect", metavar="FILE", help="print the table of an existing .safetensors or .onnx (or of a run folder)"
    )
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inspect:
        inspect(Path(args.inspect))
        return 0
    if not args.model:
        raise InputError("give RUN/model.pt to export, or --inspect FILE")
    if args.fp16 and args.dense:
        raise InputError("--fp16 stores packed values as float16 and --dense packs nothing: drop one of them")
    if not 17 <= args.opset <= MAX_OPSET:
        raise InputError(f"--opset must be >= 17 and <= {MAX_OPSET}, got {args.opset}")
    src = run_file(Path(args.model), "model.pt")
    out = check_output_dir(Path(args.out) if args.out else src.parent)
    ckpt, model = load_run_model(src)
    card = write_card(ckpt)
    masks = {} if args.dense else ckpt["masks"]
    onnx_data, onnx_rows = None, []
    if not args.no_onnx:  # everything is checked before the first file is written
        onnx_data, onnx_rows = onnx_bytes(model, ckpt, card, args.opset, check_images(ckpt, args.check_data))
    st_path = make_output_dir(out) / "model.safetensors"
    save(ckpt["state_dict"], st_path, masks=masks, metadata=card, fp16=args.fp16)
    if onnx_data is not None:
        with atomic_open(out / "model.onnx") as f:
            f.write(onnx_data)
    tensors, meta = packed.read(st_path)
    sizes = {"packed": st_path.stat().st_size}
    if onnx_data is not None:
        sizes["onnx"] = len(onnx_data)
        dense_onnx = [r["name"] for r in onnx_rows if r["stored"] == "dense" and r["nnz"] < r["numel"]]
        if dense_onnx:
            print(f"note: kept dense in ONNX (packing would not save >10%): {', '.join(dense_onnx)}")
    print_table(safetensors_rows(tensors, packed.shapes_of(meta)), sizes)
    print(f"wrote {st_path}" + (f" and {out / 'model.onnx'}" if onnx_data is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
