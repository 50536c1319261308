"""The packed sparse tensor, one contract for model.safetensors, model.onnx and the sparse engine
(numpy only, so serving needs no torch).

A masked tensor NAME of shape S is stored as
    NAME::values  the entries where the mask is set, in C order
    NAME::mask    uint8, ceil(numel / 8) bytes: the C-order mask packed little-endian
                  (bit i of byte j is element 8 j + i)
and, in ONNX only, NAME::shape (int64 S) and NAME::numel (int64 [numel]) for the unpack subgraph.
"""

from __future__ import annotations

import numpy as np

VALUES, MASK, SHAPE, NUMEL = "::values", "::mask", "::shape", "::numel"


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool array -> uint8 bytes (C order, little-endian bit order)."""
    return np.packbits(np.asarray(mask, bool).reshape(-1), bitorder="little")


def unpack_mask(bits: np.ndarray, numel: int) -> np.ndarray:
    """uint8 bytes -> the flat bool mask of `numel` elements; ValueError when the byte count is wrong."""
    if bits.dtype != np.uint8 or bits.size != (numel + 7) // 8:
        raise ValueError(f"mask of {bits.size} bytes for a tensor of {numel} elements (needs {(numel + 7) // 8})")
    return np.unpackbits(bits, count=numel, bitorder="little").astype(bool)
