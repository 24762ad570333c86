"""Float32 softmax over the last axis (``aten.softmax`` islands, emitted by ``emit.py``).

``max`` of the row, ``e = exp(x - max)``, their sum, ``e * (1 / sum)`` (as ATen does: one
reciprocal per row instead of a division per element; ``vdivps`` on zmm costs 16 cycles a
vector on Intel cores): the blocks of TVM's own
legalized softmax, but with a vectorizable ``exp`` (below) instead of libm's ``expf``, which
LLVM calls once per lane and which takes glibc's slow path on MiniLM's padding-masked scores
(~-1e4, 90% of them). The glue schedule (``cpu/glue.py``, dlight ``Reduction``) computes
it row by row, with the quantize that usually follows fused in.

``exp`` of ``d = x - max <= 0``: Cody-Waite range reduction ``d = n ln2 + f`` (``ln2`` split in
two constants so ``n * ln2`` is exact), Cephes' degree-6 minimax polynomial for ``exp(f)`` on
``|f| <= ln2 / 2``, and ``2^n`` built in the exponent bits. For ``d < -87`` it returns 0: there
``exp(d) < 1.7e-38``, and the row sum is >= 1, so the softmax is off by less than that in
absolute terms (it would be a float32 denormal or 0). NaN stays NaN, so a row of ``-inf`` (whose
``d`` is ``-inf - -inf``) gives NaN, as in torch.

Accuracy, measured against ``torch.softmax`` (float32 ATen: vectorized Sleef ``exp``, sum in
vector partials, multiply by ``1 / sum``), max over all elements, on MiniLM's own attention
scores (1x12x128x128, mostly masked) and on random rows (N(0, 4^2) x 128, U(-60, 20) x 384,
N(0, 2^2) x 7): this kernel 0 / 5 / 5 / 2 ulps (abs 0 / 2.4e-7 / 6e-8 / 6e-8) with the
division; with the reciprocal (2026-12-06, Emerald Rapids, the three random cases) 5 / 4 / 2
ulps from torch and 19 / 65 / 6 from the float64 result (torch: 18 / 65 / 6); TVM's legalized
``nn.softmax`` (libm ``expf``, serial sums) 0 / 12 / 10 / 3 ulps (abs 0 / 7.2e-7 / 1.5e-7 /
1.2e-7). Against the float64 result: 1 / 22 / 67 / 8 ulps, TVM's 1 / 26 / 72 / 8, torch's
1 / 22 / 66 / 8: the float32 row sum dominates, not the ``exp``. Speed on one Zen 3 core, the
MiniLM scores: 0.19 ms, TVM's 1.4 ms (slow ``expf`` path on the masked scores); on one
Emerald Rapids core (a shared VM) 1x12x128x128: 333 us with the division, 277 with the
reciprocal (one process, min of 50). The test bound is ``SOFTMAX_TOLERANCE``.
"""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.cpu.glue import LANE_PARTIALS
from ptqpasses_backends.tvm.requant import f32

#: Partial row max / sum per lane (one AVX2 float32 register).
LANES = 8

#: Below this ``x - max``, ``exp`` is taken as 0 (``exp(-87) = 1.6e-38``).
EXP_CUTOFF = -87.0

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo; n * hi is exact for |n| < 2^9
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)

#: What the tests allow against ``torch.softmax``: ``|ours - torch| <= rtol * |torch| + atol``
#: elementwise (8 float32 ulps, the measured worst case 5 with a margin; ``atol`` covers the
#: terms cut to 0 below ``EXP_CUTOFF``).
SOFTMAX_TOLERANCE = dict(rtol=8 * 2.0**-23, atol=2e-38)


def exp_nonpositive(d: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(d)`` for float32 ``d <= 0`` (or NaN), branch-free and vectorizable; ``d`` a
    scalar or a vector (``float32xN``: the hand-written CPU kernels)."""
    dtype = d.ty.dtype
    lanes = dtype.lanes

    def c(v, dtype="float32"):
        k = f32(v) if dtype == "float32" else tirx.const(v, dtype)
        return k if lanes == 1 else tirx.Broadcast(k, lanes)

    i32 = "int32" if lanes == 1 else f"int32x{lanes}"
    dc = tirx.max(d, c(EXP_CUTOFF))
    n = tirx.floor(dc * c(_LOG2E) + c(0.5))
    f = dc - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_EXP_POLY[0])
    for k in _EXP_POLY[1:]:
        p = p * f + c(k)
    y = p * f * f + f + c(1.0)
    two_n = tirx.reinterpret(str(dtype), tirx.shift_left(n.astype(i32) + c(127, "int32"),
                                                      c(23, "int32")))
    e = tirx.Select(d < c(EXP_CUTOFF), c(0.0), y * two_n)
    return tirx.Select(tirx.isnan(d), d, e)


def softmax_last_axis(x: te.Tensor) -> te.Tensor:
    """``softmax(x, -1)`` of a float32 tensor (any leading dims, symbolic ones included).

    Where the row length is a static multiple of ``LANES`` (>= 2 ``LANES``), the row max and
    sum are taken in ``LANES`` strided partials first (``element j`` into partial ``j % LANES``,
    in order), then over the partials: blocks named ``*_lanes``, which the glue schedule turns
    into vector accumulators (a serial float chain is latency-bound: half the kernel's time).
    """
    if x.dtype != "float32":
        raise ValueError(f"softmax kernel takes float32, got {x.dtype}")
    *lead, n = x.shape
    lanes = isinstance(n, tirx.IntImm) and int(n) % LANES == 0 and int(n) >= 2 * LANES
    row_max = _row_reduce(x, te.max, "row_max", lanes)
    e = te.compute(x.shape, lambda *i: exp_nonpositive(x[i] - row_max[i[:-1]]), name="exp")
    row_sum = _row_reduce(e, te.sum, "row_sum", lanes)
    inv = te.compute(row_sum.shape, lambda *i: f32(1.0) / row_sum[i], name="row_inv")
    return te.compute(x.shape, lambda *i: e[i] * inv[i[:-1]], name="softmax")


def _row_reduce(x: te.Tensor, reducer, name: str, lanes: bool) -> te.Tensor:
    *lead, n = x.shape
    if not lanes:
        k = te.reduce_axis((0, n), name="k")
        return te.compute(lead, lambda *i: reducer(x[(*i, k)], axis=k), name=name)
    k = te.reduce_axis((0, int(n) // LANES), name="k")
    part = te.compute((*lead, LANES), lambda *i: reducer(x[(*i[:-1], k * LANES + i[-1])], axis=k),
                      name=name + LANE_PARTIALS)
    lane = te.reduce_axis((0, LANES), name="lane")
    return te.compute(lead, lambda *i: reducer(part[(*i, lane)], axis=lane), name=name)
