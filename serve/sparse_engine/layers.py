"""Convolutions and linear layers on sparse weights, stored as their nonzeros only.

`SparseWeight` keeps the flat C-order positions and values of a weight's nonzeros, read straight
from a packed tensor (values + bit mask) or from a plain one. For a given input geometry a layer
turns them into the kernel's per-row tables (plane, offset, value); tables are cached per input
height and width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cigl.errors import FormatError
from cigl.packing import unpack_mask
from cigl.serve.sparse_engine import kernels, quads
from cigl.serve.sparse_engine.layout import BufferPool, Call, Grid, Planes, mask, run_calls
from cigl.serve.sparse_engine.ops import padded

PLANS = 8  # input sizes (batch, height, width) a convolution keeps its call plan for, and (height, width) its tables


def _remember(cache: dict, key, value, limit: int = PLANS):
    """cache[key] = value as its most recently used entry, dropping the least recently used past
    `limit` (a plan holds a padding mask as long as its batch's planes; tables are per image size,
    which a graph with free height and width lets callers vary without end). Returns value."""
    cache.pop(key, None)
    cache[key] = value
    if len(cache) > limit:
        del cache[next(iter(cache))]
    return value


def _compact(index: np.ndarray) -> np.ndarray:
    return index.astype(np.int32) if index.size == 0 or index[-1] < 2**31 else index


@dataclass
class SparseWeight:
    """The nonzeros of a weight of `shape` (out, in, kh, kw) or (out, in): flat positions in C order
    (sorted) and their values."""

    shape: tuple[int, ...]
    index: np.ndarray  # int32 (int64 past 2**31 elements)
    values: np.ndarray  # float32

    @classmethod
    def from_dense(cls, w: np.ndarray) -> SparseWeight:
        index = np.flatnonzero(w)
        return cls(tuple(w.shape), _compact(index), w.reshape(-1)[index].astype(np.float32))

    @classmethod
    def from_packed(cls, values: np.ndarray, bits: np.ndarray, shape: tuple[int, ...]) -> SparseWeight:
        """From a packed tensor: the set bits of `bits` (little-endian, C order) hold `values`."""
        index = np.flatnonzero(unpack_mask(bits, int(np.prod(shape))))
        if index.size != values.size and not (index.size == 0 and values.size == 1):
            raise ValueError(f"{values.size} values for {index.size} mask bits")
        return cls(tuple(shape), _compact(index), values[: index.size].astype(np.float32))

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.values.nbytes

    @property
    def density(self) -> float:
        return self.index.size / max(1, int(np.prod(self.shape)))

    def taps(self) -> tuple[np.ndarray, ...]:
        """(out row, input channel, kh, kw) of every nonzero."""
        shape = self.shape if len(self.shape) == 4 else (*self.shape, 1, 1)
        return np.unravel_index(self.index, shape)

    def tables(self, plane: np.ndarray, offset: np.ndarray) -> kernels.RowTables | quads.QuadTables:
        """The kernel's tables for the per-nonzero `plane` and `offset`: quad tables (four rows
        at a time) from QUAD_MIN_DENSITY up, where rows share most taps; row tables below."""
        rows, span = self.taps()[0], int(offset.max(initial=0)) + 1
        make = quads.quad_tables if self.density >= quads.QUAD_MIN_DENSITY else kernels.row_tables
        return make(rows, plane, offset, self.values, span, self.shape[0])


@dataclass(frozen=True)
class Phases:
    """The stride-phase planes a gather makes of an input: plane j * C + c holds, on an hq x wq
    grid per image, input element (c, r * sh + a - top, t * sw + b - left) at (r, t), where
    phases[j] = a * sw + b (zero outside the image). Hashable: an activation keeps its gathers
    by this key (Planes.phases), so convolutions that read the same phases of one input (a
    block's strided 3x3 and its 1x1 shortcut) gather them once."""

    stride: tuple[int, int]
    grid: tuple[int, int]  # hq, wq
    pads: tuple[int, int]  # top, left
    phases: tuple[int, ...]

    @functools.cached_property
    def array(self) -> np.ndarray:
        """phases as the gather kernel takes them (made once: a call's overhead counts at batch 1)."""
        return np.array(self.phases, np.int64)

    def origins(self) -> list[tuple[int, int]]:
        """(row, column) of the input element at (0, 0) of each phase, in plane-group order."""
        sw = self.stride[1]
        return [(ph // sw - self.pads[0], ph % sw - self.pads[1]) for ph in self.phases]


@dataclass(frozen=True)
class _Plan:
    """Everything a convolution's call needs for one input geometry, worked out once: the
    kernel tables, the output grid and where the kernel reads and writes."""

    tables: kernels.RowTables | quads.QuadTables
    out_grid: Grid
    shift: int  # the kernel writes output position q at shift + q
    length: int  # output positions per plane the kernel computes
    mask: np.ndarray  # re-zeroes the padding the kernel wrote (empty on the flat path)
    gather: Phases | None = None  # the phase planes it reads (gather path), None when direct
    src_shape: tuple[int, int] | None = None  # (planes, length) a gather of them needs at least
    flat: bool = False  # the kernel reaches past the phase planes: compute flat, then place


@dataclass
class Conv:
    """A 2-D convolution (dilation 1) with a sparse weight and a bias. With `groups`, output
    row o reads the input channels of its group only: its nonzeros simply name those planes
    (`channels`), so the kernels and their tables are those of group 1."""

    weight: SparseWeight  # (out, in / groups, kh, kw)
    bias: np.ndarray
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    groups: int = 1

    def __post_init__(self):
        self.plans: dict[tuple[int, int, int], _Plan] = {}  # per input (n, h, w)
        self.tables: dict[tuple, kernels.RowTables | quads.QuadTables] = {}  # per input (h, w) and phase planes read

    @property
    def nbytes(self) -> int:
        """Bytes held: the nonzeros, the bias and the kernel tables built so far."""
        return self.weight.nbytes + self.bias.nbytes + sum(t.nbytes for t in self.tables.values())

    @property
    def direct(self) -> bool:
        """Stride 1, same-size output, padding <= 1: reads and writes the padded planes in place."""
        _, _, kh, kw = self.weight.shape
        pt, pl, pb, pr = self.pads
        return self.stride == (1, 1) and kh - 1 == pt + pb and kw - 1 == pl + pr and max(self.pads) <= 1

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        _, _, kh, kw = self.weight.shape
        pt, pl, pb, pr = self.pads
        return (h + pt + pb - kh) // self.stride[0] + 1, (w + pl + pr - kw) // self.stride[1] + 1

    def _phases(self, h: int, w: int) -> tuple[int, int, int]:
        """(hq, wq, extra) of the stride-phase planes (gather path): each phase is hq x wq per
        image, one row and column more than the output when the kernel reaches at most one phase
        step beyond it (then the kernel writes the output planes directly), more otherwise."""
        ho, wo = self.output_size(h, w)
        _, _, kh, kw = self.weight.shape
        eh, ew = max(1, (kh - 1) // self.stride[0]), max(1, (kw - 1) // self.stride[1])
        return ho + eh, wo + ew, eh * ew

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @functools.cached_property
    def channels(self) -> np.ndarray:
        """The input channel each nonzero reads: its weight's input channel, in its row's group."""
        rows, ic = self.weight.taps()[:2]
        out, per_group = self.weight.shape[0], self.weight.shape[1]
        return ic if self.groups == 1 else rows // (out // self.groups) * per_group + ic

    @functools.cached_property
    def used_phases(self) -> np.ndarray:
        """The stride phases (a * stride_w + b) that some nonzero reads, sorted: only these are gathered."""
        _, _, kh, kw = self.weight.taps()
        return np.unique((kh % self.stride[0]) * self.stride[1] + kw % self.stride[1]).astype(np.int64)

    def _phase_taps(self, phases: Phases) -> tuple[np.ndarray, np.ndarray] | None:
        """(plane, offset) of every nonzero in the phase planes `phases`, or None when they lack a
        phase a nonzero reads (or would need a negative offset). Nonzero (kh, kw) reads input
        (r * sh + kh - top, ...): the phase whose origin dy is congruent to kh - top, at
        (kh - top - dy) / sh rows down."""
        _, _, kh, kw = self.weight.taps()
        (sh, sw), (pt, pl) = self.stride, self.pads[:2]
        dy, dx = kh - pt, kw - pl
        index, origin = np.full((sh, sw), -1), np.zeros((sh, sw, 2), np.int64)  # by residue of (dy, dx)
        for j, (oy, ox) in enumerate(phases.origins()):
            index[oy % sh, ox % sw], origin[oy % sh, ox % sw] = j, (oy, ox)
        phase, start = index[dy % sh, dx % sw], origin[dy % sh, dx % sw]
        down, right = (dy - start[:, 0]) // sh, (dx - start[:, 1]) // sw
        if (phase < 0).any() or min(down.min(initial=0), right.min(initial=0)) < 0:
            return None
        return phase * self.in_channels + self.channels, down * phases.grid[1] + right

    def _gather_for(self, g: Grid, gathered: dict[Phases, np.ndarray]) -> tuple[Phases, tuple[int, int]]:
        """The phase planes to read and the (planes, length) they need: another convolution's
        gather of this input when it holds every phase read, on this grid, long enough; else
        this convolution's own (only the phases its nonzeros read)."""
        hq, wq, _ = self._phases(g.h, g.w)
        _, _, kh, kw = self.weight.shape
        reach = ((kh - 1) // self.stride[0]) * wq + (kw - 1) // self.stride[1] + 1
        own = Phases(self.stride, (hq, wq), self.pads[:2], tuple(int(p) for p in self.used_phases))
        for phases, src in gathered.items():
            if phases.stride != self.stride or phases.grid != (hq, wq) or phases == own:
                continue
            taps = self._phase_taps(phases)
            if taps is None:
                continue
            need = g.n * hq * wq + max(reach, int(taps[1].max(initial=0)) + 1)
            if src.shape[1] >= need:
                return phases, (src.shape[0], need)
        return own, (max(1, len(own.phases)) * self.in_channels, g.n * hq * wq + reach)

    def _tables(self, key: tuple, make: Callable[[], kernels.RowTables | quads.QuadTables]):
        """The kernel tables kept under `key` (made by `make` the first time), most recently used."""
        tables = self.tables.get(key)
        return _remember(self.tables, key, make() if tables is None else tables)

    def plan(self, g: Grid, gathered: dict[Phases, np.ndarray] | None = None) -> _Plan:
        """The call plan for inputs of grid g (built on first use, then cached); `gathered`: the
        phase planes other convolutions made of the input, which a strided one may share."""
        plan = self.plans.get((g.n, g.h, g.w))
        if plan is not None:
            return _remember(self.plans, (g.n, g.h, g.w), plan)
        out_grid = Grid(g.n, *self.output_size(g.h, g.w))
        if self.direct:

            def direct_tables():  # nonzero (kh, kw) reads output position q's input at q + offset
                _, _, kh, kw = self.weight.taps()
                pt, pl = self.pads[:2]
                return self.weight.tables(self.channels, (kh - pt + 1) * g.row + (kw - pl + 1))

            tables = self._tables((g.h, g.w), direct_tables)
            plan = _Plan(tables, out_grid, g.row + 1, g.n * g.block, mask(g))
        else:
            phases, src_shape = self._gather_for(g, gathered or {})
            tables = self._tables((g.h, g.w, phases), lambda: self.weight.tables(*self._phase_taps(phases)))
            hq, wq, extra = self._phases(g.h, g.w)
            if extra == 1:  # phase planes have the output's geometry: write the output planes directly
                plan = _Plan(tables, out_grid, out_grid.row + 1, g.n * hq * wq, mask(out_grid), phases, src_shape)
            else:
                plan = _Plan(tables, out_grid, 0, g.n * hq * wq, kernels.NO_MASK, phases, src_shape, flat=True)
        return _remember(self.plans, (g.n, g.h, g.w), plan)

    def bind(
        self, x: Planes, residual: Planes | None = None, relu: bool = False, pool: BufferPool | None = None
    ) -> tuple[Planes, list[Call]]:
        """The output planes for input x (buffers taken now) and the calls that compute them."""
        if x.data.shape[0] != self.in_channels:  # the kernels index planes without bounds checks
            raise FormatError(f"a convolution of {self.in_channels} input channels is given {x.data.shape[0]}")
        g, plan = x.grid, self.plan(x.grid, x.phases)
        rows, pool = self.weight.shape[0], pool or BufferPool()
        src, calls = x.data, []
        if plan.gather is not None:  # strided or widely padded: one plane per (stride phase, channel)
            if x.phases is None:
                x.phases = {}
            p = plan.gather
            src = x.phases.get(p)
            if src is None or src.shape[1] < plan.src_shape[1]:  # not gathered yet, or too short for this one
                if src is not None:
                    pool.give(src)
                src = x.phases[p] = pool.take(plan.src_shape)  # kept with x for others (handed back with it)
                args = (x.data, g.n, g.h, g.w, *p.pads, *p.stride, *p.grid, p.array, src)
                calls.append(functools.partial(kernels.gather_phases, *args))
        if plan.flat:  # the kernel reaches past the phase planes: compute on them, then place the outputs
            hq, wq = plan.gather.grid
            flat = pool.take((rows, plan.length))
            calls.append(self._kernel(src, flat, plan, None, False))
            og = plan.out_grid
            y = flat.reshape(rows, g.n, hq, wq)[:, :, : og.h, : og.w].transpose(1, 0, 2, 3)
            out, place = Planes.bind_nchw(y, add=None if residual is None else residual.nchw(), relu=relu)
            calls += place
            pool.give(flat)
        else:
            out = Planes.empty(rows, plan.out_grid, pool)
            calls.append(self._kernel(src, out.data, plan, residual, relu))
        return out, calls

    def __call__(
        self, x: Planes, residual: Planes | None = None, relu: bool = False, pool: BufferPool | None = None
    ) -> Planes:
        out, calls = self.bind(x, residual, relu, pool)
        run_calls(calls)
        return out

    def _kernel(self, src: np.ndarray, out: np.ndarray, plan: _Plan, residual: Planes | None, relu: bool) -> Call:
        res = residual.data if residual is not None else kernels.NO_RESIDUAL
        return plan.tables.call(src, self.bias, out, plan.shift, plan.length, res, plan.mask, relu)


@dataclass
class Linear:
    """y = x W^T + b with a sparse W of shape (out, in): each input feature is a plane of length N."""

    weight: SparseWeight
    bias: np.ndarray

    def __post_init__(self):
        _, feature = self.weight.taps()[:2]
        self.tables = self.weight.tables(feature, np.zeros_like(feature))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes + self.tables.nbytes

    def bind(self, x: np.ndarray) -> tuple[np.ndarray, list[Call]]:
        """The (N, out) output for input x (read when the calls run) and the calls that compute it."""
        n = x.shape[0]
        src, out = np.empty((x.shape[1], n), np.float32), np.empty((self.weight.shape[0], n), np.float32)
        kernel = self.tables.call(src, self.bias, out, 0, n, kernels.NO_RESIDUAL, kernels.NO_MASK, False)
        return out.T, [functools.partial(np.copyto, src, x.T), kernel]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out, calls = self.bind(x)
        run_calls(calls)
        return out


@dataclass
class Subsample:
    """x[:, :, starts[0]::steps[0], starts[1]::steps[1]] with `before` and `after` zero channels
    around it (an option-A shortcut: subsample, then pad channels), planes in and planes out.

    One strided copy: `kernels.gather_phases` with the single phase `starts` and a padding of
    one step, so output row and column 0 fall on zeros (the layout's own padding)."""

    steps: list[int] = field(default_factory=lambda: [1, 1])  # height, width
    starts: list[int] = field(default_factory=lambda: [0, 0])
    before: int = 0
    after: int = 0

    def bind(self, x: Planes, pool: BufferPool | None = None) -> tuple[Planes, list[Call]]:
        """The output planes (taken now) and the calls that fill them."""
        g, channels = x.grid, x.data.shape[0]
        (sh, sw), (a, b) = self.steps, self.starts
        ho, wo = -(-(g.h - a) // sh), -(-(g.w - b) // sw)
        og = Grid(g.n, ho, wo)
        out = Planes.empty(self.before + channels + self.after, og, pool)
        for phases, src in (x.phases or {}).items():  # the block's strided convolution gathered it already
            origins = phases.origins()
            if phases.stride == (sh, sw) and phases.grid == (ho + 1, wo + 1) and (a, b) in origins:
                j = origins.index((a, b))
                # phase position k holds element k - (row + 1) of the output layout, padding included
                part = src[j * channels : (j + 1) * channels]
                args = (part, out.data, self.before, og.row + 1, g.n * og.block)
                return out, [functools.partial(kernels.place_channels, *args)]
        # the zero channels are zeroed by a call too: other values use the buffer between runs
        zeros = [z for z in (out.data[: self.before], out.data[self.before + channels :]) if z.size]
        body = out.data[self.before : self.before + channels]
        phase = np.array([a * sw + b], np.int64)
        args = (x.data, g.n, g.h, g.w, sh, sw, sh, sw, ho + 1, wo + 1, phase, body)
        return out, [*(functools.partial(z.fill, 0.0) for z in zeros), functools.partial(kernels.gather_phases, *args)]

    def __call__(self, x: Planes, pool: BufferPool | None = None) -> Planes:
        out, calls = self.bind(x, pool)
        run_calls(calls)
        return out

    def nchw(self, x: np.ndarray) -> np.ndarray:
        """The same on an array (axes 2 and 3 sliced where they exist, channels on axis 1)."""
        index = [slice(None)] * x.ndim
        for axis, (step, start) in enumerate(zip(self.steps, self.starts, strict=True), start=2):
            if step > 1 or start:
                index[axis] = slice(start, None, step)
        widths = [(0, 0)] * x.ndim
        widths[1] = (self.before, self.after)
        return padded(x[tuple(index)], widths)
