"""``ptq.linear`` / ``ptq.conv2d`` with an int16 activation operand (a per-node precision raise).

The dot-product kernels (``dense.py``, ``conv2d.py``) re-encode activations to 8 bits for the
VNNI / sdot blocks; an int16 activation does not fit that encoding. These computes are plain
direct reductions over unpacked weights (``[N, K]``, OIHW ``[O, C/g, R, S]``) on centered
activations ``x - x_zp``, accumulated in ``acc_dtype``: int64 unless :func:`accumulator_dtype`
proves int32 cannot overflow for these weights (the reference's exact sum, see
``ptqpasses/ops/reference.py``). They carry the kernel kinds ``dense_wide`` / ``conv2d_wide``,
which the families' tensorizing schedules and the default tuning kinds leave alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from tvm import te, tirx

from ptqpasses_backends.tvm.kernels.conv2d import out_size
from ptqpasses_backends.tvm.kernels.shapes import static_shape
from ptqpasses_backends.tvm.requant import requant_te

#: Kernel kinds (``ptq.kernel`` attribute) of the computes in this file.
KINDS = ("dense_wide", "conv2d_wide")

_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767),
           "int32": (-2**31, 2**31 - 1)}


def max_centered(dtype: str, zp: int) -> int:
    """The largest ``|x - zp|`` over every value ``x`` of ``dtype``."""
    if dtype not in _RANGES:
        raise TypeError(f"no integer range known for activation dtype {dtype}")
    lo, hi = _RANGES[dtype]
    return max(abs(lo - int(zp)), abs(hi - int(zp)))


def accumulator_dtype(bound: int) -> str:
    """``int32`` when every partial sum is at most ``bound`` in magnitude and that fits, else
    ``int64``."""
    return "int32" if bound < 2**31 else "int64"


def weighted_bound(x_max: int, weight: np.ndarray, bias: Optional[np.ndarray]) -> int:
    """A bound on every partial sum of ``sum((x - x_zp) * w) + bias`` per output channel, with
    ``|x - x_zp| <= x_max`` (weights ``[O, ...]``)."""
    wsum = np.abs(weight.reshape(weight.shape[0], -1).astype(np.int64)).sum(axis=1)
    b = np.zeros_like(wsum) if bias is None else np.abs(bias.astype(np.int64))
    return int((x_max * wsum + b).max(initial=0))


def dense_wide(x, weight, bias, mult, *, x_zp: int, acc_dtype: str, out_zp: int, qmin: int,
               qmax: int, out_dtype: str):
    """TE compute of ``requant(sum_k (x[..., k] - x_zp) * w[n, k] + bias[n])``.

    Args:
        x: ``[..., K]`` activations (any integer dtype, int16 in practice).
        weight: ``[N, K]`` int8.
        bias: ``[N]`` in ``acc_dtype``, or None.
        mult: ``[N]`` float32 requantization multipliers.
        acc_dtype: ``int32`` or ``int64`` (see :func:`accumulator_dtype`).
    """
    n_out, k_in = (int(d) for d in weight.shape)
    lead = list(x.shape[:-1])
    x_c = te.compute((*lead, k_in), lambda *i: x[i].astype(acc_dtype) - tirx.const(x_zp, acc_dtype),
                     name="x_enc")
    k = te.reduce_axis((0, k_in), name="k")
    acc = te.compute(
        (*lead, n_out),
        lambda *idx: te.sum(x_c[(*idx[:-1], k)] * weight[idx[-1], k].astype(acc_dtype), axis=k),
        name="acc")

    def out(*idx):
        a = acc[idx] if bias is None else acc[idx] + bias[idx[-1]]
        return requant_te(a, mult[idx[-1]], out_zp, qmin, qmax, out_dtype)

    return te.compute((*lead, n_out), out, name="out")


def conv2d_wide(x, weight, bias, mult, *, groups: int, stride: tuple, padding: tuple,
                dilation: tuple, x_zp: int, acc_dtype: str, out_zp: int, qmin: int, qmax: int,
                out_dtype: str):
    """TE compute of a requantized NCHW conv (any groups) on OIHW int8 weights.

    Padding holds the real zero (``x_zp``), i.e. 0 after centering, as the reference.
    """
    n, _, h, w = static_shape(x)
    c_out, cg, r_k, s_k = (int(d) for d in weight.shape)
    og = c_out // groups
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    oh, ow = out_size(h, r_k, sh, ph, dh), out_size(w, s_k, sw, pw, dw)
    zero = tirx.const(0, acc_dtype)

    def centered(b, c, y, z):
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
        v = x[b, c, y - ph, z - pw].astype(acc_dtype) - tirx.const(x_zp, acc_dtype)
        return tirx.if_then_else(inside, v, zero)

    x_pad = te.compute((n, cg * groups, h + 2 * ph, w + 2 * pw), centered, name="x_enc")
    cc = te.reduce_axis((0, cg), name="c")
    rr = te.reduce_axis((0, r_k), name="r")
    ss = te.reduce_axis((0, s_k), name="s")
    acc = te.compute(
        (n, c_out, oh, ow),
        lambda b, o, y, z: te.sum(
            x_pad[b, (o // og) * cg + cc, y * sh + rr * dh, z * sw + ss * dw]
            * weight[o, cc, rr, ss].astype(acc_dtype),
            axis=[cc, rr, ss]),
        name="acc")

    def out(b, o, y, z):
        a = acc[b, o, y, z] if bias is None else acc[b, o, y, z] + bias[o]
        return requant_te(a, mult[o], out_zp, qmin, qmax, out_dtype)

    return te.compute((n, c_out, oh, ow), out, name="out")

