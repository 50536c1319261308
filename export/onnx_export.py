"""ONNX export: `images` -> `logits`, `probs` (softmax of logits / T, T inside the graph).

Sparse weights are stored packed, as in the safetensors format: nonzero values plus a 1-bit
mask, with a small subgraph (BitShift, Mod, CumSum, Gather, Where) that rebuilds the dense
tensor. Every input of that subgraph is an initializer and every op in it is one onnxruntime
constant-folds, so the dense weights are built once, when the session is created, and inference
runs the ordinary dense graph. (NonZero + ScatterND would be shorter, but onnxruntime does not
fold NonZero: the weights would be rebuilt at every call.) ONNX's own sparse initializers need
8-byte int64 indices per nonzero, 12 bytes per weight in all, which at density 0.1 saves only
70%; the bit mask costs 1/8 byte per element.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cigl.errors import FormatError
from cigl.packing import MASK, NUMEL, SHAPE, VALUES, pack_mask
from cigl.tables import tensor_row

SHARED = "cigl::"


class WithProbs(nn.Module):
    """model -> (logits, softmax(logits / temperature))."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        return logits, torch.softmax(logits * self.inv_t, dim=1)


def torch_to_onnx(model: nn.Module, temperature: float, input_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """Trace the eval-mode model (batch-norm folded into the convolutions) with a dynamic batch."""
    model = WithProbs(model.eval(), temperature).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _native_output_silenced():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (torch.zeros(1, *input_shape),),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits", "probs"],
                do_constant_folding=True,
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}},
            )
        except Exception as exc:  # torch.onnx's errors have no common base: any failure means no ONNX model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = re.split(r"\s+(?:Please feel free|\[Caused by)", first)[0][:300]  # torch's boilerplate cut
            raise FormatError(
                f"torch cannot export this model to ONNX at input {list(input_shape)} ({reason}); "
                "pass --no-onnx to write model.safetensors only"
            ) from None
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _native_output_silenced():
    """Discard what native code writes to file descriptors 1 and 2 meanwhile: torch's exporter
    dumps its whole TorchScript graph to stdout when it fails, which the one-line error replaces."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "wb") as null:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def pack_initializers(model: onnx.ModelProto, min_saving: float = 0.1) -> list[dict]:
    """Replace every float initializer whose packed form is at least `min_saving` smaller by
    values + bit mask + unpack subgraph. Returns one row per weight tensor (name, shape, nnz,
    stored: 'packed' or 'dense', bytes)."""
    graph = model.graph
    rows, nodes, keep, added = [], [], [], []
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim < 2:
            keep.append(init)
            continue
        mask = w.reshape(-1) != 0
        nnz, numel = int(mask.sum()), w.size
        packed_bytes = 4 * nnz + (numel + 7) // 8
        if packed_bytes > (1 - min_saving) * 4 * numel:
            keep.append(init)
            rows.append(tensor_row(init.name, w.shape, nnz, "dense", 4 * numel))
            continue
        n = init.name
        added += [
            # an all-zero tensor keeps one padding value so that Gather has something to index
            _const(n + VALUES, w.reshape(-1)[mask] if nnz else np.zeros(1, np.float32)),
            _const(n + MASK, pack_mask(mask)),
            _const(n + NUMEL, np.array([numel], np.int64)),
            _const(n + SHAPE, np.array(w.shape, np.int64)),
        ]
        p = n + "::"
        nodes += [
            helper.make_node("Unsqueeze", [n + MASK, SHARED + "axis1"], [p + "u"]),
            helper.make_node("BitShift", [p + "u", SHARED + "shifts"], [p + "s"], direction="RIGHT"),
            helper.make_node("Mod", [p + "s", SHARED + "two"], [p + "b"]),
            helper.make_node("Reshape", [p + "b", SHARED + "minus1"], [p + "f"]),
            helper.make_node("Slice", [p + "f", SHARED + "zero", n + NUMEL], [p + "t"]),
            helper.make_node("Cast", [p + "t"], [p + "m"], to=TensorProto.BOOL),
            helper.make_node("Cast", [p + "t"], [p + "i"], to=TensorProto.INT64),
            helper.make_node("CumSum", [p + "i", SHARED + "axis0"], [p + "c"]),  # k-th set bit -> k
            helper.make_node("Sub", [p + "c", SHARED + "one"], [p + "k"]),
            helper.make_node("Gather", [n + VALUES, p + "k"], [p + "g"], axis=0),
            helper.make_node("Where", [p + "m", p + "g", SHARED + "fzero"], [p + "d"]),
            helper.make_node("Reshape", [p + "d", n + SHAPE], [n]),
        ]
        rows.append(tensor_row(init.name, w.shape, nnz, "packed", packed_bytes))
    if nodes:
        added += [
            _const(SHARED + "axis1", np.array([1], np.int64)),
            _const(SHARED + "shifts", np.arange(8, dtype=np.uint8)),
            _const(SHARED + "two", np.array(2, np.uint8)),
            _const(SHARED + "minus1", np.array([-1], np.int64)),
            _const(SHARED + "zero", np.array([0], np.int64)),
            _const(SHARED + "axis0", np.array(0, np.int64)),
            _const(SHARED + "one", np.array(1, np.int64)),
            _const(SHARED + "fzero", np.array(0.0, np.float32)),
        ]
        graph.ClearField("initializer")
        graph.initializer.extend(keep + added)
        old = list(graph.node)
        graph.ClearField("node")
        graph.node.extend(nodes + old)
    return rows
