"""The sparse engine's compiled kernels (numba; fp32; parallel over output rows and chunks).

`sparse_conv` is one sparse-weight x dense-activation kernel for every convolution and linear
layer. An activation is a set of flat *planes* (one per input channel, or per channel and stride
phase); output position q of row o is

    out[o, shift + q] = bias[o] + sum_k vals[k] * src[planes[k], offs[k] + q]      (k in row o)

so a 3x3 convolution is nine shifted reads of the same plane, and a nonzero weight costs one
fused multiply-add per output element: time falls with the number of nonzeros. Each row's
nonzeros are padded with zero weights to a multiple of GROUP (4); one pass over an output chunk
(CHUNK floats, kept in L1) applies eight of them, and a last pass the remaining four. Jobs
never share an output element, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

GROUP = 4
CHUNK = 2048  # output floats per job: long passes amortise each group's setup; 8 KiB stay in L1


@intrinsic
def _pointer(_typingctx, address):
    """An integer address as a void pointer (for numba.carray)."""

    def codegen(_context, builder, _signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(inline="always")
def _floats(base, index, n):
    """n float32 at element `index` of the buffer at address `base`, as an array without a
    reference count: numba's views of one shared array would update its count atomically
    from every thread at every nonzero group."""
    return carray(_pointer(base + 4 * index), n, np.float32)


@njit(fastmath=True, parallel=True, cache=True, nogil=True)
def sparse_conv(src, ptr, planes, offs, vals, bias, out, shift, length, residual, mask, relu, chunk):  # noqa: PLR0913
    """See the module docstring; then, per element: + residual[o, shift + q] (if residual has
    rows), max(., 0) (if relu), * mask[shift + q] (if mask is non-empty, to re-zero padding).
    The bias is added in the first pass over a chunk and the epilogue is one more pass."""
    rows = out.shape[0]
    chunks = (length + chunk - 1) // chunk
    src_at, src_ld = src.ctypes.data, src.shape[1]
    out_at, out_ld = out.ctypes.data, out.shape[1]
    for job in prange(rows * chunks):  # chunk-major: a thread's rows reuse the same input chunk
        o = job % rows
        q0 = (job // rows) * chunk
        n = min(chunk, length - q0)
        acc = _floats(out_at, o * out_ld + shift + q0, n)
        b = bias[o]
        k, end = ptr[o], ptr[o + 1]
        first = True
        while k + 8 <= end:  # eight weights per pass over the chunk, then a last four
            w0, w1, w2, w3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            w4, w5, w6, w7 = vals[k + 4], vals[k + 5], vals[k + 6], vals[k + 7]
            s0 = _floats(src_at, planes[k] * src_ld + offs[k] + q0, n)
            s1 = _floats(src_at, planes[k + 1] * src_ld + offs[k + 1] + q0, n)
            s2 = _floats(src_at, planes[k + 2] * src_ld + offs[k + 2] + q0, n)
            s3 = _floats(src_at, planes[k + 3] * src_ld + offs[k + 3] + q0, n)
            s4 = _floats(src_at, planes[k + 4] * src_ld + offs[k + 4] + q0, n)
            s5 = _floats(src_at, planes[k + 5] * src_ld + offs[k + 5] + q0, n)
            s6 = _floats(src_at, planes[k + 6] * src_ld + offs[k + 6] + q0, n)
            s7 = _floats(src_at, planes[k + 7] * src_ld + offs[k + 7] + q0, n)
            if first:
                for p in range(n):
                    acc[p] = (
                        b
                        + (w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p])
                        + (w4 * s4[p] + w5 * s5[p] + w6 * s6[p] + w7 * s7[p])
                    )
            else:
                for p in range(n):
                    acc[p] += (w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p]) + (
                        w4 * s4[p] + w5 * s5[p] + w6 * s6[p] + w7 * s7[p]
                    )
            first = False
            k += 8
        if k < end:  # rows are padded to a multiple of GROUP = 4
            w0, w1, w2, w3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            s0 = _floats(src_at, planes[k] * src_ld + offs[k] + q0, n)
            s1 = _floats(src_at, planes[k + 1] * src_ld + offs[k + 1] + q0, n)
            s2 = _floats(src_at, planes[k + 2] * src_ld + offs[k + 2] + q0, n)
            s3 = _floats(src_at, planes[k + 3] * src_ld + offs[k + 3] + q0, n)
            if first:
                for p in range(n):
                    acc[p] = b + (w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p])
            else:
                for p in range(n):
                    acc[p] += w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p]
        if ptr[o] == ptr[o + 1]:
            acc[:] = b
        _epilogue(acc, residual[o, shift + q0 :] if residual.shape[0] else residual[0:0, 0], mask[shift + q0 :], relu)


@njit(fastmath=True, inline="always")
def _epilogue(acc, res, mask, relu):
    """acc = (acc + res) -> ReLU -> * mask in one pass; an empty res or mask skips its part
    (the conditions are loop-invariant: LLVM unswitches them out of the loop)."""
    has_res, has_mask = res.shape[0] > 0, mask.shape[0] > 0
    for p in range(acc.shape[0]):
        v = acc[p]
        if has_res:
            v += res[p]
        if relu:
            v = max(v, 0.0)
        if has_mask:
            v *= mask[p]
        acc[p] = v


@njit(fastmath=True, parallel=True, cache=True, nogil=True)
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


def empty_rows() -> tuple[np.ndarray, np.ndarray]:
    """The (residual, mask) arguments that switch those steps off."""
    return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)


@njit(parallel=True, cache=True, nogil=True)
def gather_phases(x, n, h, w, pad_top, pad_left, stride_h, stride_w, hq, wq, phases, out):  # noqa: PLR0913
    """Stride phases of the zero-padded input, only those in `phases` (a 1x1 stride-2 convolution
    reads one of four): with phase = phases[j] = a * stride_w + b,
    out[j * C + c, i * hq * wq + r * wq + t] = element (i, c, r * stride_h + a - pad_top,
    t * stride_w + b - pad_left) of the planes `x` (grid n x h x w), zero outside the image; the
    tail of `out` is zeroed."""
    channels = x.shape[0]
    row, block = w + 1, (h + 1) * (w + 1)
    for job in prange(phases.shape[0] * channels):
        phase, c = phases[job // channels], job % channels
        a, b = phase // stride_w, phase % stride_w
        dst, src = out[job], x[c]
        # columns t whose source column t * stride_w + b - pad_left lies inside the image
        first = max(0, -((b - pad_left) // stride_w))
        last = min(wq, (w - 1 - b + pad_left) // stride_w + 1)
        for i in range(n):
            for r in range(hq):
                y = r * stride_h + a - pad_top
                line = dst[(i * hq + r) * wq : (i * hq + r + 1) * wq]
                line[:] = 0.0
                if 0 <= y < h and first < last:
                    start = i * block + (y + 1) * row + 1 + first * stride_w + b - pad_left
                    line[first:last] = src[start : start + (last - first - 1) * stride_w + 1 : stride_w]
        dst[n * hq * wq :] = 0.0
