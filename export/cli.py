"""`cigl-export RUN/model.pt`: packed safetensors + ONNX with the model card, checked at export.

`cigl-export --inspect FILE` prints the per-tensor table of an existing .safetensors or .onnx.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from cigl.errors import ArgumentParser, FormatError, InputError, cli_entry
from cigl.export import onnx_export, packed, save
from cigl.images import MAX_SIDE, PREPROCESS
from cigl.io import atomic_open, check_output_dir, load_torch_file, make_output_dir
from cigl.train import MODEL_FORMAT

CHECK_IMAGES = 256
# ONNX must reproduce torch's logits to 1e-4 of their scale: max |diff| <= 1e-4 * max(1, max |logit|).
# float32 kernels differ in summation order, so the absolute error grows with the logits' size.
LOGIT_RTOL = 1e-4
MAX_CLASSES = 100_000
MAX_OPSET = 23  # the newest opset torch.onnx exports and onnxruntime runs


# --------------------------------------------------------------------------- model card


def model_card(ckpt: dict) -> dict[str, str]:
    """String metadata for both files: architecture, inputs, classes, method, densities,
    temperature and the training run's test metrics."""
    cfg, summary, kw = ckpt.get("config", {}), ckpt.get("summary", {}), ckpt["model_kwargs"]
    layers = {r["name"]: round(r["density"], 6) for r in summary.get("layers", [])}
    settings = {
        k: cfg.get(k)
        for k in (
            "density",
            "sparse_init",
            "dpnum",
            "avg_start",
            "drop_fraction",
            "update_every",
            "update_end",
            "epochs",
            "seed",
            "dataset",
        )
        if k in cfg
    }
    test = summary.get("test", {})
    card = {
        "arch": ckpt["arch"],
        "model_kwargs": kw,
        "num_classes": kw["num_classes"],
        "input_size": [kw["in_chans"], kw["image_size"], kw["image_size"]],
        "preprocess": PREPROCESS,
        "mean": ckpt["mean"],
        "std": ckpt["std"],
        "classes": ckpt["classes"],
        "method": ckpt.get("method", "unknown"),
        "method_settings": settings,
        "product": summary.get("product", "final_weights"),
        "mask_updates": summary.get("mask_updates", 0),
        "target_density": summary.get("target_density", cfg.get("density", 1.0)),
        "actual_density": summary.get("actual_density", 1.0),
        "layer_density": layers,
        "temperature": ckpt.get("temperature", 1.0),
        "test_accuracy": test.get("acc"),
        "test_ece": test.get("ece"),
        "test_nll": test.get("nll"),
        "test_calibrated": summary.get("test_calibrated", {}),
    }
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in card.items()}


def load_run_model(path: Path) -> tuple[dict, torch.nn.Module]:
    """model.pt (weights_only) -> (checkpoint dict, model with its weights) or a one-line error."""
    from cigl.models import create_model

    ckpt = load_torch_file(path, MODEL_FORMAT, "cigl model file (model.pt)")
    missing = [k for k in ("arch", "model_kwargs", "state_dict", "masks", "classes", "mean", "std") if k not in ckpt]
    if missing:
        raise FormatError(f"{path} lacks {', '.join(missing)}; export a model.pt written by cigl-train")
    problem = model_file_problem(ckpt)
    if problem:
        raise FormatError(f"{path}: {problem}; export a model.pt written by cigl-train")
    packed.check_finite(ckpt["state_dict"], str(path))  # before the ONNX export, which comes first
    try:
        model = create_model(ckpt["arch"], **ckpt["model_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: weights do not fit {ckpt['arch']} ({first[:200]})") from None
    return ckpt, model.eval()


def model_file_problem(ckpt: dict) -> str | None:
    """What makes a loaded model.pt unusable (wrong types, sizes out of bounds, classes that do
    not match the outputs, masks that do not match their tensors), or None."""
    kw, state, masks = ckpt["model_kwargs"], ckpt["state_dict"], ckpt["masks"]
    if not isinstance(ckpt["arch"], str) or not isinstance(kw, dict) or not isinstance(state, dict):
        return "arch must be a name, model_kwargs and state_dict dictionaries"
    ints = {k: kw.get(k) for k in ("num_classes", "in_chans", "image_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        return f"model_kwargs needs integer num_classes, in_chans and image_size, got {ints}"
    if not (1 <= ints["num_classes"] <= MAX_CLASSES and ints["in_chans"] in (1, 3)):
        return f"model_kwargs out of range: {ints} (1..{MAX_CLASSES} classes, 1 or 3 channels)"
    if not 1 <= ints["image_size"] <= MAX_SIDE:
        return f"image_size {ints['image_size']} is outside 1..{MAX_SIDE}"
    classes = ckpt["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of class names"
    if len(classes) != ints["num_classes"]:
        return f"{len(classes)} class names for {ints['num_classes']} outputs"
    for key in ("mean", "std"):
        values = ckpt[key]
        if not isinstance(values, list | tuple) or len(values) != ints["in_chans"]:
            return f"{key} needs one number per channel ({ints['in_chans']})"
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values) or (
            key == "std" and min(values) <= 0
        ):
            return f"{key} must hold finite numbers (std > 0), got {values}"
    temperature = ckpt.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        return f"temperature must be a finite number > 0, got {temperature!r}"
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return f"state_dict entries that are not tensors: {', '.join(map(str, bad[:3]))}"
    if not isinstance(masks, dict):
        return f"masks must be a dictionary of boolean tensors, got {type(masks).__name__}"
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or name not in state:
            return f"mask {name!r} is not a boolean tensor of a state_dict entry"
        if mask.shape != state[name].shape:
            return f"mask of {name} has shape {tuple(mask.shape)}, the tensor {tuple(state[name].shape)}"
        if state[name][~mask].any():
            return f"{name} has nonzero weights outside its mask (the file is inconsistent)"
    return None


def check_images(ckpt: dict, check_data: str | None) -> torch.Tensor:
    """Normalised float images to compare ORT with torch: --check-data (ImageFolder) or the
    run's own test split."""
    from cigl.data import load_dataset, load_image_folder
    from cigl.pipeline import normalize, to_device

    size = ckpt["model_kwargs"]["image_size"]
    if check_data:
        split, _ = load_image_folder(Path(check_data), size)
    else:
        cfg = ckpt.get("config", {})
        try:
            split = load_dataset(
                cfg.get("dataset", "digits"), cfg.get("data_dir"), val_size=0, image_size=cfg.get("image_size")
            ).test
        except InputError as exc:
            raise InputError(
                f"cannot load the run's test data to check the export ({exc}); pass --check-data DIR"
            ) from None
    if split.x.shape[3] != ckpt["model_kwargs"]["in_chans"]:
        raise InputError(
            f"check images have {split.x.shape[3]} channels, the model expects {ckpt['model_kwargs']['in_chans']}"
        )
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
    session = onnx_export.ort_session(data)
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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def print_table(rows: list[dict], totals: dict[str, float]) -> None:
    """Weight tensors one per line; biases, norms and buffers summed in one line; then totals."""
    weights = [r for r in rows if len(r["shape"]) >= 2]
    others = [r for r in rows if len(r["shape"]) < 2]
    width = max([len(r["name"]) for r in weights] + [24])
    print(f"{'tensor':<{width}}  {'shape':<16} {'density':>8} {'stored':>7} {'bytes':>12}")
    if others:
        weights.append(
            {
                "name": f"other ({len(others)} tensors)",
                "shape": [],
                "numel": sum(r["numel"] for r in others),
                "nnz": sum(r["nnz"] for r in others),
                "stored": "dense",
                "bytes": sum(r["bytes"] for r in others),
            }
        )
    for r in weights:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['name']:<{width}}  {shape:<16} {r['nnz'] / max(r['numel'], 1):>8.4f} {r['stored']:>7} "
            f"{r['bytes']:>12,}"
        )
    print(
        f"elements {totals['parameters']:,}   nonzeros {totals['nonzeros']:,} "
        f"(density {totals['nonzeros'] / max(totals['parameters'], 1):.4f})"
    )
    for key in ("dense_fp32", "packed", "onnx"):
        if key in totals:
            print(f"  {key.replace('_', ' '):<11} {_fmt_bytes(totals[key]):>12}")
    if "packed" in totals:
        print(f"  compression {totals['dense_fp32'] / totals['packed']:.2f}x (dense fp32 / packed)")


def safetensors_rows(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> list[dict]:
    rows = []
    for name, t in tensors.items():
        if name.endswith((packed.VALUES, packed.MASK)):
            continue
        rows.append(
            {
                "name": name,
                "shape": list(t.shape),
                "numel": t.numel(),
                "nnz": int((t != 0).sum()),
                "stored": "dense",
                "bytes": t.numel() * t.element_size(),
            }
        )
    for name, shape in shapes.items():
        values, mask = tensors[name + packed.VALUES], tensors[name + packed.MASK]
        rows.append(
            {
                "name": name,
                "shape": shape,
                "numel": math.prod(shape),
                "nnz": values.numel(),
                "stored": "packed",
                "bytes": values.numel() * values.element_size() + mask.numel(),
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def inspect(path: Path) -> None:
    """Print the metadata and per-tensor table of an exported file. Whatever the file holds, the
    outcome is the table or a FormatError: its metadata is checked, never trusted."""
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
    numel = sum(r["numel"] for r in rows)
    print_table(
        rows,
        {
            "parameters": numel,
            "nonzeros": sum(r["nnz"] for r in rows),
            "dense_fp32": 4 * numel,
            ("onnx" if path.suffix == ".onnx" else "packed"): path.stat().st_size,
        },
    )


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
            if name.endswith("::values"):
                base = name[: -len("::values")]
                shape = inits[base + "::shape"].tolist()
                rows.append(
                    {
                        "name": base,
                        "shape": shape,
                        "numel": math.prod(shape),
                        "nnz": arr.size,
                        "stored": "packed",
                        "bytes": arr.nbytes + inits[base + "::mask"].nbytes,
                    }
                )
            elif arr.dtype == np.float32 and arr.ndim >= 2:
                rows.append(
                    {
                        "name": name,
                        "shape": list(arr.shape),
                        "numel": arr.size,
                        "nnz": int((arr != 0).sum()),
                        "stored": "dense",
                        "bytes": arr.nbytes,
                    }
                )
    return rows, meta


# --------------------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cigl-export",
        description="Export a trained run's model.pt to packed safetensors "
        "and ONNX (with sparsity and calibration metadata), or --inspect an exported file.",
    )
    p.add_argument("model", nargs="?", help="RUN/model.pt written by cigl-train")
    p.add_argument("--out", help="output folder (default: next to model.pt)")
    p.add_argument("--fp16", action="store_true", help="store packed values as float16")
    p.add_argument("--dense", action="store_true", help="plain tensors that timm's load_state_dict accepts")
    p.add_argument("--no-onnx", action="store_true", help="write only model.safetensors")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument(
        "--check-data", help="ImageFolder of images to compare ONNX with torch (default: the run's test set)"
    )
    p.add_argument("--inspect", metavar="FILE", help="print the table of an existing .safetensors or .onnx")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inspect:
        inspect(Path(args.inspect))
        return 0
    if not args.model:
        raise InputError("give RUN/model.pt to export, or --inspect FILE")
    if not 17 <= args.opset <= MAX_OPSET:
        raise InputError(f"--opset must be >= 17 and <= {MAX_OPSET}, got {args.opset}")
    src = Path(args.model)
    out = check_output_dir(Path(args.out) if args.out else src.parent)
    ckpt, model = load_run_model(src)
    card = model_card(ckpt)
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
    rows = safetensors_rows(tensors, packed.shapes_of(meta))
    numel = sum(r["numel"] for r in rows)
    totals = {
        "parameters": numel,
        "nonzeros": sum(r["nnz"] for r in rows),
        "dense_fp32": 4 * numel,
        "packed": st_path.stat().st_size,
    }
    if onnx_data is not None:
        totals["onnx"] = len(onnx_data)
        dense_onnx = [r["name"] for r in onnx_rows if r["stored"] == "dense" and r["nnz"] < r["numel"]]
        if dense_onnx:
            print(f"note: kept dense in ONNX (packing would not save >10%): {', '.join(dense_onnx)}")
    print_table(rows, totals)
    print(f"wrote {st_path}" + (f" and {out / 'model.onnx'}" if onnx_data is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
