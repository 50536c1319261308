"""numpy implementations of the ONNX operators the engine runs outside its kernels: shape
arithmetic folded at load (the Pad amounts of an option-A shortcut) and the cheap tensor ops
around the convolutions (pooling, flatten, the classifier's Mul and Softmax, slicing, the
squeeze-and-excitation gate's ReduceMean and Sigmoid). The elementwise activations of
`POINTWISE` (Clip, LeakyRelu, HardSigmoid, HardSwish) are one pass of a numba kernel instead.

Each op is f(inputs, attrs) -> list of outputs, following the ONNX operator specification for the
opsets torch exports (13-21); anything else is reported as unsupported by the graph reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from onnx import helper, numpy_helper

from cigl.serve.sparse_engine import kernels

Op = Callable[[list, dict], list]
OPS: dict[str, Op] = {}


def op(*names: str):
    def add(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return add


def attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@op("Identity")
def _identity(x, _attrs):
    return [x[0]]


@op("Relu")
def _relu(x, _attrs):
    return [np.maximum(x[0], 0)]


@op("Add")
def _add(x, _attrs):
    return [x[0] + x[1]]


@op("Sub")
def _sub(x, _attrs):
    return [x[0] - x[1]]


@op("Mul")
def _mul(x, _attrs):
    return [x[0] * x[1]]


@op("Div")
def _div(x, _attrs):
    return [x[0] / x[1] if np.asarray(x[0]).dtype.kind == "f" else x[0] // x[1]]


@op("Cast")
def _cast(x, a):
    try:
        dtype = helper.tensor_dtype_to_np_dtype(a["to"])
    except KeyError:
        raise NotImplementedError(f"Cast to ONNX type {a['to']}") from None
    return [np.asarray(x[0]).astype(dtype)]


@op("Reshape")
def _reshape(x, a):
    shape = [int(s) for s in x[1]]
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [np.reshape(x[0], shape)]


@op("Flatten")
def _flatten(x, a):
    axis = a.get("axis", 1) % max(x[0].ndim, 1)
    return [np.reshape(x[0], (math.prod(x[0].shape[:axis]), -1))]


@op("Transpose")
def _transpose(x, a):
    return [np.transpose(x[0], a.get("perm"))]


@op("Concat")
def _concat(x, a):
    return [np.concatenate([np.asarray(t) for t in x], axis=a["axis"])]


@op("Unsqueeze")
def _unsqueeze(x, _attrs):
    return [np.expand_dims(x[0], tuple(int(i) for i in x[1]))]


@op("Squeeze")
def _squeeze(x, _attrs):
    return [np.squeeze(x[0], tuple(int(i) for i in x[1])) if len(x) > 1 else np.squeeze(x[0])]


@op("Shape")
def _shape(x, a):
    return [np.array(np.shape(x[0]), np.int64)[a.get("start", 0) : a.get("end")]]


@op("Gather")
def _gather(x, a):
    return [np.take(x[0], np.asarray(x[1]), axis=a.get("axis", 0))]


@op("ConstantOfShape")
def _constant_of_shape(x, a):
    value = a.get("value")
    fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value)
    return [np.full([int(s) for s in x[0]], fill.reshape(-1)[0], fill.dtype)]


@op("Slice")
def _slice(x, _attrs):
    data, starts, ends = x[0], x[1], x[2]
    axes = x[3] if len(x) > 3 and x[3] is not None else range(len(starts))
    steps = x[4] if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * np.ndim(data)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis)] = slice(int(start), _clamp_end(int(end)), int(step))
    return [data[tuple(index)]]


def split_sizes(dim: int, parts: int, split, a: dict) -> list[int]:
    """The lengths of a Split's `parts` outputs along an axis of length `dim`: `split` (its
    second input, opset 13+, or None) or the attribute (opset 11-), else equal parts (opset 18's
    num_outputs: the last part takes what is left). A multi-output op, so the graph reader
    runs it (graph.Program._split), not OPS."""
    sizes = split if split is not None else a.get("split")
    if sizes is None:
        step = -(-dim // parts)
        sizes = [min(step, dim - i * step) for i in range(parts)]
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    if len(sizes) != parts or sum(sizes) != dim or min(sizes) < 0:
        raise ValueError(f"Split of {dim} into parts {sizes} for {parts} outputs")
    return sizes


def _clamp_end(end: int) -> int | None:
    """ONNX writes 'to the end' as INT64_MAX (or -INT64_MAX going backwards); numpy as None."""
    return None if abs(end) >= 2**62 else end


def check_pad(a: dict) -> None:
    """NotImplementedError for a Pad mode other than constant (reflect, edge, wrap)."""
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise NotImplementedError("Pad modes other than constant")


@op("Pad")
def _pad(x, a):
    check_pad(a)
    pads = [int(p) for p in x[1]]
    fill = float(x[2]) if len(x) > 2 and x[2] is not None and np.size(x[2]) else 0.0
    rank = x[0].ndim
    widths = list(zip(pads[:rank], pads[rank:], strict=True))
    if min(pads) < 0:
        raise NotImplementedError("negative Pad amounts")
    return [padded(x[0], widths, fill)]


def padded(x: np.ndarray, widths: list[tuple[int, int]], fill: float = 0.0) -> np.ndarray:
    """`x` with widths[d] = (before, after) elements of `fill` around axis d: np.pad's constant
    mode at a twentieth of its per-call overhead (it dominates small batches)."""
    out = np.full([n + b + e for n, (b, e) in zip(x.shape, widths, strict=True)], fill, x.dtype)
    out[tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, widths, strict=True))] = x
    return out


@op("Gemm")
def _gemm(x, a):
    left = x[0].T if a.get("transA", 0) else x[0]
    right = x[1].T if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return [out.astype(np.float32)]


@op("MatMul")
def _matmul(x, _attrs):
    return [np.matmul(x[0], x[1])]


@op("Softmax")
def _softmax(x, a):
    axis = a.get("axis", -1)
    e = x[0] - x[0].max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return [e]


@op("Sigmoid")
def _sigmoid(x, _attrs):
    """1 / (1 + e^-x), from e^-|x| so no exponent overflows for large |x|."""
    e = np.exp(-np.abs(x[0]))
    return [np.where(x[0] >= 0, 1 / (1 + e), e / (1 + e)).astype(x[0].dtype)]


Pointwise = Callable[[np.ndarray, np.ndarray], object]  # f(x, out): an activation written into out
POINTWISE: dict[str, Callable[[list, dict], Pointwise]] = {}


def pointwise(name: str, other_types: Callable[[np.ndarray, list, dict], np.ndarray] | None = None):
    """Register an elementwise activation as make(params, attrs) -> f(x, out), its parameters
    (the node's inputs after the first, constants) and attributes fixed; its numpy op follows,
    f on float32 values and `other_types(x, params, attrs)` on others (where ONNX allows them).
    The graph reader runs f over a whole plane buffer where f(0) = 0 (the padding stays zero)."""

    def add(make: Callable[[list, dict], Pointwise]) -> Callable[[list, dict], Pointwise]:
        POINTWISE[name] = make

        def numpy_op(x, a):
            data = np.asarray(x[0])
            if data.dtype != np.float32 and other_types is not None:
                return [other_types(data, x[1:], a)]
            if data.dtype != np.float32:
                raise NotImplementedError(f"{name} of {data.dtype} values")
            out = np.empty(data.shape, np.float32)
            make(x[1:], a)(data, out)
            return [out]

        OPS[name] = numpy_op
        return make

    return add


def _flat(kernel: Callable, *args) -> Pointwise:
    """f(x, out) = kernel(x, *args, out) on flat views (x copied first where it is not contiguous)."""

    def run(x: np.ndarray, out: np.ndarray) -> None:
        kernel(np.ascontiguousarray(x).reshape(-1), *args, out.reshape(-1))

    return run


def _clip_bounds(params: list, a: dict) -> tuple:
    """Clip's lo and hi as given (None where absent): inputs 1 and 2 (opset 11+, either may be
    absent or empty) or attributes (opset 6)."""
    given = [params[0] if params else a.get("min"), params[1] if len(params) > 1 else a.get("max")]
    return tuple(None if v is None or np.size(v) == 0 else np.asarray(v).reshape(-1)[0] for v in given)


def _clip_any(x: np.ndarray, params: list, a: dict) -> np.ndarray:
    """Clip of integer or float64 values (shape arithmetic) in x's own type."""
    lo, hi = _clip_bounds(params, a)
    out = x if lo is None else np.maximum(x, np.asarray(lo, x.dtype))
    return out if hi is None else np.minimum(out, np.asarray(hi, x.dtype))


@pointwise("Clip", _clip_any)
def _clip(params, a):
    """min(max(x, lo), hi) (hi where lo > hi): ReLU6 of MobileNetV2 and ReXNet."""
    lo, hi = _clip_bounds(params, a)
    return _flat(
        kernels.hard_clamp,
        np.float32(1),
        np.float32(0),
        np.float32(-np.inf if lo is None else lo),
        np.float32(np.inf if hi is None else hi),
        False,
    )


@pointwise("LeakyRelu")
def _leaky_relu(_params, a):
    """x for x >= 0, else alpha * x (alpha 0.01 by default): CSP ResNets, DarkNets."""
    return _flat(kernels.leaky_relu, np.float32(a.get("alpha", 0.01)))


@pointwise("HardSigmoid")
def _hard_sigmoid(_params, a):
    """max(0, min(1, alpha * x + beta)), alpha 0.2 and beta 0.5 by default (torch's is 1/6, 1/2):
    MobileNetV3's and GhostNet's squeeze-and-excitation gates."""
    alpha, beta = np.float32(a.get("alpha", 0.2)), np.float32(a.get("beta", 0.5))
    return _flat(kernels.hard_clamp, alpha, beta, np.float32(0), np.float32(1), False)


@pointwise("HardSwish")
def _hard_swish(_params, _attrs):
    """x * max(0, min(1, x / 6 + 1 / 2)): MobileNetV3, LCNet."""
    return _flat(kernels.hard_clamp, np.float32(1 / 6), np.float32(0.5), np.float32(0), np.float32(1), True)


def reduce_axes(x: list, a: dict) -> tuple[int, ...] | None:
    """ReduceMean's axes: the attribute (opset < 18) or the second input (18+); None: every axis
    (no axes given, unless noop_with_empty_axes), () with noop_with_empty_axes: none."""
    axes = a.get("axes") if len(x) < 2 or x[1] is None else x[1]
    if axes is None or len(axes) == 0:
        return () if a.get("noop_with_empty_axes", 0) else None
    return tuple(int(i) for i in axes)


@op("ReduceMean")
def _reduce_mean(x, a):
    axes = reduce_axes(x, a)
    if axes == ():
        return [x[0]]
    return [np.mean(x[0], axis=axes, keepdims=bool(a.get("keepdims", 1)), dtype=np.float64).astype(x[0].dtype)]


@op("GlobalAveragePool")
def _global_average_pool(x, _attrs):
    return [x[0].mean(axis=(2, 3), keepdims=True)]


@op("BatchNormalization")
def _batch_norm(x, a):
    scale, shift = bn_affine(x[1:5], a)
    return [x[0] * scale[None, :, None, None] + shift[None, :, None, None]]


def bn_affine(params: list, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch norm as y = x * scale + shift, per channel."""
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def check_pool(a: dict) -> None:
    """NotImplementedError for pooling attributes `pool` does not cover."""
    if any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("pooling with dilations or auto_pad")
    if len(a.get("kernel_shape", [])) != 2:
        raise NotImplementedError("pooling that is not 2-D")


def _pool_size(size: int, pads: tuple[int, int], kernel: int, stride: int, ceil_mode: bool) -> int:
    """Output length; in ceil mode the last window must start inside the input or its leading padding."""
    span = size + pads[0] + pads[1] - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + pads[0] else out


def pool(x: np.ndarray, a: dict, kind: str) -> np.ndarray:
    """2-D max or average pooling as ONNX defines it (pads, strides, ceil_mode, count_include_pad)."""
    check_pool(a)
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    h, w = x.shape[2:]
    ceil_mode = bool(a.get("ceil_mode", 0))
    ho, wo = _pool_size(h, (pt, pb), kh, sh, ceil_mode), _pool_size(w, (pl, pr), kw, sw, ceil_mode)
    eb, er = max(0, (ho - 1) * sh + kh - (h + pt + pb)), max(0, (wo - 1) * sw + kw - (w + pl + pr))
    fill = -np.inf if kind == "MaxPool" else 0.0
    xp = padded(x, [(0, 0), (0, 0), (pt, pb + eb), (pl, pr + er)], fill)
    rows, cols = sh * (ho - 1) + 1, sw * (wo - 1) + 1
    taps = [xp[:, :, i : i + rows : sh, j : j + cols : sw] for i in range(kh) for j in range(kw)]
    if kind == "MaxPool":
        return np.maximum.reduce(taps)
    # average: divide by the window's elements, counting explicit padding only with count_include_pad
    counted = np.ones((h, w), np.float32)
    if a.get("count_include_pad", 0):
        counted = padded(padded(counted, [(pt, pb), (pl, pr)], 1.0), [(0, eb), (0, er)])
    else:
        counted = padded(counted, [(pt, pb + eb), (pl, pr + er)])
    count = sum(counted[i : i + rows : sh, j : j + cols : sw] for i in range(kh) for j in range(kw))
    return (np.add.reduce(taps) / count).astype(np.float32)


# attribute checks run when a graph is read
CHECKS = {"MaxPool": check_pool, "AveragePool": check_pool, "Pad": check_pad}


@op("MaxPool")
def _max_pool(x, a):
    return [pool(x[0], a, "MaxPool")]


@op("AveragePool")
def _average_pool(x, a):
    return [pool(x[0], a, "AveragePool")]
