"""Depthwise 8-bit convs on AVX-512 VNNI: ``vpdpbusd`` over the kernel's rows.

The LLVM-generic NHWC schedule (``cpu/depthwise.py``) multiplies each tap as widened int32
vectors: ~4 instructions per 16 multiply-adds, 9-10 GMAC/s on MobileNetV2's depthwise convs
(one Emerald Rapids core), a third of that model's time. Here a hand-written PrimFunc (TVM
IRBuilder) puts up to four kernel rows in the four bytes of each int32 lane, so one
``vpdpbusd`` does four taps of 16 channels:

1. Per output row (the parallel loop), the input rows it reads (``y * sh + r * dh``, r < R,
   in groups of four) are interleaved once into ``x4 [padded width, C, 4]`` u8: byte r of
   channel c at column z is ``x_enc[y * sh + r * dh, z, c]`` (``x_enc``: the input, ``^ 0x80``
   for int8, the zero point outside the image; bytes past R are 0). Four 16-byte row loads
   and one shuffle per 64 bytes.
2. Per output pixel and 16 channels: ``acc = corr``, then for each kernel column s (and row
   group) one ``vpdpbusd`` of ``x4[z * sw + s * dw, c:c+16]`` with the packed weights
   ``[groups, S, C, 4]`` (s8, zero past R); four pixels share each weight vector.
3. The requantize of the reference from the int32 ``acc`` (``cpu.vector.Requant``).

``corr = bias - zp_enc * sum(w)`` (``packing.correction``): the border reads ``zp_enc``, so
the sum is exact and bit-exact with the reference, like every integer kernel here. Takes
channel multiplier 1 (groups == C_in == C_out) and C a multiple of 16; the emitter keeps
the generic kernel for the rest.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ptqpasses_backends.tvm.cpu.vector import Requant
from ptqpasses_backends.tvm.kernels.conv2d import out_size

LANES = 16
#: Output pixels sharing each weight vector.
PIXELS = 4
#: The shuffle that interleaves four 16-byte rows into one 64-byte row of ``x4``: lane
#: ``4c + r`` takes row r's channel c.
_INTERLEAVE = [(lane % 4) * LANES + lane // 4 for lane in range(4 * LANES)]


def fits(c_in: int, c_out: int, groups: int, in_dtype: str) -> bool:
    return (groups == c_in == c_out and c_out % LANES == 0
            and in_dtype in ("int8", "uint8"))


def pack_weights(w: np.ndarray) -> np.ndarray:
    """``[C, 1, R, S]`` int8 -> ``[ceil(R/4), S, C, 4]``: byte r of (g, s, c) is
    ``w[c, 0, 4g + r, s]`` (0 past R)."""
    c, _, r_k, s_k = w.shape
    groups = -(-r_k // 4)
    out = np.zeros((groups, s_k, c, 4), np.int8)
    for r in range(r_k):
        out[r // 4, :, :, r % 4] = w[:, 0, r, :].T
    return out


def depthwise_vnni(n, h: int, w: int, c: int, *, kernel, stride, padding, dilation,
                   in_dtype: str, x_zp: int, out_zp: int, qmin: int, qmax: int,
                   out_dtype: str, parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc ``(x [n, h, w, c] in_dtype, w4 [G, S, c, 4] int8, corr [c] int32,
    mult [c] float32, out [n, oh, ow, c] out_dtype)``; ``n`` an int or None (symbolic)."""
    (r_k, s_k), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = out_size(h, r_k, sh, ph, dh), out_size(w, s_k, sw, pw, dw)
    wp = (ow - 1) * sw + (s_k - 1) * dw + 1  # padded columns read
    groups = -(-r_k // 4)
    cb = c // LANES
    nb = tirx.Var("n", "int64") if n is None else int(n)
    shift = 128 if in_dtype == "int8" else 0
    zp_enc = (x_zp + shift) & 0xFF
    rq = Requant(out_zp, qmin, qmax, out_dtype)

    def enc(v):
        if shift:
            return T.reinterpret("uint8x16", T.reinterpret("uint8x16", v)
                                 ^ T.broadcast(T.uint8(0x80), LANES))
        return v

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((nb, h, w, c), in_dtype))
            wt = T.arg("w4", T.buffer((groups * s_k * c * 4,), "int8"))
            corr = T.arg("corr", T.buffer((c,), "int32"))
            mult = T.arg("mult", T.buffer((c,), "float32"))
            out = T.arg("out", T.buffer((nb, oh, ow, c), out_dtype))
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
            with T.sblock("root"):
                with (T.parallel if parallel else T.serial)(0, nb * oh) as row:
                    b, yo = tirx.floordiv(row, oh), tirx.floormod(row, oh)
                    x4 = T.alloc_buffer((groups * wp * c * 4,), "uint8", scope="local",
                                        align=64)
                    # 1. interleave the rows this output row reads (the border reads the
                    # zero point: a select per 16 bytes, no padded copy of the input, which
                    # measured slower: one more pass over it)
                    pad = T.broadcast(T.uint8(zp_enc), LANES)
                    for g in range(groups):
                        with T.serial(0, wp) as z:
                            with T.serial(0, cb) as k:
                                rows = []
                                for r in range(4):
                                    if g * 4 + r >= r_k:
                                        rows.append(T.broadcast(T.uint8(0), LANES))
                                        continue
                                    y, col = yo * sh + (g * 4 + r) * dh - ph, z - pw
                                    v = enc(x[b, tirx.min(tirx.max(y, 0), h - 1),
                                              tirx.min(tirx.max(col, 0), w - 1),
                                              T.ramp(k * LANES, 1, LANES)])
                                    rows.append(tirx.Select(
                                        tirx.all(y >= 0, y < h, col >= 0, col < w), v, pad))
                                at = ((g * wp + z) * c + k * LANES) * 4
                                T.buffer_store(x4, tirx.Shuffle(rows, _INTERLEAVE),
                                               [T.ramp(at, 1, 4 * LANES)])
                    # 2.-3. vpdpbusd per kernel column and row group, then requantize
                    full, rest = divmod(ow, PIXELS)

                    def pixels(z0, count):
                        with T.serial(0, cb) as k:
                            chans = T.ramp(k * LANES, 1, LANES)
                            accs = [corr[chans] for _ in range(count)]
                            for g in range(groups):
                                for s in range(s_k):
                                    wv = wt[T.ramp(((g * s_k + s) * c + k * LANES) * 4, 1,
                                                   4 * LANES)]
                                    for p in range(count):
                                        col = (z0 + p) * sw + s * dw
                                        xv = x4[T.ramp(((g * wp + col) * c + k * LANES) * 4,
                                                       1, 4 * LANES)]
                                        accs[p] = T.call_llvm_pure_intrin(
                                            "int32x16", "llvm.x86.avx512.vpdpbusd.512",
                                            accs[p], xv, wv)
                            for p in range(count):
                                T.buffer_store(out, rq.value(accs[p], mult[chans], LANES),
                                               [b, yo, z0 + p, chans])

                    if full:
                        with T.serial(0, full) as zb:
                            pixels(zb * PIXELS, PIXELS)
                    if rest:
                        pixels(full * PIXELS, rest)
    return ib.get()


_OPAQUE = 8


def emit_if_fits(em, x, w: np.ndarray, bias, mult: np.ndarray, *, kernel, stride, padding,
                 dilation, x_zp: int, out_zp: int, qmin: int, qmax: int, out_dtype: str):
    """``Strategy.kernels["conv2d_depthwise"]``: the call of :func:`depthwise_vnni` on an
    NHWC ``x`` (``w``: ``[C, 1, R, S]`` int8; ``bias``: int32 or None), its NHWC output;
    None where it does not fit (:func:`fits`, static H / W / C)."""
    from ptqpasses_backends.tvm import packing

    n, h, wd, c = x.ty.shape.values
    if not all(isinstance(d, tirx.IntImm) for d in (h, wd, c)) or not fits(
            int(c), w.shape[0], w.shape[0], str(x.ty.dtype)):
        return None
    shift = 128 if str(x.ty.dtype) == "int8" else 0
    corr = packing.correction(w, bias, x_zp + shift)
    n_static = int(n) if isinstance(n, tirx.IntImm) else None
    func = depthwise_vnni(n_static, int(h), int(wd), int(c), kernel=kernel, stride=stride,
                          padding=padding, dilation=dilation, in_dtype=str(x.ty.dtype),
                          x_zp=x_zp, out_zp=out_zp, qmin=qmin, qmax=qmax,
                          out_dtype=out_dtype)
    func = func.with_attrs({"ptq.kernel": "conv2d_depthwise", "ptq.variant": "vnni",
                            "ptq.layout": "NHWC", "op_pattern": _OPAQUE})
    (r_k, s_k), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = out_size(int(h), r_k, sh, ph, dh), out_size(int(wd), s_k, sw, pw, dw)
    em.variants[em.node.name] = ("vnni-depthwise", f"vpdpbusd over {min(r_k, 4)} kernel rows "
                                 f"x 16 channels, {PIXELS} pixels per weight vector")
    gv = em.bb.add_func(func, "ptq_conv2d_depthwise_vnni")
    return em.bb.emit(relax.call_tir(
        gv, [x, relax.const(pack_weights(w).reshape(-1)), relax.const(corr),
             relax.const(mult)], relax.TensorType([n, oh, ow, c], out_dtype)))
