"""The run directory, one contract: what cigl-train writes and export, audit and resume read.

    config.json      the resolved settings plus data facts (classes, sizes, steps)
    metrics.jsonl    one JSON object per finished epoch
    last.pt          the checkpoint to resume from (format "cigl-checkpoint")
    model.pt         the product: weights, masks, classes, normalisation, temperature
                     (format "cigl-model"; its fields are in docs/FORMAT.md)
    summary.json     the product's metrics and the per-layer densities
    predictions.npz  the product's test logits, labels and class names
    .lock            held (flock) by the cigl-train process writing the run; holds its process id

Every file is written atomically; torch files are loaded with weights_only=True and checked
field by field before anything uses them. torch is imported only by the functions that need it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np

from cigl.errors import CheckpointError, FormatError, InputError, writing
from cigl.images import MAX_SIDE
from cigl.io import (
    atomic_open,
    atomic_save_npz,
    atomic_torch_save,
    is_torch_file,
    load_torch_file,
    remove_stale_temps,
)

# what cigl-train writes into a run directory (the list above, less the lock)
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "model.pt", "summary.json", "predictions.npz")
CHECKPOINT_FORMAT = "cigl-checkpoint"
MODEL_FORMAT = "cigl-model"
FORMAT_VERSION = 1
MAX_CLASSES = 100_000
MODEL_KEYS = ("arch", "model_kwargs", "state_dict", "masks", "classes", "mean", "std")


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


# --------------------------------------------------------------------------- which file a user means


def run_file(path: Path, name: str) -> Path:
    """`path / name` when `path` is a run directory holding that file (cigl-export runs/x means
    runs/x/model.pt), else `path` unchanged."""
    return path / name if path.is_dir() and (path / name).is_file() else path


def exported_model(path: Path) -> Path:
    """The model.onnx a user means by `path`: the file, or a run directory's model.onnx; an
    InputError that names the fix for a folder without one (a run not exported yet) or a
    missing file."""
    path = run_file(path, "model.onnx")
    if path.is_dir():
        if (path / "model.pt").is_file():
            raise InputError(f"{path} holds no model.onnx yet; cigl-export {path / 'model.pt'} writes it")
        raise InputError(f"{path} is a folder without a model.onnx; pass an exported model.onnx")
    if not path.is_file():
        raise InputError(f"model not found: {path}")
    return path


def export_hint(path: Path) -> str | None:
    """For a file that is not a loadable ONNX model: what it is and the cigl-export command that
    makes the model.onnx, when it is a torch file (model.pt, a checkpoint) or safetensors; else None."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with its JSON header's length, then "{"
    header = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    safetensors = head[8:9] == b"{" and 0 < header <= path.stat().st_size - 8
    kind = "a torch file" if is_torch_file(path) else "a safetensors file" if safetensors else None
    if kind is None:
        return None
    model_pt = path.with_name("model.pt")
    source = model_pt if model_pt.is_file() else path
    return f"{path} is {kind}, not an exported model.onnx; cigl-export {source} writes it"


# --------------------------------------------------------------------------- config.json, metrics.jsonl


LOCK = ".lock"  # locked (flock) by the process writing the run, for as long as it writes


def lock_run(out: Path) -> IO | None:
    """Create the run directory and hold an exclusive lock on it until the returned file is
    closed (or the process ends, killed or not): a second cigl-train with the same --out, started
    while the first one runs, stops with InputError instead of both writing the same files.
    None where the OS has no flock (the run is then unguarded)."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK, "a")  # noqa: SIM115 (held open for the run's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = (out / LOCK).read_text().strip()
        raise InputError(
            f"another cigl-train{f' (process {holder})' if holder.isdigit() else ''} is writing to {out} right "
            "now; wait for it to finish or choose another --out"
        ) from None
    except OSError as exc:  # a filesystem without locks (some network mounts): run unguarded
        warnings.warn(f"cannot lock {out / LOCK} ({exc.strerror}); nothing stops a second run into {out}", stacklevel=2)
    with writing(out / LOCK):
        handle.truncate(0)  # the holder's process id, for the message above
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle


def write_run_start(out: Path, run_info: dict, done_epochs: int) -> None:
    """config.json, and metrics.jsonl cut back to the epochs the checkpoint has done; the temp
    files of a writer killed mid-write are removed (the caller holds the run's lock)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, RUN_FILES)
    write_json(out / "config.json", run_info)
    metrics_path = out / "metrics.jsonl"
    kept = metrics_path.read_text().splitlines()[:done_epochs] if metrics_path.exists() else []
    write_text(metrics_path, "".join(line + "\n" for line in kept))


def append_metrics(out: Path, row: dict) -> None:
    with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def save_predictions(path: Path, logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    atomic_save_npz(path, logits=logits, labels=labels, classes=np.asarray(classes))


# --------------------------------------------------------------------------- last.pt


def save_checkpoint(path: Path, **state) -> None:
    """last.pt: `state` (config, world_size, step, model, optimizer, sparse, average) plus the format."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start the run without --resume")
    return load_torch_file(path, CHECKPOINT_FORMAT, "cigl training checkpoint")


# --------------------------------------------------------------------------- model.pt


def save_model_file(  # noqa: PLR0913 (keyword-only: the fields of model.pt)
    path: Path,
    *,
    arch: str,
    model,
    masks: dict,
    classes: list[str],
    mean,
    std,
    in_chans: int,
    image_size: int,
    temperature: float = 1.0,
    method: str = "dense",
    config: dict | None = None,
    summary: dict | None = None,
) -> None:
    """model.pt, the product of a run: weights of `model` (an nn.Module), `masks` (support of
    each masked tensor; {} for dense) and everything export and serving need to rebuild and
    feed the model."""
    atomic_torch_save(
        {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "arch": arch,
            "model_kwargs": {"num_classes": len(classes), "in_chans": in_chans, "image_size": image_size},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "masks": {n: m.detach().cpu().contiguous() for n, m in masks.items()},
            "classes": list(classes),
            "mean": list(mean),
            "std": list(std),
            "temperature": float(temperature),
            "method": method,
            "config": config or {},
            "summary": summary or {},
        },
        path,
    )


def load_model_file(path: Path) -> dict:
    """A model.pt, loaded safely and checked (model_file_problem); FormatError otherwise."""
    path = Path(path)
    finished = path.with_name("model.pt")
    if finished.is_file():
        checkpoint = f"it is a training checkpoint: pass {finished}, the model the run wrote"
    else:
        checkpoint = f"it is a training checkpoint: cigl-train --resume {path.parent} finishes the run and its model.pt"
    model_file = load_torch_file(path, MODEL_FORMAT, "cigl model file (model.pt)", {CHECKPOINT_FORMAT: checkpoint})
    missing = [k for k in MODEL_KEYS if k not in model_file]
    if missing:
        raise FormatError(f"{path} lacks {', '.join(missing)}; export a model.pt written by cigl-train")
    problem = model_file_problem(model_file)
    if problem:
        raise FormatError(f"{path}: {problem}; export a model.pt written by cigl-train")
    return model_file


def model_file_problem(model_file: dict) -> str | None:
    """What makes a loaded model.pt unusable (wrong types, sizes out of bounds, classes that do
    not match the outputs, masks that do not match their tensors), or None."""
    kw, state = model_file["model_kwargs"], model_file["state_dict"]
    if not isinstance(model_file["arch"], str) or not isinstance(kw, dict) or not isinstance(state, dict):
        return "arch must be a name, model_kwargs and state_dict dictionaries"
    ints = {k: kw.get(k) for k in ("num_classes", "in_chans", "image_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        return f"model_kwargs needs integer num_classes, in_chans and image_size, got {ints}"
    if not (1 <= ints["num_classes"] <= MAX_CLASSES and ints["in_chans"] in (1, 3)):
        return f"model_kwargs out of range: {ints} (1..{MAX_CLASSES} classes, 1 or 3 channels)"
    if not 1 <= ints["image_size"] <= MAX_SIDE:
        return f"image_size {ints['image_size']} is outside 1..{MAX_SIDE}"
    classes = model_file["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of class names"
    if len(classes) != ints["num_classes"]:
        return f"{len(classes)} class names for {ints['num_classes']} outputs"
    return _normalisation_problem(model_file, ints["in_chans"]) or _tensors_problem(state, model_file["masks"])


def _normalisation_problem(model_file: dict, channels: int) -> str | None:
    for key in ("mean", "std"):
        values = model_file[key]
        if not isinstance(values, list | tuple) or len(values) != channels:
            return f"{key} needs one number per channel ({channels})"
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values) or (
            key == "std" and min(values) <= 0
        ):
            return f"{key} must hold finite numbers (std > 0), got {values}"
    temperature = model_file.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        return f"temperature must be a finite number > 0, got {temperature!r}"
    return None


def _tensors_problem(state: dict, masks) -> str | None:
    import torch

    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return f"state_dict entries that are not tensors: {', '.join(map(str, bad[:3]))}"
    if not isinstance(masks, dict):
        return f"masks must be a dictionary of boolean tensors, got {type(masks).__name__}"
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or name not in state:
            return f"mask {name!r} is not a boolean tensor of a state_dict entry"
        problem = mask_problem(name, state[name], mask)
        if problem:
            return problem
    return None


def mask_problem(name: str, tensor, mask) -> str | None:
    """Why boolean `mask` is not the support of `tensor` (shape, or nonzeros outside it), or None."""
    if mask.shape != tensor.shape:
        return f"mask of {name} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}"
    if tensor[~mask].any():
        return f"{name} has nonzero weights outside its mask (the file is inconsistent)"
    return None
