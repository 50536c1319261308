"""The quad kernel: `kernels.sparse_conv` for denser layers, four output rows at a time.

The row kernel loads one input vector per multiply-add (each nonzero reads its own shifted
window), so it is bound by loads at about 60% of the FMA peak. Four rows of a denser layer share
most of their taps: a quad tile keeps 4 x QUAD_VECTORS accumulators in registers, loads each
distinct tap's input vectors once and applies them to every row of the four that has that tap.
Which rows those are is the tap's *pattern* (bit r: row r of the quad), so the taps of a quad are
sorted by pattern and the kernel runs one loop per pattern (1 .. 15) whose multiply-adds are fixed
when it is compiled: no branch per tap, and the weights are read in order.

    out[4g + r, shift + q] = bias[4g + r] + sum over taps t of quad g whose pattern has bit r:
                             w[t, r] * src[plane_t, offset_t + q]

Loads per multiply-add fall from 1 to 1 / (rows of the quad per tap): at density 0.3 the loop ran
1.44x (AVX-512) and 1.13x (AVX2) the row loop's speed, at 0.5 2.0x and 1.5x, and at 0.1 no faster
(a C model of both loops on L1 data, Zen 4). `QUAD_MIN_DENSITY` is where a layer switches.
Parts (plane groups whose windows fit L1), jobs (a tile of a block of quads), the overlapping last
tile and the epilogue (residual, ReLU, padding mask) are as in the row kernel; results do not
depend on the thread count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from cigl.serve.sparse_engine.kernels import (
    _F32,
    _I32,
    _I64,
    _VECTOR,
    CACHE,
    ROWS_PER_PART,
    VEC,
    _add_from,
    _address,
    _splat,
    _store_tile,
    _vector_at,
    finish,
    job_blocks,
    job_place,
    pack_taps,
    plane_parts,
)

QUAD = 4  # rows a quad tile computes together (15 patterns)
QUAD_VECTORS = 6 if VEC == 16 else 3  # per row: 4 x this many accumulators and the inputs fill the registers
# the weight density from which a layer runs on quads: measured layer by layer in ResNet-20, WRN-22-2
# and ResNet-18, AVX-512 quads won from about 0.12 and AVX2 ones (4 x 3 of 8 floats) from about 0.45
QUAD_MIN_DENSITY = 0.12 if VEC == 16 else 0.45
_POPCOUNT = np.array([bin(p).count("1") for p in range(1 << QUAD)])


def _lane_address(builder, base, step, lane: int):
    """base + lane * step, or 0 when base is 0 (absent)."""
    at = builder.add(base, builder.mul(step, ir.Constant(_I64, lane)))
    return builder.select(builder.icmp_signed("!=", base, ir.Constant(_I64, 0)), at, base)


def _pattern_loop(builder, pattern: int, acc: list, k, tables: dict, vectors: int):
    """The loop over the taps of one pattern: each tap's `vectors` input vectors loaded once, then
    one splat weight and `vectors` multiply-adds per row of the pattern (fixed here, so the
    accumulators stay in registers). Returns the weight index after it; updates `acc`."""
    rows = [r for r in range(QUAD) if pattern >> r & 1]
    bounds = tables["bounds"]
    t0 = builder.load(builder.gep(bounds, [ir.Constant(_I64, pattern - 1)]))
    t1 = builder.load(builder.gep(bounds, [ir.Constant(_I64, pattern)]))
    entry = builder.block
    head, body, done = (builder.append_basic_block(f"pattern{pattern}.{b}") for b in ("head", "body", "done"))
    builder.branch(head)

    builder.position_at_end(head)  # the tap index, the weight index and the pattern's accumulators
    t, kk = builder.phi(_I64), builder.phi(_I64)
    t.add_incoming(t0, entry)
    kk.add_incoming(k, entry)
    phis = {r: [builder.phi(_VECTOR) for _ in range(vectors)] for r in rows}
    for r in rows:
        for phi, a in zip(phis[r], acc[r], strict=True):
            phi.add_incoming(a, entry)
    builder.cbranch(builder.icmp_signed("<", t, t1), body, done)

    builder.position_at_end(body)
    tap = builder.zext(builder.load(builder.gep(tables["taps"], [t]), align=4), _I64)
    plane, offset = builder.lshr(tap, tables["bits"]), builder.and_(tap, tables["low"])
    base = builder.gep(tables["src"], [builder.add(builder.mul(plane, tables["ld"]), offset)])
    x = [builder.load(_vector_at(builder, base, j, VEC), align=4) for j in range(vectors)]
    fast = ("fast",)
    for i, r in enumerate(rows):
        at = builder.gep(tables["vals"], [builder.add(kk, ir.Constant(_I64, i))])
        w = _splat(builder, builder.load(at, align=4), VEC)
        for a, xj in zip(phis[r], x, strict=True):  # a phi is its accumulator's value in the body
            a.add_incoming(builder.fadd(a, builder.fmul(w, xj, flags=fast), flags=fast), body)
    t.add_incoming(builder.add(t, ir.Constant(_I64, 1)), body)
    kk.add_incoming(builder.add(kk, ir.Constant(_I64, len(rows))), body)
    builder.branch(head)

    builder.position_at_end(done)
    for r in rows:
        acc[r] = phis[r]
    return kk


def _store_rows(builder, acc: list, dst, step, res, mask, relu, lanes) -> None:
    """Each row r < lanes: the row kernel's epilogue with the residual at res + r * step, stored
    at dst + r * step."""
    tile_bytes = len(acc[0]) * VEC * 4
    for lane in range(QUAD):
        with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, lane), lanes)):
            res_at, dst_at = _lane_address(builder, res, step, lane), _lane_address(builder, dst, step, lane)
            _store_tile(builder, acc[lane], dst_at, res_at, mask, relu, tile_bytes)


def _quad_loop(vectors: int):
    """An intrinsic computing `vectors` x VEC outputs of each of the four rows of a quad:

        quad(dst, step, src, taps, bits, vals, bounds, ld, bias, sums, res, mask, relu, lanes)

    Row r (r < lanes) starts from bias[r] (+ its partial sums, a tile at sums + r * tile bytes),
    gains vals[k] * src[plane * ld + offset ...] for each tap of each pattern with bit r
    (pattern p's taps are bounds[p - 1] .. bounds[p]; their weights follow in tap order, then
    row order), then residual (res + r * step), ReLU and mask as in the row kernel, and is
    stored at dst + r * step. Addresses are int64 (sums, res, mask 0 when absent)."""

    @intrinsic
    def quad(_ctx, dst, step, src, taps, bits, vals, bounds, ld, bias, sums, res, mask, relu, lanes):  # noqa: ARG001, PLR0913
        i64 = types.int64
        sig = types.void(*(i64,) * 12, types.boolean, i64)

        def codegen(_context, builder, _signature, args):
            dst, step, src, taps, bits, vals, bounds, ld, bias, sums, res, mask, relu, lanes = args
            f32p = _F32.as_pointer()
            bias = builder.inttoptr(bias, f32p)
            tables = {
                "src": builder.inttoptr(src, f32p),
                "vals": builder.inttoptr(vals, f32p),
                "taps": builder.inttoptr(taps, _I32.as_pointer()),
                "bounds": builder.inttoptr(bounds, _I64.as_pointer()),
                "bits": bits,
                "low": builder.sub(builder.shl(ir.Constant(_I64, 1), bits), ir.Constant(_I64, 1)),
                "ld": ld,
            }
            tile_bytes = ir.Constant(_I64, vectors * VEC * 4)
            acc = []
            for lane in range(QUAD):
                b = builder.load(builder.gep(bias, [ir.Constant(_I64, lane)]), align=4)
                acc.append(
                    _add_from(
                        builder,
                        [_splat(builder, b, VEC)] * vectors,
                        _lane_address(builder, sums, tile_bytes, lane),
                        "add",
                    )
                )
            k = ir.Constant(_I64, 0)
            for pattern in range(1, 1 << QUAD):  # one loop per pattern, its multiply-adds fixed
                k = _pattern_loop(builder, pattern, acc, k, tables, vectors)
            _store_rows(builder, acc, dst, step, res, mask, relu, lanes)
            return _context.get_dummy_value()

        return sig, codegen

    return quad


_quad_wide, _quad1 = _quad_loop(QUAD_VECTORS), _quad_loop(1)


@njit(fastmath=True, cache=CACHE, nogil=True)
def _quad_sums(src, bounds, starts, taps, bits, vals, g, sums):
    """sums[r, :] += the taps of quad g over every part, for the rows r of their patterns
    (element by element: a slice expression allocated a temporary per tap, 30 us for a
    10 x 64 classifier on one image)."""
    low, length = (1 << bits) - 1, sums.shape[1]
    for part in range(bounds.shape[0]):
        k = starts[part, g]
        for pattern in range(1, 1 << QUAD):
            for t in range(bounds[part, g, pattern - 1], bounds[part, g, pattern]):
                plane, offset = taps[t] >> bits, taps[t] & low
                for r in range(QUAD):
                    if pattern >> r & 1:
                        w = vals[k]
                        for q in range(length):
                            sums[r, q] += w * src[plane, offset + q]
                        k += 1


@njit(fastmath=True, cache=CACHE, nogil=True)
def _short_quads(src, bounds, starts, taps, bits, vals, bias, out, shift, length, residual, mask, relu):  # noqa: PLR0913
    """`quad_conv` for outputs shorter than a vector: plain sums, one thread."""
    rows = out.shape[0]
    sums = np.empty((QUAD, length), np.float32)
    for g in range(bounds.shape[1]):
        for r in range(QUAD):
            sums[r, :] = bias[g * QUAD + r]
        _quad_sums(src, bounds, starts, taps, bits, vals, g, sums)
        for r in range(min(QUAD, rows - g * QUAD)):
            for q in range(length):
                out[g * QUAD + r, shift + q] = finish(sums[r, q], residual, g * QUAD + r, shift + q, mask, relu)


@njit(fastmath=True, parallel=True, cache=CACHE, nogil=True)
def quad_conv(src, bounds, starts, taps, bits, vals, bias, out, shift, length, residual, mask, relu):  # noqa: PLR0913
    """`kernels.sparse_conv` on quad tables (`quad_tables`): quad g's taps in part p, pattern by
    pattern, are bounds[p, g, 0] .. bounds[p, g, 15] and its weights start at vals[starts[p, g]];
    Tiles are QUAD_VECTORS vectors wide (one vector when the output is shorter than that, scalar
    below a vector)."""
    parts, quads, rows = bounds.shape[0], bounds.shape[1], out.shape[0]
    has_res, has_mask = residual.shape[0] > 0, mask.shape[0] > 0
    if quads == 0 or rows == 0:
        return
    biases = np.zeros(quads * QUAD, np.float32)  # a quad reads four, the last one too
    for r in range(rows):
        biases[r] = bias[r]
    if length < VEC:
        _short_quads(src, bounds, starts, taps, bits, vals, biases, out, shift, length, residual, mask, relu)
        return
    wide = length >= QUAD_VECTORS * VEC
    width = QUAD_VECTORS * VEC if wide else VEC
    tiles = (length + width - 1) // width
    per_block, blocks = job_blocks(quads, tiles, parts, ROWS_PER_PART // QUAD)
    src_at, ld = _address(src), src.shape[1]
    taps_at, vals_at, bounds_at = _address(taps), _address(vals), _address(bounds)
    zeros = np.zeros(QUAD, np.float32)  # the bias of every part after the first
    out_at, out_ld = _address(out), out.shape[1]
    res_at = _address(residual) if has_res else 0  # its rows as long as out's (QuadTables.run)
    mask_at = _address(mask) if has_mask else 0
    by_block = (taps.size + vals.size) * 4 > src.size * 4  # as in sparse_conv
    for job in prange(tiles * blocks):
        tile, block = job_place(job, tiles, blocks, by_block)
        q = min(tile * width, length - width)  # the last tile overlaps the one before
        first, at = block * per_block, shift + q
        keep = mask_at + 4 * at if has_mask else 0
        partial = np.empty(per_block * QUAD * width if parts > 1 else 0, np.float32)
        for part in range(parts):
            final = part == parts - 1
            for g in range(first, min(quads, first + per_block)):
                sums = _address(partial) + 4 * (g - first) * QUAD * width
                r0 = g * QUAD
                dst, step = (out_at + 4 * (r0 * out_ld + at), 4 * out_ld) if final else (sums, 4 * width)
                args = (
                    dst,
                    step,
                    src_at + 4 * q,
                    taps_at,
                    bits,
                    vals_at + 4 * starts[part, g],
                    bounds_at + 8 * (part * quads + g) * (1 << QUAD),
                    ld,
                    # addresses of this function's own arrays are taken where they are used: numba
                    # frees an array after its last use, and an address taken earlier would dangle
                    _address(biases) + 4 * r0 if part == 0 else _address(zeros),
                    sums if part > 0 else 0,
                    res_at + 4 * (r0 * out_ld + at) if final and has_res else 0,
                    keep if final else 0,
                    relu and final,
                    min(QUAD, rows - r0),
                )
                if wide:
                    _quad_wide(*args)
                else:
                    _quad1(*args)


@dataclass(frozen=True)
class QuadTables:
    """A layer's nonzeros as quad_conv reads them (see quad_tables)."""

    bounds: np.ndarray  # int64 (parts, quads, 16)
    starts: np.ndarray  # int64 (parts, quads)
    taps: np.ndarray  # int32, plane << bits | offset per distinct tap of a quad
    bits: np.int64
    vals: np.ndarray  # float32, per tap its rows' weights in row order

    @property
    def nbytes(self) -> int:
        return self.bounds.nbytes + self.starts.nbytes + self.taps.nbytes + self.vals.nbytes

    def call(self, src, bias, out, shift, length, residual, mask, relu) -> Callable[[], None]:
        """quad_conv on these tables with the arguments bound; a residual's rows are as long as out's."""
        if residual.shape[0] and residual.shape != out.shape:
            raise ValueError(f"a residual of shape {residual.shape} for an output of shape {out.shape}")
        args = (self.bounds, self.starts, self.taps, self.bits, self.vals)
        return functools.partial(quad_conv, src, *args, bias, out, shift, length, residual, mask, relu)


def quad_tables(
    rows: np.ndarray, planes: np.ndarray, offsets: np.ndarray, values: np.ndarray, span: int, out_rows: int
) -> QuadTables:
    """Quad tables of nonzeros (row, plane, offset, value), offsets below `span`: rows 4g .. 4g + 3
    form quad g; in each part (kernels.plane_parts, windows of a quad tile) a quad's distinct
    (plane, offset) taps are sorted by pattern, then plane and offset."""
    quads = -(-out_rows // QUAD)
    part, parts = plane_parts(planes, span, QUAD_VECTORS * VEC)
    reach, n_planes = max(1, span), int(planes.max(initial=0)) + 1
    lane = rows % QUAD
    key = ((part.astype(np.int64) * quads + rows // QUAD) * n_planes + planes) * reach + offsets
    taps, which = np.unique(key, return_inverse=True)
    pattern = np.zeros(taps.size, np.int64)
    np.bitwise_or.at(pattern, which, 1 << lane)
    group = taps // (n_planes * reach)  # part * quads + quad
    order = np.lexsort((taps, pattern, group))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    first_weight = np.concatenate([[0], np.cumsum(_POPCOUNT[pattern[order]])])
    vals = np.zeros(first_weight[-1], np.float64)  # a (row, plane, offset) given twice: its weights summed
    np.add.at(vals, first_weight[rank[which]] + _POPCOUNT[pattern[which] & ((1 << lane) - 1)], values)
    packed, bits = pack_taps((taps[order] // reach) % n_planes, taps[order] % reach)
    key = group[order] * (1 << QUAD) + pattern[order]
    targets = np.arange(parts * quads)[:, None] * (1 << QUAD) + np.arange(1, (1 << QUAD) + 1)[None, :]
    bounds = np.searchsorted(key, targets).reshape(parts, quads, 1 << QUAD).astype(np.int64)
    return QuadTables(bounds, first_weight[bounds[:, :, 0]].astype(np.int64), packed, bits, vals.astype(np.float32))
