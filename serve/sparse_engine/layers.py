"""Convolutions and linear layers on sparse weights, stored as their nonzeros only.

`SparseWeight` keeps the flat C-order positions and values of a weight's nonzeros, read straight
from a packed tensor (values + bit mask) or from a plain one. For a given input geometry a layer
turns them into the kernel's per-row tables (plane, offset, value); tables are cached per input
height and width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from cigl.packing import unpack_mask
from cigl.serve.sparse_engine import kernels
from cigl.serve.sparse_engine.layout import BufferPool, Grid, Planes, mask
from cigl.serve.sparse_engine.ops import padded


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

    def tables(self, plane: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, ...]:
        """The kernel's (bounds int64, planes int32, offs int32, vals float32) for the per-nonzero
        `plane` and `offset`: row o's nonzeros, sorted by plane, are bounds[o, 0] .. bounds[o, -1],
        cut into parts of a few planes each (kernels.part_bounds)."""
        order, bounds = kernels.part_bounds(self.taps()[0], plane, int(offset.max(initial=0)) + 1, self.shape[0])
        return bounds, plane[order].astype(np.int32), offset[order].astype(np.int32), self.values[order]


@dataclass
class Conv:
    """A 2-D convolution (group 1, dilation 1) with a sparse weight and a bias."""

    weight: SparseWeight
    bias: np.ndarray
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right

    def __post_init__(self):
        self.tables: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}  # per input (h, w)

    @property
    def nbytes(self) -> int:
        """Bytes held: the nonzeros, the bias and the kernel tables built so far."""
        return self.weight.nbytes + self.bias.nbytes + sum(a.nbytes for t in self.tables.values() for a in t)

    def _tables(self, h: int, w: int) -> tuple[np.ndarray, ...]:
        if (h, w) not in self.tables:
            self.tables[h, w] = self._build_tables(h, w)
        return self.tables[h, w]

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

    @functools.cached_property
    def used_phases(self) -> np.ndarray:
        """The stride phases (a * stride_w + b) that some nonzero reads, sorted: only these are gathered."""
        _, _, kh, kw = self.weight.taps()
        return np.unique((kh % self.stride[0]) * self.stride[1] + kw % self.stride[1]).astype(np.int64)

    def _build_tables(self, h: int, w: int):
        _, ic, kh, kw = self.weight.taps()
        if self.direct:
            pt, pl = self.pads[:2]
            return self.weight.tables(ic, (kh - pt + 1) * (w + 1) + (kw - pl + 1))
        sh, sw = self.stride
        _, wq, _ = self._phases(h, w)
        phase = np.searchsorted(self.used_phases, (kh % sh) * sw + kw % sw)  # its place among the gathered
        return self.weight.tables(phase * self.weight.shape[1] + ic, (kh // sh) * wq + kw // sw)

    def __call__(
        self, x: Planes, residual: Planes | None = None, relu: bool = False, pool: BufferPool | None = None
    ) -> Planes:
        g = x.grid
        tables = self._tables(g.h, g.w)
        rows = self.weight.shape[0]
        res = residual.data if residual is not None else kernels.empty_rows()[0]
        if self.direct:
            out = Planes.empty(rows, g, pool)
            kernels.sparse_conv(x.data, *tables, self.bias, out.data, g.row + 1, g.n * g.block, res, mask(g), relu)
            return out
        # strided or widely padded: one plane per (stride phase, channel), then the same kernel
        hq, wq, extra = self._phases(g.h, g.w)
        _, _, kh, kw = self.weight.shape
        sh, sw = self.stride
        reach = ((kh - 1) // sh) * wq + (kw - 1) // sw + 1
        pool = pool or BufferPool()
        phases = self.used_phases
        src = pool.take((max(1, phases.size) * x.data.shape[0], g.n * hq * wq + reach))
        kernels.gather_phases(x.data, g.n, g.h, g.w, self.pads[0], self.pads[1], sh, sw, hq, wq, phases, src)
        out_grid = Grid(g.n, *self.output_size(g.h, g.w))
        if extra == 1:  # phase planes have the output's geometry: write the output planes directly
            out = Planes.empty(rows, out_grid, pool)
            kernels.sparse_conv(
                src,
                *tables,
                self.bias,
                out.data,
                out_grid.row + 1,
                g.n * hq * wq,
                res,
                mask(out_grid),
                relu,
            )
        else:  # the kernel reaches further: compute on the phase geometry, then place the outputs
            flat = pool.take((rows, g.n * hq * wq))
            kernels.sparse_conv(src, *tables, self.bias, flat, 0, g.n * hq * wq, *kernels.empty_rows(), False)
            y = flat.reshape(rows, g.n, hq, wq)[:, :, : out_grid.h, : out_grid.w].transpose(1, 0, 2, 3)
            if residual is not None:
                y = y + residual.nchw()
            out = Planes.from_nchw(np.maximum(y, 0) if relu else y)
            pool.give(flat)
        pool.give(src)
        return out


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
        return self.weight.nbytes + self.bias.nbytes + sum(a.nbytes for a in self.tables)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        src = np.ascontiguousarray(x.T, dtype=np.float32)
        out = np.empty((self.weight.shape[0], n), np.float32)
        res, no_mask = kernels.empty_rows()
        kernels.sparse_conv(src, *self.tables, self.bias, out, 0, n, res, no_mask, False)
        return out.T


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

    def __call__(self, x: Planes, pool: BufferPool | None = None) -> Planes:
        g, channels = x.grid, x.data.shape[0]
        (sh, sw), (a, b) = self.steps, self.starts
        ho, wo = -(-(g.h - a) // sh), -(-(g.w - b) // sw)
        out = Planes.empty(self.before + channels + self.after, Grid(g.n, ho, wo), pool)
        out.data[: self.before] = 0.0
        out.data[self.before + channels :] = 0.0
        body = out.data[self.before : self.before + channels]
        phase = np.array([a * sw + b], np.int64)
        kernels.gather_phases(x.data, g.n, g.h, g.w, sh, sw, sh, sw, ho + 1, wo + 1, phase, body)
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
