"""The engine's activation layout: per channel, every image of the batch in one flat plane with
one shared row and column of zero padding.

Element (n, c, y, x) of an N x C x H x W tensor lives at data[c, n * block + (y + 1) * row + x + 1]
with row = W + 1 and block = (H + 1) * row: row 0 and column 0 of each image are zeros, and the
zero column of row y + 1 is also the right padding of row y, the zero row of image n + 1 the
bottom padding of image n. A 3x3, stride-1, padding-1 convolution then reads tap (kh, kw) of
output q = n * block + y * row + x at q + kh * row + kw, for the whole batch in one long loop,
and writes q at q + row + 1, back in this layout; the positions it wrote junk to (column 0 and
row 0) are re-zeroed by `mask`. The tail (2 rows + 4) keeps every read of the last image in bounds.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Geometry of a batch of n images of h x w in the padded-plane layout."""

    n: int
    h: int
    w: int

    @property
    def row(self) -> int:
        return self.w + 1

    @property
    def block(self) -> int:
        return (self.h + 1) * self.row

    @property
    def length(self) -> int:
        return self.n * self.block + 2 * self.row + 4

    def interior(self, data: np.ndarray) -> np.ndarray:
        """The (C, N, H, W) view of the elements of `data`."""
        return data[:, : self.n * self.block].reshape(-1, self.n, self.h + 1, self.row)[:, :, 1:, 1:]


Call = Callable[[], object]  # one bound computation of a run: its arrays fixed when it was bound


def run_calls(calls: list[Call]) -> None:
    for call in calls:
        call()


class BufferPool:
    """Float32 buffers handed back after their value's last use and taken again by later values of
    the same shape, while a schedule is bound (graph.Program.bind): the run's memory plan, made
    once per input shape and kept, since a fresh multi-megabyte array costs a page fault per 4 KiB
    on first write. Buffers of Planes are kept apart: their padding is zero when they come back
    (the layout's invariant), so one taken again needs no clearing."""

    def __init__(self):
        self._free: dict[tuple[bool, tuple[int, ...]], list[np.ndarray]] = defaultdict(list)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        free = self._free.get((False, shape))
        return free.pop() if free else np.empty(shape, np.float32)

    def give(self, array: np.ndarray, planes: bool = False) -> None:
        self._free[planes, array.shape].append(array)

    def give_phases(self, planes: Planes) -> None:
        """Hand back the phase planes gathered of an activation that is no longer used."""
        if planes.phases:
            for data in planes.phases.values():
                self.give(data)
            planes.phases = None

    def take_planes(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A handed-back Planes buffer of `shape` (zero padding), or None."""
        free = self._free.get((True, shape))
        return free.pop() if free else None


@dataclass
class Planes:
    """An activation in the padded-plane layout: data is (C, grid.length) float32. `viewed`
    records that nchw() handed out a view, so the buffer must not be reused; `phases` holds the
    stride-phase planes strided convolutions gathered of it, shared by those that read the same."""

    data: np.ndarray
    grid: Grid
    viewed: bool = field(default=False, compare=False)
    phases: dict | None = field(default=None, compare=False)  # layers.Phases -> its gathered planes

    @classmethod
    def empty(cls, channels: int, grid: Grid, pool: BufferPool | None = None) -> Planes:
        """Uninitialised interior, zero padding at both ends (the parts a convolution never writes)."""
        shape = (channels, grid.length)
        data = pool.take_planes(shape) if pool is not None else None
        if data is None:
            data = np.empty(shape, np.float32)
            data[:, : grid.row + 1] = 0
            data[:, grid.n * grid.block + grid.row + 1 :] = 0
        return cls(data, grid)

    @classmethod
    def bind_nchw(cls, x: np.ndarray, add: np.ndarray | None = None, relu: bool = False) -> tuple[Planes, list[Call]]:
        """Planes for the N x C x H x W array x (+ add, then ReLU if relu), and the call that
        copies it in. x and add are read when the call runs: a view of a buffer that earlier
        calls fill brings their values. The buffer is new (zeros), so its padding stays zero."""
        n, c, h, w = x.shape
        grid = Grid(n, h, w)
        planes = cls(np.zeros((c, grid.length), np.float32), grid)
        target = grid.interior(planes.data).transpose(1, 0, 2, 3)

        def copy():
            if add is None:
                np.copyto(target, x)
            else:
                np.add(x, add, out=target)
            if relu:
                np.maximum(target, 0, out=target)

        return planes, [copy]

    @classmethod
    def from_nchw(cls, x: np.ndarray) -> Planes:
        planes, calls = cls.bind_nchw(x)
        run_calls(calls)
        return planes

    def nchw(self) -> np.ndarray:
        """An N x C x H x W view (not a copy) of the elements."""
        self.viewed = True
        return self.grid.interior(self.data).transpose(1, 0, 2, 3)


@functools.lru_cache(maxsize=64)
def mask(grid: Grid) -> np.ndarray:
    """1.0 at element positions, 0.0 at padding (float32, grid.length)."""
    m = np.zeros(grid.length, np.float32)
    grid.interior(m[None])[...] = 1.0
    return m
