"""Float32 layer norm over the last axis, with float64 row statistics, as one kernel
(``aten.layer_norm`` islands, emitted by ``emit.py``).

Arithmetic (the emitter's contract, see ``Emitter._layer_norm``): the row mean and the biased
variance of the centred row are accumulated in float64 and rounded to float32; then ATen's
float32 steps ``rstd = 1 / sqrt(var + eps)``, ``(x - mean) * rstd * weight + bias``. TVM's own
``nn.layer_norm`` sums the row serially in float32, tens of ulps off on a residual stream with
outlier channels (MiniLM), enough to flip the LSB of the quantize after it.

Written as Relax ops (cast, mean, subtract, multiply, mean, ...) the same arithmetic became four
kernels per layer norm with three float64 intermediates of the row's size (MiniLM s128: 13
calls, 1.7 ms of 26.6 on one Zen 3 core). Here it is one function: each row's sum and centred
sum of squares are taken in ``LANES`` strided float64 partials (element ``j`` into partial
``j % LANES``, then the partials in order: ``*_lanes`` blocks, which the glue schedule turns
into vector accumulators), and the normalized row is written once. The float64 sums differ from
a serial sum only in their order, far below the float32 rounding that follows.
"""

from __future__ import annotations

from typing import Optional

from tvm import te, tirx

from ptqpasses_backends.tvm.cpu.glue import LANE_PARTIALS

#: Partial sums per row (two AVX2 float64 registers).
LANES = 8


def layer_norm_last_axis(x: te.Tensor, weight: Optional[te.Tensor], bias: Optional[te.Tensor],
                         eps: float) -> te.Tensor:
    """``layer_norm(x, [n], weight, bias, eps)`` of a float32 tensor ``[..., n]`` (leading dims
    may be symbolic; ``n`` static); ``weight`` / ``bias``: float32 ``[n]`` or None."""
    if x.dtype != "float32":
        raise ValueError(f"layer_norm kernel takes float32, got {x.dtype}")
    *lead, n = x.shape
    if not isinstance(n, tirx.IntImm):
        raise ValueError(f"layer_norm kernel needs a static normalized size, got {n}")
    n = int(n)

    def mean_of(total):
        return total / tirx.const(float(n), "float64")

    x64 = lambda *i: x[i].astype("float64")  # noqa: E731
    total = _row_sum(lambda *i: x64(*i), lead, n, "row_sum")
    mean64 = te.compute(lead, lambda *i: mean_of(total[i]), name="mean64")
    sq = _row_sum(lambda *i: (x64(*i) - mean64[i[:-1]]) * (x64(*i) - mean64[i[:-1]]),
                  lead, n, "row_sq")

    def norm(*i):
        r = i[:-1]
        var = mean_of(sq[r]).astype("float32")
        rstd = tirx.const(1.0, "float32") / tirx.sqrt(var + tirx.const(float(eps), "float32"))
        y = (x[i] - mean64[r].astype("float32")) * rstd
        if weight is not None:
            y = y * weight[i[-1]]
        if bias is not None:
            y = y + bias[i[-1]]
        return y

    return te.compute(x.shape, norm, name="layer_norm")


def _row_sum(value, lead, n: int, name: str) -> te.Tensor:
    """``sum_j value(*row, j)`` in float64, in ``LANES`` strided partials when ``n`` allows."""
    if n % LANES or n < 2 * LANES:
        k = te.reduce_axis((0, n), name="k")
        return te.compute(lead, lambda *i: te.sum(value(*i, k), axis=k), name=name)
    k = te.reduce_axis((0, n // LANES), name="k")
    part = te.compute((*lead, LANES),
                      lambda *i: te.sum(value(*i[:-1], k * LANES + i[-1]), axis=k),
                      name=name + LANE_PARTIALS)
    lane = te.reduce_axis((0, LANES), name="lane")
    return te.compute(lead, lambda *i: te.sum(part[(*i, lane)], axis=lane), name=name)
