"""``ptq.conv2d``: NCHW activations, weights packed for NHWC dot-product blocks.

The reduction runs in NHWC so that ``depth`` input channels and ``lanes`` output channels are
contiguous (the VNNI / sdot block); the NCHW <-> NHWC changes live in the ``x_enc`` and
``out`` blocks, where they are cheap elementwise copies.
"""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.kernels.shapes import static_shape
from ptqpasses_backends.tvm.requant import requant_te


def out_size(size, k: int, stride: int, pad: int, dil: int):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _output_geometry(h: int, w: int, kernel: tuple, stride: tuple, padding: tuple,
                     dilation: tuple, width_block: int) -> tuple[int, int, int]:
    """``(oh, ow, ow_acc)``: the output size, and its width rounded up to ``width_block``."""
    (r_k, s_k), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = out_size(h, r_k, sh, ph, dh), out_size(w, s_k, sw, pw, dw)
    return oh, ow, -(-ow // width_block) * width_block


def nhwc_shape(shape: list, layout: str) -> list:
    """``[n, c, h, w]`` of a 4-D activation stored in ``layout`` (``NCHW`` / ``NHWC``)."""
    if layout == "NHWC":
        n, h, w, c = shape
        return [n, c, h, w]
    return list(shape)


def at(x, layout: str, b, c, y, z):
    """Element ``[b, c, y, z]`` (NCHW indices) of ``x`` stored in ``layout``."""
    return x[b, y, z, c] if layout == "NHWC" else x[b, c, y, z]


def _out(shape_nchw, value, out_layout: str):
    """The ``out`` block: ``value(b, o, y, z)`` (NCHW indices) stored in ``out_layout``."""
    n, c, h, w = shape_nchw
    if out_layout == "NHWC":
        return te.compute((n, h, w, c), lambda b, y, z, o: value(b, o, y, z), name="out")
    return te.compute((n, c, h, w), value, name="out")


def conv2d_packed(x, w_packed, corr, mult, *, groups: int, c_in: int, c_out: int,
                  kernel: tuple, stride: tuple, padding: tuple, dilation: tuple, shift: int,
                  zp_enc: int, act_dtype: str, out_zp: int, qmin: int, qmax: int,
                  out_dtype: str, width_block: int = 1, in_layout: str = "NCHW",
                  out_layout: str = "NCHW"):
    """TE compute of a requantized int8 conv2d on packed weights.

    ``w_packed`` is ``[O/l, R, S, C/d, l, d]`` (groups == 1) or ``[G, Og/l, R, S, Cg/d, l, d]``.
    Padding holds the encoded zero point, so the folded correction is exact at borders.
    ``width_block``: the reduction runs over the output width rounded up to a multiple of this
    (the extra columns read padding and are never requantized), so a schedule's register
    tiles of that many columns divide it (7x7 and 14x14 maps with 4-column tiles).
    ``in_layout`` / ``out_layout``: ``NCHW`` or ``NHWC`` (the reduction is NHWC either way:
    from an NHWC input ``x_enc`` is a padded copy, no transpose; an NHWC output is written
    channel-contiguous straight from the accumulators).
    """
    n, _, h, w = nhwc_shape(static_shape(x), in_layout)
    r_k, s_k = kernel
    g_ax = 0 if groups == 1 else 1
    ob, cb, lanes, depth = (int(w_packed.shape[g_ax]), int(w_packed.shape[g_ax + 3]),
                            int(w_packed.shape[-2]), int(w_packed.shape[-1]))
    cg, og = c_in // groups, c_out // groups
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    oh, ow, ow_acc = _output_geometry(h, w, kernel, stride, padding, dilation, width_block)
    w_enc = max(w + 2 * pw, (ow_acc - 1) * sw + (s_k - 1) * dw + 1)
    pad_val = tirx.const(zp_enc, act_dtype)

    def enc(b, y, z, g, c):
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw, c < cg)
        v = (at(x, in_layout, b, g * cg + c, y - ph, z - pw).astype("int32")
             + shift).astype(act_dtype)
        return tirx.if_then_else(inside, v, pad_val)

    x_enc = te.compute((n, h + 2 * ph, w_enc, groups, cb * depth), enc, name="x_enc")
    rr = te.reduce_axis((0, r_k), name="r")
    ss = te.reduce_axis((0, s_k), name="s")
    cc = te.reduce_axis((0, cb * depth), name="c")

    def weight(g, o, r, s, c):
        idx = (o // lanes, r, s, c // depth, o % lanes, c % depth)
        return w_packed[idx if groups == 1 else (g, *idx)]

    acc = te.compute(
        (n, oh, ow_acc, groups, ob * lanes),
        lambda b, y, z, g, o: te.sum(
            x_enc[b, y * sh + rr * dh, z * sw + ss * dw, g, cc].astype("int32")
            * weight(g, o, rr, ss, cc).astype("int32"),
            axis=[rr, ss, cc]),
        name="acc")
    def requant(b, o, y, z):
        return requant_te(acc[b, y, z, o // og, o % og] + corr[o], mult[o], out_zp, qmin, qmax,
                          out_dtype)

    return _out((n, c_out, oh, ow), requant, out_layout)


#: Depthwise convs compute their output width rounded up to a multiple of this (the CPU
#: schedule's vector of int32 accumulators, ``cpu/depthwise.py``); the extra columns read
#: padding and are never requantized.
DEPTHWISE_WIDTH_BLOCK = 8


def conv2d_depthwise(x, weight, corr, mult, *, groups: int, c_out: int, kernel: tuple,
                     stride: tuple, padding: tuple, dilation: tuple, x_zp: int, out_zp: int,
                     qmin: int, qmax: int, out_dtype: str,
                     width_block: int = DEPTHWISE_WIDTH_BLOCK):
    """Direct NCHW compute for convs with one input channel per group (depthwise).

    A 3x3 reduction per channel has nothing for a 4-deep dot product to do, so the weight
    stays OIHW ``[O, 1, R, S]`` and padding holds ``x_zp`` (corrections folded as above).

    ``x_enc`` is the padded input widened to int32, its columns split into ``stride_w`` phases:
    ``x_enc[b, c, y, p, zz] = x[b, c, y - pad_h, (zz - lead) * stride_w + p]`` (``x_zp``
    outside), ``lead = ceil(pad_w / stride_w)``. Output column ``z``'s tap ``s`` (x column
    ``z * stride_w + s * dil_w - pad_w``) then reads phase ``(s * dil_w - pad_w) % stride_w``
    at ``z + lead + (s * dil_w - pad_w) // stride_w``: consecutive output columns read
    consecutive elements for every stride (a vector load). With the padding counted in whole
    phase columns, the border test has one index per clause when ``w % stride_w == 0``, which
    lets a schedule split it off (``decompose_padding``). ``acc`` covers the output width
    rounded up to ``width_block`` (whole vectors, no tail); ``x_enc`` is wide enough for those
    extra columns, which only ``out`` drops. Integer sums in any order are exact, so the
    result is the reference's for every layout.
    """
    n, c_in, h, w = static_shape(x)
    r_k, s_k = kernel
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    oh, ow, ow_acc = _output_geometry(h, w, kernel, stride, padding, dilation, width_block)
    mult_per_group = c_out // groups
    rows = (oh - 1) * sh + (r_k - 1) * dh + 1
    lead = -(-pw // sw)  # phase columns before x's first column (left padding)
    cols = ow_acc + lead + ((s_k - 1) * dw - pw) // sw
    pad_val = tirx.const(x_zp, "int32")

    def padded(b, c, y, p, zz):
        z = (zz - lead) * sw + p  # x's column
        # (z < w is zz < lead + w / stride_w for every phase when stride_w divides w)
        right = zz < lead + w // sw if w % sw == 0 else z < w
        inside = tirx.all(y >= ph, y < h + ph, zz >= lead, right)
        return tirx.if_then_else(inside, x[b, c, y - ph, z].astype("int32"), pad_val)

    x_enc = te.compute((n, c_in, rows, sw, cols), padded, name="x_enc")
    rr = te.reduce_axis((0, r_k), name="r")
    ss = te.reduce_axis((0, s_k), name="s")

    def tap(b, o, y, z):
        col = ss * dw - pw  # of x, relative to output column z * sw
        p, q = (0, col) if sw == 1 else (tirx.floormod(col, sw), tirx.floordiv(col, sw))
        return x_enc[b, o // mult_per_group, y * sh + rr * dh, p, z + lead + q]

    acc = te.compute(
        (n, c_out, oh, ow_acc),
        lambda b, o, y, z: te.sum(tap(b, o, y, z) * weight[o, 0, rr, ss].astype("int32"),
                                  axis=[rr, ss]),
        name="acc")
    return te.compute(
        (n, c_out, oh, ow),
        lambda b, o, y, z: requant_te(acc[b, o, y, z] + corr[o], mult[o], out_zp, qmin, qmax,
                                      out_dtype),
        name="out")


#: NHWC depthwise convs tile output pixels x channels; the width is rounded up to this.
DEPTHWISE_NHWC_WIDTH_BLOCK = 4


def conv2d_depthwise_nhwc(x, weight, corr, mult, *, groups: int, c_out: int, kernel: tuple,
                          stride: tuple, padding: tuple, dilation: tuple, x_zp: int,
                          out_zp: int, qmin: int, qmax: int, out_dtype: str,
                          in_layout: str = "NHWC", out_layout: str = "NHWC",
                          width_block: int = DEPTHWISE_NHWC_WIDTH_BLOCK):
    """Depthwise conv computed channel-contiguous (NHWC), for SIMD over channels.

    ``weight`` is ``[R, S, O]`` int8 (``O = k * C`` for a channel multiplier ``k``): every
    tap of a run of output channels is one vector of weights times one vector of inputs, for
    any stride and dilation (no column de-interleaving, unlike the planar NCHW compute).
    ``x_enc`` is the input padded with ``x_zp`` in its own 8-bit dtype (widened to int32 in the
    multiply), so the correction ``bias - x_zp * sum(w)`` is exact at borders; ``acc`` covers
    the output width rounded up to ``width_block``. Integer sums in any order are exact:
    bit-exact with the reference for every layout.
    """
    n, c_in, h, w = nhwc_shape(static_shape(x), in_layout)
    r_k, s_k = kernel
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    oh, ow, ow_acc = _output_geometry(h, w, kernel, stride, padding, dilation, width_block)
    per_group = c_out // groups
    rows = (oh - 1) * sh + (r_k - 1) * dh + 1
    cols = (ow_acc - 1) * sw + (s_k - 1) * dw + 1
    pad_val = tirx.const(x_zp, x.dtype)

    def padded(b, y, z, c):
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
        return tirx.if_then_else(inside, at(x, in_layout, b, c, y - ph, z - pw), pad_val)

    x_enc = te.compute((n, rows, cols, c_in), padded, name="x_enc")
    rr = te.reduce_axis((0, r_k), name="r")
    ss = te.reduce_axis((0, s_k), name="s")
    acc = te.compute(
        (n, oh, ow_acc, c_out),
        lambda b, y, z, o: te.sum(
            x_enc[b, y * sh + rr * dh, z * sw + ss * dw, o // per_group].astype("int32")
            * weight[rr, ss, o].astype("int32"), axis=[rr, ss]),
        name="acc")

    def requant(b, o, y, z):
        return requant_te(acc[b, y, z, o] + corr[o], mult[o], out_zp, qmin, qmax, out_dtype)

    return _out((n, c_out, oh, ow), requant, out_layout)


def depthwise_float_nhwc(x: te.Tensor, w: te.Tensor, bias, stride: tuple, padding: tuple,
                         dilation: tuple) -> te.Tensor:
    """A float32 depthwise conv on a channel-last input (one the accuracy guard kept float):
    ``x [N, H, W, C]``, ``w [R, S, C]``, ``bias [C]`` or None -> ``[N, OH, OW, C]``, the taps
    summed in (r, s) order from 0 (as ``Emitter._depthwise_conv``'s strided slices), then the
    bias. Injective (padding read as 0 by a select), so the glue schedule vectorizes it over
    channels: contiguous loads. (The NCHW taps of the same conv, fused with the transpose
    of their NHWC input, read every tap at the channel stride: 1.15 ms for MobileNetV2's
    32 x 112 x 112 on one Emerald Rapids core.)"""
    n, h, wd, c = x.shape
    kh, kw = int(w.shape[0]), int(w.shape[1])
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = out_size(int(h), kh, sh, ph, dh)
    ow = out_size(int(wd), kw, sw, pw, dw)
    zero = tirx.const(0.0, "float32")

    def at(b, y, xo, ch):
        acc = zero
        for r in range(kh):
            for s in range(kw):
                iy, ix = y * sh + r * dh - ph, xo * sw + s * dw - pw
                inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
                v = x[b, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, wd - 1), 0), ch]
                acc = acc + tirx.if_then_else(inside, v, zero) * w[r, s, ch]
        return acc if bias is None else acc + bias[ch]

    return te.compute((n, oh, ow, c), at, name="depthwise_float")
