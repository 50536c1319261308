"""Packed sparse safetensors: nonzero values plus a 1-bit-per-element mask per masked tensor.

Format (docs/FORMAT.md): a masked tensor NAME is stored as NAME::values (float32 or float16) and
NAME::mask as cigl.packing defines them,
and every other tensor (masked tensors whose mask is all ones included) is stored as it is.
The header metadata (string -> string) holds `format` = "cigl-sparse", `format_version`,
`packed` = JSON {NAME: S} of the packed tensors, and the model card written by cigl-export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cigl.errors import FormatError, InputError
from cigl.io import atomic_open, is_torch_file
from cigl.packing import MASK, VALUES, pack_mask, unpack_mask
from cigl.runfiles import mask_problem

FORMAT = "cigl-sparse"
VERSION = "1"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 bytes (C order, little-endian bit order)."""
    return torch.from_numpy(pack_mask(mask.detach().cpu().numpy()))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        bits = unpack_mask(packed.numpy(), int(np.prod(shape)))
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    return torch.from_numpy(bits).view(shape)


def check_finite(state: dict[str, torch.Tensor], source: str = "model") -> None:
    """Refuse weights holding NaN or Inf (a broken model must not be exported)."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{source}: tensor {name} holds NaN or Inf values; refusing to export a broken model")


def pack_state_dict(
    state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], fp16: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(tensors to store, {packed name: shape}). A masked tensor with nonzeros outside its mask
    is refused: packing would silently change the model."""
    check_finite(state)
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise InputError(
            f"masks name {len(unknown)} tensor(s) the model does not have (e.g. {unknown[0]!r}); "
            "pass the masks of this model (Masking.finalize() or model.pt's masks)"
        )
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if name not in masks:
            tensors[name] = t
            continue
        mask = masks[name].cpu().bool()
        problem = mask_problem(name, t, mask)
        if problem:
            raise FormatError(problem)
        if bool(mask.all()):  # a fully dense layer: the mask would only add numel / 8 bytes
            tensors[name] = t
            continue
        values = t[mask]
        tensors[name + VALUES] = values.half() if fp16 else values.float()
        tensors[name + MASK] = pack_bits(mask)
        shapes[name] = list(t.shape)
    return tensors, shapes


def unpack_state_dict(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Dense tensors back from packed ones (float32; zeros outside the mask)."""
    out = {k: v for k, v in tensors.items() if not k.endswith((VALUES, MASK))}
    for name, shape in shapes.items():
        try:
            mask = unpack_bits(tensors[name + MASK], tuple(shape))
            values = tensors[name + VALUES].float()
        except KeyError as exc:
            raise FormatError(f"packed tensor {name} is missing its part {exc}") from None
        if int(mask.sum()) != values.numel():
            raise FormatError(f"packed tensor {name}: {values.numel()} values for {int(mask.sum())} mask bits")
        dense = torch.zeros(tuple(shape), dtype=torch.float32)
        dense[mask] = values
        out[name] = dense
    return out


_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with every key sorted, so the same input always gives the same bytes
    (the safetensors library keeps metadata in a hash map, whose order changes between runs)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise InputError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialise and write atomically."""
    data = serialize(tensors, metadata)
    with atomic_open(path) as f:
        f.write(data)


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, as a FormatError when it is not one."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise InputError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        hint = ""
        if is_torch_file(path):
            hint = "; it is a torch file (model.pt or a checkpoint): cigl-export writes the safetensors"
        raise FormatError(f"{path} is not a valid safetensors file ({exc}){hint}") from None
    return tensors, metadata


def shapes_of(metadata: dict[str, str]) -> dict[str, list[int]]:
    try:
        return json.loads(metadata.get("packed", "{}"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"corrupt 'packed' metadata ({exc})") from None
