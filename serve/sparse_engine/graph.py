"""Reading an exported model.onnx into the engine's program: a list of steps over named values.

Packed weights (values + bit mask + the unpack subgraph of cigl.export.onnx_export) are read as
their nonzeros; the unpack subgraph itself never runs, so no dense copy of a sparse layer exists.
Nodes whose inputs are all constants are folded at load with the numpy ops. Convolutions (and
Gemm) become kernel calls in the padded-plane layout, taking a following residual Add and ReLU
(Conv -> Add -> Relu, Conv -> Relu) and a batch norm's ReLU into the same pass; so does the
per-channel Mul of a squeeze-and-excitation gate (an activation times an N x C x 1 x 1 sigmoid).
Elementwise activations (ReLU6, LeakyRelu, HardSwish, ...) run over the planes in place of a
layout change. The rest runs as numpy. A graph with any other operator, or a convolution the kernels do not
cover, raises Unsupported naming it.

A run does not walk the steps: the first run at an input shape binds them (`Program.bind`) into a
`Schedule`, every buffer taken once and every kernel and numpy call with its arguments fixed, and
each run at that shape makes those calls only (at batch 1 the per-step work in Python had cost
about what the kernels did).
"""

from __future__ import annotations

import functools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from cigl.packing import MASK, NUMEL, SHAPE, VALUES
from cigl.serve.sparse_engine import kernels
from cigl.serve.sparse_engine.layers import Conv, Linear, SparseWeight, Subsample
from cigl.serve.sparse_engine.layout import BufferPool, Call, Planes, mask, run_calls
from cigl.serve.sparse_engine.ops import CHECKS, OPS, POINTWISE, attributes, bn_affine, reduce_axes, split_sizes

SCHEDULES = 2  # input shapes whose schedule (and buffers) a program keeps (auto runs batch 1 and larger ones)
EPILOGUE_KINDS = ("Conv", "Mul", "SiLU")  # steps whose run takes residual= and relu= (an Add and a Relu fuse into them)


class Unsupported(Exception):
    """The graph uses something the sparse engine does not run (the message says what)."""


Value = np.ndarray | Planes


def as_array(v: Value) -> np.ndarray:
    return v.nchw() if isinstance(v, Planes) else v


Bound = tuple[Value, list[Call]]  # a step's output value (its buffers taken) and the calls that compute it


def as_planes(v: Value) -> Bound:
    """v in planes: itself, or new planes and the call that copies v into them."""
    return (v, []) if isinstance(v, Planes) else Planes.bind_nchw(v)


def computed(fn: Callable[[list], np.ndarray], args: list) -> Bound:
    """fn(args) as a bound value. It is evaluated once now, on whatever the arrays hold, for its
    shape and type; a view of one of the arrays then follows it by itself, and anything else is
    recomputed into the same array by the call (numpy's per-run ops: the classifier's tail)."""
    out = np.asarray(fn(args))
    if any(isinstance(a, np.ndarray) and np.shares_memory(out, a) for a in args):
        return out, []
    return out, [lambda: np.copyto(out, fn(args))]


@dataclass
class Schedule:
    """A program bound to one input shape: its buffers taken once and kept, each step's calls
    in order. A run copies the images in, makes the calls and copies the outputs out, with no
    per-step work in Python besides the calls themselves (at batch 1, the old per-step
    bookkeeping took as long as the kernels)."""

    images: np.ndarray
    calls: list[list[Call]]  # per step
    pixels: list[int]  # per step: output pixels per image
    outputs: dict[str, np.ndarray]

    @functools.cached_property
    def flat(self) -> list[Call]:
        return [call for calls in self.calls for call in calls]


@dataclass
class Step:
    """One step of the program: bind(*inputs) takes the output's buffers and returns it with
    the calls that compute it (`Bound`). `kind`, `fused` and `nonzeros` (of its layer's weight)
    feed the profile."""

    kind: str
    inputs: list[str]
    output: str
    bind: Callable[..., Bound]
    name: str = ""
    layer: Conv | Linear | None = None
    fused: list[str] = field(default_factory=list)

    @property
    def weight(self) -> SparseWeight | None:
        return None if self.layer is None else self.layer.weight

    @property
    def label(self) -> str:
        """The step's kind with the ops fused into it, e.g. Conv+Add+Relu (the profile's name)."""
        return "+".join([self.kind, *self.fused])

    @property
    def nonzeros(self) -> int:
        return 0 if self.weight is None else self.weight.index.size


def _add_values(a: Value, b: Value, pool: BufferPool) -> Bound:
    if isinstance(a, Planes) and isinstance(b, Planes) and a.grid == b.grid and a.data.shape == b.data.shape:
        out = Planes.empty(a.data.shape[0], a.grid, pool)  # zero padding + zero padding stays zero
        return out, [functools.partial(np.add, a.data, b.data, out=out.data)]
    return computed(lambda v: v[0] + v[1], [as_array(a), as_array(b)])


def _spatial_means(x: Value) -> Bound:
    """(N, C, 1, 1) means over height and width of a 4-D activation: global average pooling."""
    if isinstance(x, Planes):
        g = x.grid
        out = np.empty((g.n, x.data.shape[0]), np.float32)
        return out[:, :, None, None], [functools.partial(kernels.plane_means, x.data, g.n, g.block, g.h * g.w, out)]
    return computed(lambda v: v[0].mean(axis=(2, 3), keepdims=True), [x])


def _relu_values(x: Value, pool: BufferPool) -> Bound:
    if isinstance(x, Planes):
        out = Planes.empty(x.data.shape[0], x.grid, pool)
        return out, [functools.partial(np.maximum, x.data, 0, out=out.data)]
    return computed(lambda v: np.maximum(v[0], 0), [x])


def _epilogue(y: Value, calls: list[Call], residual: Value | None, relu: bool, pool: BufferPool) -> Bound:
    """y (+ residual, then ReLU if relu) where no kernel fused them: more calls after `calls`."""
    if residual is not None:
        y, more = _add_values(y, residual, pool)
        calls = calls + more
    if relu:
        y, more = _relu_values(y, pool)
        calls = calls + more
    return y, calls


def _gate_planes(x: Value, gate: Value, residual: Value | None, relu: bool, pool: BufferPool) -> Bound | None:
    """x * gate (+ residual, ReLU) in planes when x is in planes, gate is N x C x 1 x 1 for x's
    images and channels and the residual has x's shape; else None."""
    if not isinstance(x, Planes):
        return None
    channels, g = x.data.shape[0], x.grid
    gate = as_array(gate)
    if gate.shape != (g.n, channels, 1, 1):
        return None
    res, calls = kernels.NO_RESIDUAL, []
    if residual is not None:
        if not isinstance(residual, Planes) and np.shape(residual) != (g.n, channels, g.h, g.w):
            return None
        residual, calls = as_planes(residual)
        if residual.grid != g or residual.data.shape != x.data.shape:
            return None
        res = residual.data
    out = Planes.empty(channels, g, pool)
    flat = np.empty((g.n, channels), np.float32)  # the gate, contiguous, copied at each run
    calls += [
        functools.partial(np.copyto, flat, gate[:, :, 0, 0]),
        functools.partial(kernels.scale_channels, x.data, flat, g.block, res, mask(g), relu, out.data),
    ]
    return out, calls


def _silu_planes(x: np.ndarray, out: np.ndarray) -> None:
    """out = x * sigmoid(x) = x / (1 + exp(-x)) on planes, with numpy's vectorised exp over the
    whole buffer (zero padding stays zero)."""
    with np.errstate(over="ignore"):  # exp(-x) is inf for x below -88: x / inf = -0
        np.exp(np.negative(x, out=out), out=out)
    out += 1.0
    np.divide(x, out, out=out)


def _packed_weights(graph) -> dict[str, SparseWeight]:
    inits = {i.name: i for i in graph.initializer}
    found = {}
    for name in inits:
        if not name.endswith(VALUES):
            continue
        base = name[: -len(VALUES)]
        if base + MASK in inits and base + SHAPE in inits:
            shape = tuple(int(s) for s in numpy_helper.to_array(inits[base + SHAPE]))
            values = numpy_helper.to_array(inits[name]).astype(np.float32)
            try:
                found[base] = SparseWeight.from_packed(values, numpy_helper.to_array(inits[base + MASK]), shape)
            except ValueError as exc:
                raise Unsupported(f"packed weight {base}: {exc}") from None
    return found


def _is_unpack_node(node, packed: dict[str, SparseWeight]) -> bool:
    """A node of a packed weight's unpack subgraph: it writes NAME or NAME::part."""
    for out in node.output:
        cuts = [i for i in range(len(out)) if out.startswith("::", i)]
        if out in packed or any(out[:i] in packed for i in cuts):
            return True
    return False


class Program:
    """The engine's steps for one ONNX graph, with constants folded and fusions applied."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.packed = _packed_weights(graph)
        packed_parts = {b + s for b in self.packed for s in (VALUES, MASK, SHAPE, NUMEL)}
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name not in packed_parts
        }
        self.input = graph.input[0].name if graph.input else "images"
        self.outputs = [o.name for o in graph.output]
        # one schedule per input shape (its buffers, taken once), the SCHEDULES most recently run
        # kept; runs are serialised by SparseEngine, so a schedule serves one run at a time
        self.schedules: OrderedDict[tuple[int, ...], Schedule] = OrderedDict()
        self.pool = BufferPool()  # the buffers of the schedule being bound
        runtime = self._fold(graph.node)
        uses = Counter(i for n in runtime for i in n.input if i) + Counter(self.outputs)
        self.steps: list[Step] = []
        self.producer: dict[str, Step] = {}
        self.subsamples: dict[str, Subsample] = {}  # by output name, while later steps may join them
        self.scalars: dict[str, np.float32] = {}  # Mul steps by a scalar constant: their factor, by output name
        for node in runtime:
            self._compile(node, uses)
        weights = [s.weight for s in self.steps if s.weight is not None]
        self.density = sum(w.index.size for w in weights) / max(1, sum(int(np.prod(w.shape)) for w in weights))
        last_use = {name: i for i, s in enumerate(self.steps) for name in s.inputs}
        # per step, the values it reads for the last time (their buffers go back to the pool)
        self.release = [
            [n for n in s.inputs if last_use[n] == i and n not in self.outputs] for i, s in enumerate(self.steps)
        ]

    # ---------------------------------------------------------------- constants

    def _fold(self, nodes) -> list:
        """Evaluate constant nodes; return the rest in order."""
        runtime = []
        for node in nodes:
            if _is_unpack_node(node, self.packed):
                continue
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                continue
            inputs = [i for i in node.input if i]
            if inputs and all(i in self.consts for i in inputs) and node.op_type in OPS:
                try:
                    outs = OPS[node.op_type]([self.consts[i] if i else None for i in node.input], attributes(node))
                except (NotImplementedError, ValueError, KeyError, IndexError) as exc:
                    raise Unsupported(f"{node.op_type} node {node.name or node.output[0]}: {exc}") from None
                self.consts.update(zip(node.output, outs, strict=False))
                continue
            runtime.append(node)
        return runtime

    def _weight(self, name: str, what: str) -> SparseWeight:
        if name in self.packed:
            return self.packed[name]
        if name in self.consts:
            return SparseWeight.from_dense(np.asarray(self.consts[name], np.float32))
        raise Unsupported(f"{what} whose weight {name} is computed at run time")

    def _bias(self, node, rows: int) -> np.ndarray:
        """The node's third input as a float32 vector, zeros when it has none."""
        bias = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return np.zeros(rows, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)

    # ---------------------------------------------------------------- steps

    def _compile(self, node, uses: Counter) -> None:
        a = attributes(node)
        handler = {
            "Conv": self._conv,
            "Add": self._residual,
            "Relu": self._relu,
            "BatchNormalization": self._batch_norm,
            "Gemm": self._gemm,
            "GlobalAveragePool": self._global_average_pool,
            "ReduceMean": self._reduce_mean,
            "Mul": self._mul,
            "Pad": self._pad,
            "Slice": self._slice,
            "Softmax": self._softmax,
            "Split": self._split,
        }.get(node.op_type)
        if node.op_type in POINTWISE:
            handler = self._pointwise
        if handler is not None and handler(node, a, uses):
            return
        self._push(Step(node.op_type, self._runtime_inputs(node), node.output[0], self._numpy_op(node, a), node.name))

    def _runtime_inputs(self, node) -> list[str]:
        return [n for n in node.input if n and n not in self.consts]

    def _numpy_op(self, node, a) -> Callable[..., np.ndarray]:
        """The node as a call of its numpy op on its run-time inputs (as arrays) and constants."""
        if node.op_type not in OPS:
            raise Unsupported(f"operator {node.op_type}")
        try:
            CHECKS.get(node.op_type, lambda _a: None)(a)
        except NotImplementedError as exc:
            raise Unsupported(f"{node.op_type} node {node.name or node.output[0]}: {exc}") from None
        fn, consts, names = OPS[node.op_type], self.consts, list(node.input)

        def bind(*values):
            it = iter(values)
            args = [consts[n] if n in consts else (as_array(next(it)) if n else None) for n in names]
            return computed(lambda v: fn(v, a)[0], args)

        return bind

    def _pad(self, node, a, uses) -> bool:
        """Zero channels added to a 4-D activation (an option-A shortcut's x[:, :, ::2, ::2]
        padded with zero channels) join the subsampling step before it, or take planes of their
        own: the residual Add that reads them needs no layout change. Any other Pad runs in numpy."""
        pads = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        fill = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        mode = a.get("mode", b"constant")
        if (
            pads is None
            or len(pads) != 8
            or (fill is not None and np.any(fill))
            or mode not in (b"constant", "constant")
        ):
            return False
        before, after = int(pads[1]), int(pads[5])
        if any(int(p) for i, p in enumerate(pads) if i % 4 != 1) or min(before, after) < 0:
            return False
        sub = self._subsample(node, uses, "Pad", lambda _sub: True)
        sub.before, sub.after = before, after
        return True

    def _slice(self, node, _a, uses) -> bool:
        """x[:, :, a::s, b::t] (constant starts below the steps, to the end, on the spatial axes)
        runs on planes as a `Subsample`; the Slice of the other axis right after it joins the
        same step. Any other Slice runs in numpy."""
        args = [self.consts.get(i) if i else None for i in node.input[1:5]]
        if len(args) < 4 or any(v is None for v in args) or node.input[0] in self.consts:
            return False
        starts, ends, axes, steps = (np.asarray(v).reshape(-1) for v in args)
        spec = {}
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if int(axis) not in (2, 3) or not 0 <= start < step or end < 2**62:
                return False
            spec[int(axis) - 2] = (int(step), int(start))  # 0: height, 1: width
        sub = self._subsample(node, uses, "Slice", lambda sub: all(sub.steps[i] == 1 for i in spec))
        for i, (stride, start) in spec.items():
            sub.steps[i], sub.starts[i] = stride, start
        return True

    def _split(self, node, a, _uses) -> bool:
        """Split (CSP networks, MixNets): a step per output, each a view of its part of the input;
        planes split along the channels are runs of their rows, so nothing is copied."""
        split = None
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.consts:
                raise Unsupported(f"Split {node.name or node.output[0]} with part lengths computed at run time")
            split = self.consts[node.input[1]]
        axis, parts = int(a.get("axis", 0)), len(node.output)

        def cut(length: int, i: int) -> slice:
            ends = np.cumsum([0, *split_sizes(length, parts, split, a)])
            return slice(int(ends[i]), int(ends[i + 1]))

        def take(v: np.ndarray, i: int) -> np.ndarray:
            index = [slice(None)] * v.ndim
            index[axis] = cut(v.shape[axis], i)
            return v[tuple(index)]

        if node.input[0] in self.consts:
            try:
                self.consts.update({out: take(self.consts[node.input[0]], i) for i, out in enumerate(node.output)})
            except (ValueError, IndexError) as exc:
                raise Unsupported(f"Split node {node.name or node.output[0]}: {exc}") from None
            return True
        for i, out in enumerate(node.output):

            def bind(x, i=i):
                if isinstance(x, Planes) and axis in (1, -3):
                    x.viewed = True  # its buffer is shared: never handed back for reuse
                    return Planes(x.data[cut(x.data.shape[0], i)], x.grid, viewed=True), []
                return computed(lambda v: take(v[0], i), [as_array(x)])

            self._push(Step("Split", [node.input[0]], out, bind, node.name))
        return True

    def _subsample(self, node, uses: Counter, kind: str, joins: Callable[[Subsample], bool]) -> Subsample:
        """The Subsample that `node` (a Slice or Pad) configures: that of the step making its
        input when the step has no zero channels yet and `joins` accepts it (the step then
        produces the node's output), else that of a new step."""
        step = self._fusable(node.input[0], uses, ("Slice",))
        sub = self.subsamples.get(node.input[0]) if step is not None else None
        if sub is not None and not sub.before and not sub.after and joins(sub):
            step.fused.append(kind)
            self._rename(step, node.output[0])
            return sub
        sub = Subsample()
        self.subsamples[node.output[0]] = sub

        def bind(x):
            return sub.bind(x, self.pool) if isinstance(x, Planes) else computed(lambda v: sub.nchw(v[0]), [x])

        self._push(Step(kind, [node.input[0]], node.output[0], bind, node.name))
        return sub

    def _push(self, step: Step) -> None:
        self.steps.append(step)
        self.producer[step.output] = step

    def _conv(self, node, a, _uses) -> bool:
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise Unsupported(f"dilated convolution {node.name or node.output[0]}")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise Unsupported(f"convolution {node.name or node.output[0]} with auto_pad")
        weight = self._weight(node.input[1], "convolution")
        if len(weight.shape) != 4:
            raise Unsupported(f"{len(weight.shape) - 2}-D convolution {node.name or node.output[0]}")
        pads = tuple(a.get("pads", [0, 0, 0, 0]))
        strides = tuple(a.get("strides", [1, 1]))
        groups, name = int(a.get("group", 1)), node.name or node.output[0]
        if groups < 1 or weight.shape[0] % groups:
            raise Unsupported(f"convolution {name} of {weight.shape[0]} outputs in {groups} groups")
        conv = Conv(weight, self._bias(node, weight.shape[0]), strides, (pads[0], pads[1], pads[2], pads[3]), groups)

        def bind(x, residual=None, relu=False):
            planes, calls = as_planes(x)
            if residual is not None:
                residual, more = as_planes(residual)
                calls += more
            out, more = conv.bind(planes, residual, relu, self.pool)
            if planes is not x:  # converted here: nothing else reads it
                self.pool.give_phases(planes)
            return out, calls + more

        self._push(Step("Conv", [node.input[0]], node.output[0], bind, node.name or node.output[0], conv))
        return True

    def _fusable(self, name: str, uses: Counter, kinds: tuple[str, ...]) -> Step | None:
        step = self.producer.get(name)
        if step is not None and step.kind in kinds and uses[name] == 1 and name not in self.outputs:
            return step
        return None

    def _residual(self, node, _a, uses) -> bool:
        """Conv (or Mul) -> Add: the other operand becomes the step's residual. It must exist
        before the step runs, so of two such steps the later one takes it; two activations in
        planes are added in place of the generic numpy Add."""
        if len(node.input) != 2 or any(i in self.consts for i in node.input):
            return False
        order = {s.output: i for i, s in enumerate(self.steps)}
        pairs = [(c, o) for c, o in (node.input, node.input[::-1]) if self._fusable(c, uses, EPILOGUE_KINDS)]
        pairs = [(c, o) for c, o in pairs if not self.producer[c].fused]
        if not pairs:
            add = Step("Add", list(node.input), node.output[0], lambda a, b: _add_values(a, b, self.pool), node.name)
            self._push(add)
            return True
        conv_name, other = max(pairs, key=lambda p: order[p[0]])
        step = self.producer[conv_name]
        if order.get(other, -1) > order[conv_name]:  # the residual is made later: run the convolution after it
            self.steps.remove(step)
            self.steps.append(step)
        bind = step.bind
        step.inputs = [*step.inputs, other]
        step.bind = lambda *values, bind=bind, relu=False: bind(*values[:-1], residual=values[-1], relu=relu)
        step.fused.append("Add")
        self._rename(step, node.output[0])
        return True

    def _rename(self, step: Step, output: str) -> None:
        del self.producer[step.output]
        if step.output in self.subsamples:
            self.subsamples[output] = self.subsamples.pop(step.output)
        step.output = output
        self.producer[output] = step

    def _relu(self, node, _a, uses) -> bool:
        step = self._fusable(node.input[0], uses, (*EPILOGUE_KINDS, "BatchNormalization"))
        if step is None or "Relu" in step.fused:
            self._push(Step("Relu", [node.input[0]], node.output[0], lambda x: _relu_values(x, self.pool), node.name))
            return True
        bind = step.bind
        step.bind = lambda *values, bind=bind: bind(*values, relu=True)
        step.fused.append("Relu")
        self._rename(step, node.output[0])
        return True

    def _batch_norm(self, node, a, _uses) -> bool:
        if not all(i in self.consts for i in node.input[1:5]):
            raise Unsupported(f"batch norm {node.name or node.output[0]} with run-time statistics")
        scale, shift = bn_affine([self.consts[i] for i in node.input[1:5]], a)

        def bind(x, relu=False, scale=scale, shift=shift):
            if isinstance(x, Planes) or np.ndim(x) == 4:
                p, calls = as_planes(x)
                out = Planes.empty(p.data.shape[0], p.grid, self.pool)
                affine = functools.partial(kernels.channel_affine, p.data, scale, shift, mask(p.grid), relu, out.data)
                return out, [*calls, affine]
            return computed(lambda v: np.maximum(v[0] * scale + shift, 0) if relu else v[0] * scale + shift, [x])

        self._push(Step("BatchNormalization", [node.input[0]], node.output[0], bind, node.name))
        return True

    def _gemm(self, node, a, _uses) -> bool:
        w_name = node.input[1]
        if not (w_name in self.packed or w_name in self.consts) or a.get("transA", 0):
            return False
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return False
        weight = self._weight(w_name, "Gemm")
        if not a.get("transB", 0):  # W is (in, out): index the transposed nonzeros
            w_in, w_out = weight.shape
            r, c = np.unravel_index(weight.index, weight.shape)
            order = np.lexsort((r, c))
            weight = SparseWeight((w_out, w_in), (c * w_in + r)[order], weight.values[order])
        bias = self._bias(node, weight.shape[0])
        if bias.size != weight.shape[0]:
            return False
        linear = Linear(weight, bias)
        self._push(Step("Gemm", [node.input[0]], node.output[0], lambda x: linear.bind(as_array(x)), node.name, linear))
        return True

    def _global_average_pool(self, node, _a, _uses) -> bool:
        self._push(Step("GlobalAveragePool", [node.input[0]], node.output[0], _spatial_means, node.name))
        return True

    def _reduce_mean(self, node, a, _uses) -> bool:
        """The mean over height and width with kept dimensions (a squeeze-and-excitation block's
        pooling) is global average pooling on planes; any other ReduceMean runs in numpy."""
        if len(node.input) > 1 and node.input[1] and node.input[1] not in self.consts:
            return False
        axes = reduce_axes([None, self.consts.get(node.input[1]) if len(node.input) > 1 else None], a)
        if axes is None or sorted(axes) not in ([2, 3], [-2, -1]) or not a.get("keepdims", 1):
            return False
        numpy_bind = self._numpy_op(node, a)

        def bind(x):
            return _spatial_means(x) if isinstance(x, Planes) else numpy_bind(x)

        self._push(Step("ReduceMean", [node.input[0]], node.output[0], bind, node.name))
        return True

    def _pointwise(self, node, a, _uses) -> bool:
        """An elementwise activation of ops.POINTWISE (ReLU6 as Clip, LeakyRelu, HardSwish,
        HardSigmoid) with constant parameters. On planes it is one pass over the whole buffer
        when it maps 0 to 0, so the padding stays zero and the layout stays; otherwise (an
        activation of 0 is not 0, as HardSigmoid's 0.5) it runs in numpy."""
        params = node.input[1:]
        if any(p and p not in self.consts for p in params):
            return False
        f = POINTWISE[node.op_type]([self.consts[p] if p else None for p in params], a)
        at_zero = np.zeros(1, np.float32)
        f(np.zeros(1, np.float32), at_zero)
        keeps_zero, numpy_bind = not at_zero.any(), self._numpy_op(node, a)

        def bind(x):
            if isinstance(x, Planes) and keeps_zero:
                out = Planes.empty(x.data.shape[0], x.grid, self.pool)
                return out, [functools.partial(f, x.data, out.data)]
            return numpy_bind(x)

        self._push(Step(node.op_type, [node.input[0]], node.output[0], bind, node.name))
        return True

    def _silu(self, node, uses) -> bool:
        """x * Sigmoid(x), the Sigmoid read by this Mul alone (SiLU: EfficientNets, timm's *ts
        ResNets), is one step: on planes, numpy's vectorised exp over the whole buffer, whose zero
        padding stays zero (0 * sigmoid(0) = 0), with no layout change; a residual Add and a ReLU
        after it fuse in."""
        inputs = list(node.input)
        if len(inputs) != 2:
            return False
        for x, s in (inputs, inputs[::-1]):
            step = self.producer.get(s)
            if step is not None and step.kind == "Sigmoid" and step.inputs == [x] and uses[s] == 1:
                break
        else:
            return False
        if self.steps[-1] is not step or s in self.outputs:
            return False
        self.steps.pop()
        del self.producer[s]

        def bind(v, residual=None, relu=False):
            if isinstance(v, Planes):
                out = Planes.empty(v.data.shape[0], v.grid, self.pool)
                calls = [functools.partial(_silu_planes, v.data, out.data)]
            else:
                out, calls = computed(lambda a: a[0] * OPS["Sigmoid"](a, {})[0], [as_array(v)])
            return _epilogue(out, calls, residual, relu, self.pool)

        self._push(Step("SiLU", [x], node.output[0], bind, node.name))
        return True

    def _mul(self, node, a, uses) -> bool:
        """Mul, with a residual Add and ReLU after it fused in. An activation in planes times a
        run-time N x C x 1 x 1 gate (squeeze-and-excitation) is one pass on planes, and so is
        an activation times its own Sigmoid (`_silu`); anything else (the classifier's
        temperature, other shapes) runs in numpy."""
        if self._silu(node, uses):
            return True
        factors = [self.consts[i] for i in node.input if i in self.consts]
        if len(node.input) == 2 and len(factors) == 1 and np.size(factors[0]) == 1:  # a Softmax may fold it in
            self.scalars[node.output[0]] = np.float32(np.asarray(factors[0]).reshape(-1)[0])
        numpy_bind = self._numpy_op(node, a)

        def bind(*values, residual=None, relu=False):
            if len(values) == 2:
                for x, gate in (values, values[::-1]):
                    bound = _gate_planes(x, gate, residual, relu, self.pool)
                    if bound is not None:
                        return bound
            return _epilogue(*numpy_bind(*values), residual, relu, self.pool)

        self._push(Step("Mul", self._runtime_inputs(node), node.output[0], bind, node.name))
        return True

    def _softmax(self, node, a, uses) -> bool:
        """Softmax over the last axis of a 2-D float32 activation (the classifier's probabilities)
        is one kernel call, with a Mul by a scalar constant right before it folded in when only
        the Softmax reads that product (cigl's temperature: probs = softmax(logits * (1 / T)));
        any other Softmax runs in numpy."""
        numpy_bind, source, scale = self._numpy_op(node, a), node.input[0], np.float32(1.0)
        step = self._fusable(source, uses, ("Mul",))
        if step is not None and source in self.scalars and not step.fused and step is self.steps[-1]:
            self.steps.pop()
            del self.producer[source]
            source, scale = step.inputs[0], self.scalars[source]
        axis = a.get("axis", -1)

        def bind(x):
            x = as_array(x)
            if x.ndim == 2 and x.dtype == np.float32 and axis in (-1, 1):
                out = np.empty(x.shape, np.float32)
                return out, [functools.partial(kernels.softmax_rows, x, scale, out)]
            if scale != 1:
                x, calls = computed(lambda v: v[0] * scale, [x])
                out, more = numpy_bind(x)
                return out, calls + more
            return numpy_bind(x)

        kind = "Mul+Softmax" if source != node.input[0] else "Softmax"
        self._push(Step(kind, [source], node.output[0], bind, node.name))
        return True

    # ---------------------------------------------------------------- running

    def bind(self, shape: tuple[int, ...]) -> Schedule:
        """The program bound to inputs of `shape`. Step by step, each output's buffers are taken
        from a pool and handed back after the value's last use, where a later step takes them
        again: the calls run in this order, so a buffer is rewritten only once its readers ran.
        numpy's ops are evaluated here once, on zeros, for their shapes; a step that fails on
        them raises Unsupported, naming it."""
        self.pool = BufferPool()
        images = np.zeros(shape, np.float32)
        values: dict[str, Value] = {self.input: images}
        calls, pixels = [], []
        with np.errstate(all="ignore"):
            for step, release in zip(self.steps, self.release, strict=True):
                try:
                    out, step_calls = step.bind(*[values[n] for n in step.inputs])
                except Unsupported:
                    raise
                except Exception as exc:  # e.g. numpy's op refusing a type or shape seen only now
                    what = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                    raise Unsupported(f"{step.label} node {step.name or step.output}: {what}") from None
                values[step.output] = out
                calls.append(step_calls)
                pixels.append(out.grid.h * out.grid.w if isinstance(out, Planes) else 1)
                for name in release:
                    done = values.pop(name, None)
                    if isinstance(done, Planes) and done is not out:
                        if done.phases:
                            self.pool.give_phases(done)
                        if not done.viewed:
                            self.pool.give(done.data, planes=True)
        outputs = {name: as_array(values[name]) for name in self.outputs if name in values}
        return Schedule(images, calls, pixels, outputs)

    def run(self, images: np.ndarray, trace: list | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs for `images` (copies: the schedule's buffers are reused by the next
        run). With `trace`, (seconds, output pixels per image) of each step are appended to it."""
        shape = tuple(np.shape(images))
        schedule = self.schedules.pop(shape, None) or self.bind(shape)
        self.schedules[shape] = schedule
        if len(self.schedules) > SCHEDULES:  # every batch size a server met would otherwise keep its buffers
            self.schedules.popitem(last=False)
        np.copyto(schedule.images, images)
        if trace is None:
            run_calls(schedule.flat)
        else:
            for calls, pixels in zip(schedule.calls, schedule.pixels, strict=True):
                start = time.perf_counter()
                run_calls(calls)
                trace.append((time.perf_counter() - start, pixels))
        outputs = schedule.outputs
        return {name: outputs[name].copy() if name in outputs else self.consts[name] for name in self.outputs}

    def macs_per_image(self, trace: list) -> list[int]:
        """Each step's multiply-adds per image, from a traced run: its nonzeros x output pixels."""
        return [s.nonzeros * pixels for s, (_, pixels) in zip(self.steps, trace, strict=True)]

    def profile(self, images: np.ndarray, repeats: int = 3) -> list[dict]:
        """Per step, the best of `repeats` timed runs (after one warm-up run)."""
        self.run(images)
        runs = []
        for _ in range(repeats):
            runs.append([])
            self.run(images, runs[-1])
        return [
            {
                "step": s.label,
                "name": s.name,
                "seconds": min(r[i][0] for r in runs),
                "macs_per_image": macs,
            }
            for i, (s, macs) in enumerate(zip(self.steps, self.macs_per_image(runs[0]), strict=True))
        ]
