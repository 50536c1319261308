"""The sparse engine's compiled kernels (numba, with one hand-written LLVM loop; fp32).

`sparse_conv` is the sparse-weight x dense-activation kernel for convolutions and linear layers
(`quads.quad_conv` takes the denser ones, four rows at a time, on the same layout). An
activation is a set of flat *planes* (one per input channel, or per channel and stride phase);
output position q of row o is

    out[o, shift + q] = bias[o] + sum_k vals[k] * src[plane_k, offset_k + q]      (k in row o)

so a 3x3 convolution is nine shifted reads of the same plane, and a nonzero weight costs one
fused multiply-add per output element: time falls with the number of nonzeros. The output is cut
into tiles of 1, 2, 4 or 8 AVX vectors (`_tile_vectors` picks the width per call); a tile of one
row is summed in registers over all of the row's nonzeros (`_tile_loop`: per nonzero one
broadcast and one vector multiply-add per accumulator, which never touches memory), then
residual, ReLU and padding mask are applied and the tile is stored once. A job is one tile for a
block of rows, so the tile's input window is read from cache by every row of the block (jobs go
tile by tile, or block by block where the nonzeros' tables outweigh the input). The last
tile of a row starts at length - width (it overlaps the one before and recomputes the same
values); a row shorter than a tile is one tile whose last vector overlaps the one before;
outputs shorter than a vector take a scalar loop. Jobs never share a result, so results
do not depend on the thread count.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic


def _writable(folder: Path, private: bool = False) -> bool:
    """Whether files can be created in `folder` (made if missing); `private`: and it is this
    user's alone, since numba loads its cache files with pickle (a folder in the shared temp
    folder that someone else made could hold code)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if private and hasattr(os, "getuid"):
            st = folder.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _compile_cache() -> bool:
    """Whether the kernels can keep their compiled code between runs (compiling them takes
    seconds). Numba caches beside this file; where that is read-only (an installed package in
    a container) and NUMBA_CACHE_DIR is unset, the cache goes to the user's cache folder or a
    private one in the temp folder, since numba's own fallback, the home folder, may be
    unwritable too and would fail at import. With nowhere to write, they compile in every process."""
    if numba_config.CACHE_DIR or _writable(Path(__file__).parent / "__pycache__"):
        return True
    user = getattr(os, "getuid", lambda: 0)()
    for folder in (
        lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cigl" / "numba",
        lambda: Path(tempfile.gettempdir()) / f"cigl-numba-{user}",
    ):
        try:
            path = folder()
        except RuntimeError:  # no home folder
            continue
        if _writable(path, private=True):
            numba_config.CACHE_DIR = str(path)
            return True
    message = "nowhere to keep the sparse kernels' compiled code: they compile in every process; set NUMBA_CACHE_DIR"
    warnings.warn(message, stacklevel=2)
    return False


CACHE = _compile_cache()


def _vector_floats() -> int:
    """Floats per vector register of the CPU numba compiles for: 16 with AVX-512, else 8 (AVX2).
    A CPU named to numba (NUMBA_CPU_NAME, for a portable cache) keeps 8."""
    if numba_config.CPU_NAME and numba_config.CPU_NAME != "host":
        return 8
    import llvmlite.binding as llvm

    return 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8


# floats per vector of the kernels. 16-float vectors made the row kernel 6-10% faster on Zen 5
# (full-width AVX-512: ResNet-18 at density 0.05, batch 64, 65 -> 59 ms with the window below)
# and gained nothing on Zen 4 (AVX-512 split into two 256-bit halves)
VEC = _vector_floats()
MIN_JOBS = 32  # rows are split into blocks until there are this many jobs (several per thread)
# a part's planes: a widest tile's input window across them fills half of L1 (32 KiB on Zen 4; 16
# KiB windows of 8-float tiles there). With 16-float tiles (twice the window per plane), 32 KiB
# won on Zen 5 (48 KiB L1): ResNet-18 at 0.05, batch 64: 61.5 ms at 16 KiB, 58.8 at 32, 61.7 at 64
WINDOW_BYTES = 2048 * VEC
ROWS_PER_PART = 32  # rows per job when a row has several parts (their partial sums, 8 KiB, stay in L1)

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_VECTOR = ir.VectorType(_F32, VEC)


def _vector_at(builder, base, j: int, floats: int = VEC):
    """Pointer to the j-th vector of `floats` floats from `base` (a float pointer); loads use align 4."""
    return builder.bitcast(builder.gep(base, [ir.Constant(_I64, j * floats)]), ir.VectorType(_F32, floats).as_pointer())


def _vectors_at(builder, base, count: int, floats: int, spots: list | None = None) -> list:
    """Pointers to `count` vectors of `floats` floats from `base` (a float pointer): back to
    back, or at the float offsets `spots` (IR integers; a short row's last vector overlaps)."""
    if spots is None:
        return [_vector_at(builder, base, j, floats) for j in range(count)]
    vector = ir.VectorType(_F32, floats).as_pointer()
    return [builder.bitcast(builder.gep(base, [spot]), vector) for spot in spots]


def _splat(builder, x, floats: int = VEC):
    vector = ir.VectorType(_F32, floats)
    v = builder.insert_element(ir.Constant(vector, ir.Undefined), x, ir.Constant(_I32, 0))
    lanes = ir.Constant(ir.VectorType(_I32, floats), [0] * floats)
    return builder.shuffle_vector(v, ir.Constant(vector, ir.Undefined), lanes)


def _add_from(builder, values, address, op: str, spots: list | None = None):
    """values (op)= the vectors at `address` (at `spots`, see _vectors_at) when it is nonzero,
    else values unchanged."""
    vector = values[0].type
    start = builder.block
    with builder.if_then(builder.icmp_signed("!=", address, ir.Constant(_I64, 0))):
        base = builder.inttoptr(address, _F32.as_pointer())
        combine = builder.fadd if op == "add" else builder.fmul
        at = _vectors_at(builder, base, len(values), vector.count, spots)
        changed = [combine(v, builder.load(a, align=4)) for v, a in zip(values, at, strict=True)]
        then = builder.block
    merged = []
    for old, new in zip(values, changed, strict=True):
        phi = builder.phi(vector)
        phi.add_incoming(new, then)
        phi.add_incoming(old, start)
        merged.append(phi)
    return merged


def _prefetch_ahead(builder, address, write: int, tile_bytes: int) -> None:
    """Prefetch the cache lines of a tile of `tile_bytes` two such tiles past `address` (if nonzero).
    A thread walks a row's tiles in order, but across a block of rows: dozens of residual and
    output streams, more than the hardware prefetchers follow. Reading the residual stalled a
    16-channel layer by a third; prefetching it and the output lines made such a layer 1.6x
    faster (prefetching the input windows, reused by every row, gained nothing)."""
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0"
    )
    with builder.if_then(builder.icmp_signed("!=", address, ir.Constant(_I64, 0))):
        for line in range(0, tile_bytes, 64):
            at = builder.inttoptr(builder.add(address, ir.Constant(_I64, 2 * tile_bytes + line)), i8p)
            builder.call(fn, [at, ir.Constant(_I32, write), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _store_tile(builder, values: list, dst, res, mask, relu, prefetch_bytes: int, spots: list | None = None) -> None:
    """A tile's epilogue, one row: + the residual at `res` (if nonzero), ReLU (if `relu`), * the
    mask at `mask` (if nonzero), then one store at `dst` (vectors at `spots`, see _vectors_at);
    the residual and output lines `prefetch_bytes` wide, two such spans ahead, are prefetched
    for the row's next tiles."""
    vector = values[0].type
    zero = ir.Constant(vector, [0.0] * vector.count)
    _prefetch_ahead(builder, res, 0, prefetch_bytes)
    _prefetch_ahead(builder, dst, 1, prefetch_bytes)
    values = _add_from(builder, values, res, "add", spots)
    values = [builder.select(relu, builder.select(builder.fcmp_ordered(">", v, zero), v, zero), v) for v in values]
    values = _add_from(builder, values, mask, "mul", spots)
    out = builder.inttoptr(dst, _F32.as_pointer())
    for v, at in zip(values, _vectors_at(builder, out, len(values), vector.count, spots), strict=True):
        builder.store(v, at, align=4)


def _tile_loop(vectors: int):
    """An intrinsic computing `vectors` x VEC outputs of one row in registers:

        tile(dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail)
        v = bias [+ partial[0 .. tile)] + sum_{k0 <= k < k1} vals[k] * src[plane * ld + offset + 0 .. tile)
            with plane = taps[k] >> bits, offset = taps[k] & (2**bits - 1)  (`pack_taps`)
        v += res[0 .. tile) if res;  v = max(v, 0) if relu;  v *= mask[0 .. tile) if mask
        dst[0 .. tile) = v

    with the last vector at float `tail` rather than (vectors - 1) x VEC when that is less: a row
    shorter than the tile is computed in one tile whose last vector overlaps the one before,
    so each nonzero's table entry is read and its address worked out once for the whole row
    (two one-vector tiles of a 19-float row cost 1.4x one two-vector tile).

    dst, src, taps, vals, partial, res and mask are addresses (partial, res and mask 0
    when absent; partial sums carry a row from one part of its planes to the next). The
    k loop keeps one phi per accumulator vector, so LLVM holds them in registers and emits one
    broadcast and `vectors` fused multiply-adds with memory operands per nonzero."""

    @intrinsic
    def tile(_typingctx, dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail):  # noqa: ARG001, PLR0913
        i64 = types.int64
        sig = types.void(i64, i64, i64, i64, i64, i64, i64, i64, types.float32, i64, i64, i64, types.boolean, i64)

        def codegen(_context, builder, _signature, args):
            dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail = args
            spots = [ir.Constant(_I64, j * VEC) for j in range(vectors - 1)] + [tail]
            f32p = _F32.as_pointer()
            src, vals, taps = (
                builder.inttoptr(src, f32p),
                builder.inttoptr(vals, f32p),
                builder.inttoptr(taps, _I32.as_pointer()),
            )
            low = builder.sub(builder.shl(ir.Constant(_I64, 1), bits), ir.Constant(_I64, 1))  # the offset's bits
            start = _add_from(builder, [_splat(builder, bias)] * vectors, partial, "add", spots)
            entry = builder.block
            head = builder.append_basic_block("tile.head")
            body = builder.append_basic_block("tile.body")
            done = builder.append_basic_block("tile.done")
            builder.branch(head)

            builder.position_at_end(head)  # k and the accumulators
            k = builder.phi(_I64)
            acc = [builder.phi(_VECTOR) for _ in range(vectors)]
            k.add_incoming(k0, entry)
            for a, s in zip(acc, start, strict=True):
                a.add_incoming(s, entry)
            builder.cbranch(builder.icmp_signed("<", k, k1), body, done)

            builder.position_at_end(body)  # acc += vals[k] * src[plane * ld + offset ...]
            w = _splat(builder, builder.load(builder.gep(vals, [k]), align=4))
            tap = builder.zext(builder.load(builder.gep(taps, [k]), align=4), _I64)
            plane, offset = builder.lshr(tap, bits), builder.and_(tap, low)
            base = builder.gep(src, [builder.add(builder.mul(plane, ld), offset)])
            fast = ("fast",)
            at = _vectors_at(builder, base, vectors, VEC, spots)
            summed = [
                builder.fadd(a, builder.fmul(w, builder.load(x, align=4), flags=fast), flags=fast)
                for a, x in zip(acc, at, strict=True)
            ]
            k.add_incoming(builder.add(k, ir.Constant(_I64, 1)), body)
            for a, s in zip(acc, summed, strict=True):
                a.add_incoming(s, body)
            builder.branch(head)

            builder.position_at_end(done)
            _store_tile(builder, acc, dst, res, mask, relu, 8 * VEC * 4, spots)
            return _context.get_dummy_value()

        return sig, codegen

    return tile


_tile8, _tile4, _tile2, _tile1 = _tile_loop(8), _tile_loop(4), _tile_loop(2), _tile_loop(1)


# pairs per `_deinterleave` step: 8 whatever VEC is, since a gathered line is often 9 or 17 floats
# (16-float steps left the 9-float lines of ResNet-20's last stage scalar: its gather 2.6x slower)
SPLIT = 8


@intrinsic
def _deinterleave(_typingctx, even, odd, src, count):  # noqa: ARG001
    """even[t] = src[2 t] and (if odd is nonzero) odd[t] = src[2 t + 1] for t < count, a
    multiple of SPLIT; all addresses (int64). Two vector loads and two shuffles per SPLIT pairs:
    numba leaves the scalar loop of a stride-2 copy unvectorised."""

    def codegen(_context, builder, _signature, args):
        even, odd, src, count = args
        f32p = _F32.as_pointer()
        even, src = builder.inttoptr(even, f32p), builder.inttoptr(src, f32p)
        entry = builder.block
        head = builder.append_basic_block("split.head")
        body = builder.append_basic_block("split.body")
        done = builder.append_basic_block("split.done")
        builder.branch(head)
        builder.position_at_end(head)
        t = builder.phi(_I64)
        t.add_incoming(ir.Constant(_I64, 0), entry)
        builder.cbranch(builder.icmp_signed("<", t, count), body, done)
        builder.position_at_end(body)
        pairs = builder.gep(src, [builder.add(t, t)])
        low, high = (builder.load(_vector_at(builder, pairs, j, SPLIT), align=4) for j in (0, 1))
        for target, first in ((even, 0), (odd, 1)):
            lanes = ir.Constant(ir.VectorType(_I32, SPLIT), list(range(first, 2 * SPLIT, 2)))
            picked = builder.shuffle_vector(low, high, lanes)
            if first == 0:
                builder.store(picked, _vector_at(builder, builder.gep(target, [t]), 0, SPLIT), align=4)
            else:
                with builder.if_then(builder.icmp_signed("!=", target, ir.Constant(_I64, 0))):
                    at = builder.gep(builder.inttoptr(target, f32p), [t])
                    builder.store(picked, _vector_at(builder, at, 0, SPLIT), align=4)
        t.add_incoming(builder.add(t, ir.Constant(_I64, SPLIT)), builder.block)
        builder.branch(head)
        builder.position_at_end(done)
        return _context.get_dummy_value()

    i64 = types.int64
    return types.void(i64, i64, i64, i64), codegen


@njit(inline="always")
def _address(a):
    """The address of a's data as an int64: numba types ctypes.data as uint64, and uint64 mixed
    with int64 is float64 in numba, so address arithmetic would go through doubles."""
    return np.int64(a.ctypes.data)


@njit(inline="always")
def _tile_vectors(length):
    """Tile width in vectors (8, 4, 2 or 1; at most `length` outputs, or one tile whose last
    vector overlaps) that needs the fewest cycles: a nonzero costs a tile about max(4, vectors +
    1) cycles (the 4-cycle FMA latency bounds narrow tiles, the loads wide ones), and the
    overlapping last tile recomputes outputs."""
    best, best_cost = 1, -(-length // VEC) * 4
    for vectors in (2, 4, 8):
        width = vectors * VEC
        cost = -(-length // width) * max(4, vectors + 1)
        if (vectors - 1) * VEC < length and cost <= best_cost:
            best, best_cost = vectors, cost
    return best


@njit(inline="always")
def _tile(vectors, dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail):  # noqa: PLR0913
    """The tile loop of `vectors` vectors (an intrinsic's width is fixed when it is compiled)."""
    if vectors == 8:
        _tile8(dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail)
    elif vectors == 4:
        _tile4(dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail)
    elif vectors == 2:
        _tile2(dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail)
    else:
        _tile1(dst, src, taps, bits, vals, k0, k1, ld, bias, partial, res, mask, relu, tail)


@njit(inline="always")
def job_blocks(units, tiles, parts, cap):
    """(units per block, blocks): a layer's rows (or quads of rows) are split into blocks until
    tiles x blocks reaches MIN_JOBS (several jobs per thread); with several parts, at most `cap`
    units a block, so the block's partial sums stay in L1 beside the part's window."""
    per_block = -(-units // min(units, max(1, -(-MIN_JOBS // tiles))))
    if parts > 1:
        per_block = min(per_block, cap)
    return per_block, -(-units // per_block)


@njit(inline="always")
def job_place(job, tiles, blocks, by_block):
    """(tile, block) of a job: block by block (a block's tables come from memory once for all its
    tiles) or tile by tile (the tile's input window is reused by every block)."""
    return (job % tiles, job // tiles) if by_block else (job // blocks, job % blocks)


@njit(inline="always")
def finish(v, residual, o, at, mask, relu):
    """One output's epilogue: + residual[o, at] (if residual has rows), max(., 0) (if relu),
    * mask[at] (if mask is non-empty)."""
    if residual.shape[0] > 0:
        v += residual[o, at]
    if relu:
        v = max(v, 0.0)
    if mask.shape[0] > 0:
        v *= mask[at]
    return v


@njit(fastmath=True, cache=CACHE, nogil=True)
def _short_rows(src, bounds, taps, bits, vals, bias, out, shift, length, residual, mask, relu):  # noqa: PLR0913
    """`sparse_conv` for outputs shorter than a vector (a linear layer on a few images): one
    scalar sum per output, on one thread (there is too little work to share)."""
    low = (1 << bits) - 1
    for o in range(bounds.shape[1] - 1):
        for q in range(length):
            v = bias[o]
            for part in range(bounds.shape[0]):
                for k in range(bounds[part, o], bounds[part, o + 1]):
                    v += vals[k] * src[taps[k] >> bits, (taps[k] & low) + q]
            out[o, shift + q] = finish(v, residual, o, shift + q, mask, relu)


@njit(fastmath=True, parallel=True, cache=CACHE, nogil=True)
def sparse_conv(src, bounds, taps, bits, vals, bias, out, shift, length, residual, mask, relu):  # noqa: PLR0913
    """See the module docstring: row o's nonzeros are, in parts that each read a few planes,
    bounds[p, o] .. bounds[p, o + 1] (`part_bounds`); then, per
    element: + residual[o, shift + q] (if residual has rows), max(., 0) (if relu), * mask[shift + q]
    (if mask is non-empty, to re-zero padding)."""
    parts, rows = bounds.shape[0], bounds.shape[1] - 1
    has_res, has_mask = residual.shape[0] > 0, mask.shape[0] > 0
    if length < VEC or rows == 0:
        _short_rows(src, bounds, taps, bits, vals, bias, out, shift, length, residual, mask, relu)
        return
    vectors = _tile_vectors(length)
    width = vectors * VEC
    tiles = (length + width - 1) // width
    tail = min((vectors - 1) * VEC, length - VEC)  # the last vector's place in a tile
    per_block, blocks = job_blocks(rows, tiles, parts, ROWS_PER_PART)
    src_at, ld = _address(src), src.shape[1]
    taps_at, vals_at = _address(taps), _address(vals)
    out_at, out_ld = _address(out), out.shape[1]
    res_at, res_ld = (_address(residual), residual.shape[1]) if has_res else (0, 0)
    mask_at = _address(mask) if has_mask else 0
    # tile-major: a thread's row blocks reuse the tile's input window; block-major when the
    # nonzeros' tables outweigh the input (deep layers of small images), so a block's table
    # rows come from memory once for all its tiles
    nonzeros = bounds[parts - 1, rows] - bounds[0, 0]
    by_block = nonzeros * (taps.itemsize + vals.itemsize) > src.size * src.itemsize
    for job in prange(tiles * blocks):
        tile, block = job_place(job, tiles, blocks, by_block)
        q = max(0, min(tile * width, length - width))  # the last tile overlaps the one before
        first = block * per_block
        at = shift + q
        keep = mask_at + 4 * at if has_mask else 0
        # partial sums of all parts but the last: per job, so overlapping tiles never share them
        partial = np.empty(per_block * width if parts > 1 else 0, np.float32)
        for part in range(parts):
            final = part == parts - 1
            for o in range(first, min(rows, first + per_block)):
                sums = _address(partial) + 4 * (o - first) * width
                dst = out_at + 4 * (o * out_ld + at) if final else sums
                _tile(
                    vectors,
                    dst,
                    src_at + 4 * q,
                    taps_at,
                    bits,
                    vals_at,
                    bounds[part, o],
                    bounds[part, o + 1],
                    ld,
                    bias[o] if part == 0 else np.float32(0.0),
                    sums if part > 0 else 0,
                    res_at + 4 * (o * res_ld + at) if final and has_res else 0,
                    keep if final else 0,
                    relu and final,
                    tail,
                )


@njit(fastmath=True, parallel=True, cache=CACHE, nogil=True)
def channel_affine(x, scale, offset, mask, relu, out):
    """out[c] = (x[c] * scale[c] + offset[c]), then max(., 0) if relu, times mask (inference
    batch norm on planes whose padding must stay zero)."""
    for c in prange(x.shape[0]):
        s, t = scale[c], offset[c]
        xc, oc = x[c], out[c]
        for p in range(x.shape[1]):
            v = xc[p] * s + t
            if relu:
                v = max(v, 0.0)
            oc[p] = v * mask[p]


@njit(fastmath=True, parallel=True, cache=CACHE, nogil=True)
def scale_channels(x, gate, block, residual, mask, relu, out):
    """out[c, i * block + p] = x[c, i * block + p] * gate[i, c] for image i, then + residual
    (if it has rows), max(., 0) if relu, and 0 where mask is 0 (padding; the tail after the last
    image too): a squeeze-and-excitation gate applied on planes."""
    n, has_res = gate.shape[0], residual.shape[0] > 0
    for c in prange(x.shape[0]):
        xc, oc = x[c], out[c]
        for i in range(n):
            g = gate[i, c]
            for p in range(i * block, (i + 1) * block):
                v = xc[p] * g
                if has_res:
                    v += residual[c, p]
                if relu:
                    v = max(v, 0.0)
                oc[p] = v if mask[p] != 0 else 0.0
        oc[n * block :] = 0.0


@njit(parallel=True, cache=CACHE, nogil=True)
def place_channels(src, out, before, at, count):
    """out[before + c, at : at + count] = src[c, :count], and every other channel of out zero: a
    copy with zero channels around it (an option-A shortcut's), one channel per job. The rest
    of the copied channels' planes is left as it is (their zero padding)."""
    for c in prange(out.shape[0]):
        k = c - before
        if 0 <= k < src.shape[0]:
            out[c, at : at + count] = src[k, :count]
        else:
            out[c, :] = 0.0


ELEMENTWISE_CHUNK = 1 << 14  # elements per job of the elementwise kernels


@njit(parallel=True, cache=CACHE, nogil=True)
def hard_clamp(x, alpha, beta, lo, hi, gated, out):
    """out = min(max(alpha * x + beta, lo), hi), times x if `gated`, over flat float32 arrays in
    one pass on every thread: Clip (alpha 1, beta 0), HardSigmoid (lo 0, hi 1) and HardSwish
    (alpha 1/6, beta 1/2, lo 0, hi 1, gated). numpy took two or three single-thread passes
    (ReLU6 was 47% of a MobileNetV2's run at batch 64)."""
    n = x.size
    for job in prange((n + ELEMENTWISE_CHUNK - 1) // ELEMENTWISE_CHUNK):
        for i in range(job * ELEMENTWISE_CHUNK, min(n, (job + 1) * ELEMENTWISE_CHUNK)):
            v = min(max(alpha * x[i] + beta, lo), hi)
            out[i] = v * x[i] if gated else v


@njit(parallel=True, cache=CACHE, nogil=True)
def leaky_relu(x, alpha, out):
    """out = x where x >= 0, else alpha * x, over flat float32 arrays in one pass on every thread."""
    n = x.size
    for job in prange((n + ELEMENTWISE_CHUNK - 1) // ELEMENTWISE_CHUNK):
        for i in range(job * ELEMENTWISE_CHUNK, min(n, (job + 1) * ELEMENTWISE_CHUNK)):
            out[i] = x[i] if x[i] >= 0 else alpha * x[i]


@njit(fastmath=True, parallel=True, cache=CACHE, nogil=True)
def plane_means(x, n, block, count, out):
    """out[i, c] = sum(x[c, i * block : (i + 1) * block]) / count, summed in float64: global
    average pooling of planes (an image's block holds its elements and zero padding). The sum runs
    over a 1-D view with a zero-based index, which LLVM vectorises (on x[c, p] it did not: 3-7x
    slower)."""
    for c in prange(x.shape[0]):
        plane = x[c]
        for i in range(n):
            s, start = np.float64(0.0), i * block
            for p in range(block):
                s += np.float64(plane[start + p])
            out[i, c] = s / count


@njit(cache=CACHE, nogil=True)
def softmax_rows(x, scale, out):
    """out[i] = softmax(x[i] * scale) for each row of a 2-D x: the classifier's probabilities
    with its temperature (scale = 1 / T) in one serial call. The row's largest scaled value is
    subtracted before exp, so no exponent overflows; the sum is in float64. One call in place of
    numpy's five: run cold, after a batch-1 run's kernels, those took 60-90 us."""
    for i in range(x.shape[0]):
        top = -np.inf
        for j in range(x.shape[1]):
            top = max(top, x[i, j] * scale)
        total = 0.0
        for j in range(x.shape[1]):
            e = np.exp(x[i, j] * scale - top)
            out[i, j] = e
            total += e
        for j in range(x.shape[1]):
            out[i, j] = out[i, j] / total


def pack_taps(planes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.int64]:
    """(taps, bits): taps = plane << bits | offset as int32, bits the bit length of the largest
    offset. One 4-byte load per nonzero for both: with its value, 8 bytes a nonzero, which deep
    layers of small images read from memory on every run."""
    bits = int(offsets.max(initial=0)).bit_length()
    top = int(planes.max(initial=0))
    if top >> (31 - bits):
        raise ValueError(f"{top + 1} planes with {bits}-bit offsets do not fit the kernel's 31-bit taps")
    return ((planes.astype(np.int64) << bits) | offsets).astype(np.int32), np.int64(bits)


def plane_parts(planes: np.ndarray, span: int, width: int) -> tuple[np.ndarray, int]:
    """(part of each nonzero, parts): the planes read (`planes`, per nonzero) in groups whose
    windows (a tile of `width` floats plus `span`) fit WINDOW_BYTES, the groups as even as can
    be (a last part of one plane would cost a row a partial-sum pass for one nonzero: 64 planes
    in parts of 63 and 1 ran 1.2x slower than 32 and 32). Wide layers read hundreds of planes
    per tile; from L1 in parts of a few dozen, the kernel runs up to 1.6x faster than from L2."""
    used = np.unique(planes)  # planes no nonzero reads take no room (a shared gather holds such)
    count = max(1, used.size)
    size = -(-count // -(-count // max(1, WINDOW_BYTES // (4 * (width + span)))))  # as even as can be
    return np.searchsorted(used, planes) // size, -(-count // size)


def part_bounds(rows: np.ndarray, planes: np.ndarray, span: int, out_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds) for nonzeros in `rows` reading `planes`, with offsets below `span`, in the
    parts of `plane_parts` for the widest tile: `order` sorts the nonzeros by part, then row,
    then plane, and row o's nonzeros in part p are bounds[p, o] .. bounds[p, o + 1].
    Part-major, a block of rows reads its part of the tables as one run of memory (deep layers
    of small images stream their tables from memory on every run)."""
    part, parts = plane_parts(planes, span, 8 * VEC)
    order = np.lexsort((planes, rows, part))
    key = part.astype(np.int64) * out_rows + rows
    targets = np.arange(parts)[:, None] * out_rows + np.arange(out_rows + 1)[None, :]
    return order, np.searchsorted(key[order], targets).astype(np.int64)


@dataclass(frozen=True)
class RowTables:
    """A layer's nonzeros as sparse_conv reads them: row o's in part p are bounds[p, o] ..
    bounds[p, o + 1] (part_bounds), each a tap (pack_taps) and a value."""

    bounds: np.ndarray  # int64 (parts, rows + 1)
    taps: np.ndarray  # int32
    bits: np.int64
    vals: np.ndarray  # float32

    @property
    def nbytes(self) -> int:
        return self.bounds.nbytes + self.taps.nbytes + self.vals.nbytes

    def call(self, src, bias, out, shift, length, residual, mask, relu) -> Callable[[], None]:
        """sparse_conv on these tables with the arguments bound (run it later, any number of times)."""
        args = (self.bounds, self.taps, self.bits, self.vals, bias, out, shift, length, residual, mask, relu)
        return functools.partial(sparse_conv, src, *args)


def row_tables(
    rows: np.ndarray, planes: np.ndarray, offsets: np.ndarray, values: np.ndarray, span: int, out_rows: int
) -> RowTables:
    """RowTables of nonzeros (row, plane, offset, value), offsets below `span`."""
    order, bounds = part_bounds(rows, planes, span, out_rows)
    return RowTables(bounds, *pack_taps(planes[order], offsets[order]), values[order])


# the residual and mask arguments of sparse_conv that switch those steps off (empty: never written)
NO_RESIDUAL, NO_MASK = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)


@njit(parallel=True, cache=CACHE, nogil=True)
def gather_phases(x, n, h, w, pad_top, pad_left, stride_h, stride_w, hq, wq, phases, out):  # noqa: PLR0913
    """Stride phases of the zero-padded input, only those in `phases` (a 1x1 stride-2 convolution
    reads one of four): with phase = phases[j] = a * stride_w + b,
    out[j * C + c, i * hq * wq + r * wq + t] = element (i, c, r * stride_h + a - pad_top,
    t * stride_w + b - pad_left) of the planes `x` (grid n x h x w), zero outside the image.

    Row -1 and h and column -1 and w of an image are zeros of the layout itself, so most lines
    are plain strided copies; with stride 2 the two column phases of a row are split in one pass
    of vector loads and shuffles (`_deinterleave`). A job is one channel of one image, so each
    source line is read from memory once. The tail of `out` past n * hq * wq is zeroed."""
    channels, count = x.shape[0], phases.shape[0]
    row, block = w + 1, (h + 1) * (w + 1)
    lo, hi = np.empty(count, np.int64), np.empty(count, np.int64)
    for j in range(count):  # columns t whose source column t * stride_w + b - pad_left is in -1 .. w
        b = phases[j] % stride_w
        lo[j] = max(0, -((b - pad_left + 1) // stride_w))
        hi[j] = max(lo[j], min(wq, (w - b + pad_left) // stride_w + 1))
    for job in prange(channels * n):
        c, i = job // n, job % n
        src = x[c]
        src_at = _address(src)
        j = 0
        while j < count:
            a, b = phases[j] // stride_w, phases[j] % stride_w
            pair = stride_w == 2 and b == 0 and j + 1 < count and phases[j + 1] == phases[j] + 1
            pair = pair and lo[j] == 0 and hi[j] == wq and lo[j + 1] == 0 and hi[j + 1] == wq
            even, odd = out[j * channels + c], out[(j + pair) * channels + c]
            even_at, odd_at = _address(even), _address(odd)
            for r in range(hq):
                y = r * stride_h + a - pad_top
                line = (i * hq + r) * wq
                start = i * block + (y + 1) * row + b - pad_left + 1  # layout index of column t = 0
                first, last = (lo[j], hi[j]) if -1 <= y <= h else (0, 0)
                if pair and last > first:
                    fast = wq // SPLIT * SPLIT
                    _deinterleave(even_at + 4 * line, odd_at + 4 * line, src_at + 4 * start, fast)
                    for t in range(fast, wq):
                        even[line + t] = src[start + 2 * t]
                        odd[line + t] = src[start + 2 * t + 1]
                    continue
                even[line : line + first] = 0.0
                if stride_w == 1:
                    even[line + first : line + last] = src[start + first : start + last]
                else:
                    fast = first
                    if stride_w == 2:  # the even columns of the source span
                        fast += (last - first) // SPLIT * SPLIT
                        _deinterleave(even_at + 4 * (line + first), 0, src_at + 4 * (start + 2 * first), fast - first)
                    for t in range(fast, last):
                        even[line + t] = src[start + t * stride_w]
                even[line + last : line + wq] = 0.0
                if pair:
                    odd[line : line + wq] = 0.0
            j += 1 + pair
    out[:, n * hq * wq :] = 0.0
