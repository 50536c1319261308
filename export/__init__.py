"""cigl.export: trained sparse models to packed safetensors and ONNX, with a model card.

    cigl.export.save(model_or_state_dict, "model.safetensors", masks=..., metadata=...)
    state = cigl.export.load_state_dict("model.safetensors")   # exact dense tensors back
    model = cigl.export.load_model("model.safetensors")        # rebuilt via cigl.models

The command line is `cigl-export` (cigl.export.cli). Format: docs/FORMAT.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cigl.errors import FormatError
from cigl.export import packed

__all__ = ["load_model", "load_state_dict", "read_metadata", "save"]


def save(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    fp16: bool = False,
    dense: bool = False,
) -> None:
    """Write a model as safetensors: masked tensors packed (values + 1-bit mask), or with
    `dense=True` plain tensors that timm's / torch's load_state_dict accept directly.

    Args:
        model_or_state_dict: the model, or its state dict.
        path: the .safetensors file to write (atomically).
        masks: name -> boolean support of each sparse tensor (nonzeros outside it are refused).
        metadata: string entries for the header, e.g. cigl.card.write_card's model card.
        fp16: store the packed values as float16.
        dense: store every tensor plain (no packing).

    Example:
        >>> import tempfile, torch, cigl
        >>> layer = torch.nn.Linear(64, 16)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(torch.rand(16, 64) < 0.1)
        >>> path = tempfile.mkdtemp() + "/layer.safetensors"
        >>> cigl.export.save(layer, path, masks={"weight": layer.weight != 0})
        >>> torch.equal(cigl.export.load_state_dict(path)["weight"], layer.weight)
        True
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors, shapes = packed.pack_state_dict(state, {} if dense else (masks or {}), fp16=fp16)
    meta = {"format": packed.FORMAT, "format_version": packed.VERSION, **(metadata or {})}
    meta["packed"] = json.dumps(shapes, sort_keys=True)
    packed.write(path, tensors, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    _, meta = packed.read(path)
    return meta


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Dense float tensors (packed ones unpacked) of a cigl safetensors file."""
    tensors, meta = packed.read(path)
    return packed.unpack_state_dict(tensors, packed.shapes_of(meta))


def load_model(path: str | Path) -> nn.Module:
    """The model rebuilt from its metadata (arch, model_kwargs) with the stored weights, in eval mode."""
    from cigl.models import create_model

    tensors, meta = packed.read(path)
    try:
        arch, kwargs = meta["arch"], json.loads(meta["model_kwargs"])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(
            f"{path} has no 'arch'/'model_kwargs' metadata; it was not written by cigl-export "
            "(cigl.export.load_state_dict reads its tensors)"
        ) from None
    model = create_model(arch, **kwargs)
    model.load_state_dict(packed.unpack_state_dict(tensors, packed.shapes_of(meta)))
    return model.eval()
