"""``ptq.max_pool2d`` and ``ptq.avg_pool2d`` on NCHW integer tensors (PyTorch output sizes)."""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.kernels.shapes import static_shape
from ptqpasses_backends.tvm.requant import f32, requant_te


def pool_out_size(size, k: int, stride: int, pad: int, dil: int, ceil_mode: bool):
    """PyTorch's pooling output size, including its ceil-mode rule that the last window must
    start inside the input or the left padding."""
    span = size + 2 * pad - dil * (k - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = (span + stride - 1) // stride + 1
    if isinstance(out, int):
        return out - 1 if (out - 1) * stride >= size + pad else out
    return tirx.Select((out - 1) * stride >= size + pad, out - 1, out)


def _nhwc(shape4, layout: str):
    """``(n, c, h, w)`` of a 4-D shape in ``layout``; ``ix(b, c, y, z)``, the shape / index
    tuple in that layout; and ``nchw(*index)``, its inverse."""
    if layout == "NHWC":
        n, h, w, c = shape4
        return ((n, c, h, w), lambda b, ch, y, z: (b, y, z, ch),
                lambda b, y, z, ch: (b, ch, y, z))
    n, c, h, w = shape4
    return (n, c, h, w), lambda b, ch, y, z: (b, ch, y, z), lambda b, ch, y, z: (b, ch, y, z)


def max_pool2d(x, *, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
               ceil_mode: bool, layout: str = "NCHW"):
    """Window max, separable: a padded copy ``xp`` (the dtype's minimum outside the input, so
    padding never wins), the max over the window's rows ``vm`` (contiguous rows, at the row
    stride), then over its columns at the column stride. Max is exact in any order, so this is
    the reference's result; blocks ``xp``, ``vm``, ``out`` (``cpu/pool.py`` computes them
    per channel, or per row of channel vectors for ``layout="NHWC"``)."""
    (n, c, h, w), ix, nchw = _nhwc(static_shape(x), layout)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh = pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    # Rows / columns of the padded input the windows read (ceil mode may read past the
    # right padding; those taps are padding too).
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    low = tirx.min_value(x.dtype)

    def padded(*i):
        b, ch, y, z = nchw(*i)
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
        return tirx.if_then_else(inside, x[ix(b, ch, y - ph, z - pw)], low)

    xp = te.compute(ix(n, c, hp, wp), padded, name="xp")

    def rows(*i):
        b, ch, r0, z = nchw(*i)
        v = xp[ix(b, ch, r0 * sh, z)]
        for r in range(1, kh):
            v = tirx.max(v, xp[ix(b, ch, r0 * sh + r * dh, z)])
        return v

    vm = te.compute(ix(n, c, oh, wp), rows, name="vm")

    def cols(*i):
        b, ch, r0, j = nchw(*i)
        v = vm[ix(b, ch, r0, j * sw)]
        for s in range(1, kw):
            v = tirx.max(v, vm[ix(b, ch, r0, j * sw + s * dw)])
        return v

    return te.compute(ix(n, c, oh, ow), cols, name="out")


def avg_pool2d(x, *, kernel: tuple, stride: tuple, padding: tuple, x_zp: int,
               multiplier: float, out_zp: int, qmin: int, qmax: int, out_dtype: str,
               acc_dtype: str = "int32", layout: str = "NCHW"):
    """Window sum of ``x - x_zp`` with zero padding (count_include_pad) in ``acc_dtype``, then
    requantize."""
    (n, c, h, w), ix, _ = _nhwc(static_shape(x), layout)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh = pool_out_size(h, kh, sh, ph, 1, False)
    ow = pool_out_size(w, kw, sw, pw, 1, False)
    rr = te.reduce_axis((0, kh), name="r")
    ss = te.reduce_axis((0, kw), name="s")

    def tap(b, ch, i, j):
        y, z = i * sh + rr - ph, j * sw + ss - pw
        inside = tirx.all(y >= 0, y < h, z >= 0, z < w)
        v = x[ix(b, ch, y, z)].astype(acc_dtype) - tirx.const(x_zp, acc_dtype)
        return tirx.if_then_else(inside, v, tirx.const(0, acc_dtype))

    if layout == "NHWC":
        acc = te.compute((n, oh, ow, c), lambda b, i, j, ch: te.sum(tap(b, ch, i, j),
                                                                     axis=[rr, ss]), name="acc")
    else:
        acc = te.compute((n, c, oh, ow), lambda b, ch, i, j: te.sum(tap(b, ch, i, j),
                                                                     axis=[rr, ss]), name="acc")
    m = f32(multiplier)
    return te.compute(acc.shape, lambda *i: requant_te(acc[i], m, out_zp, qmin, qmax, out_dtype),
                      name="out")
