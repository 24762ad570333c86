"""Per-token (dynamic) activations: ``ptq.fake_quantize_per_token`` and the two glue kernels of
``ptq.linear_dynamic`` around the packed int8 dense.

The formulas are ``token_qparams`` / ``linear_dynamic`` of ``ptqpasses/ops/reference.py``,
operation by operation in float32. None is a multiply feeding an add (``round`` or a
subtraction sits between), so LLVM's FMA contraction (TVM builds with fp-contract fast) cannot
change a result: the kernels are bit-exact with the reference.
"""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses.ops.reference import TOKEN_SCALE_MIN
from ptqpasses_backends.tvm.cpu.glue import LANE_PARTIALS
from ptqpasses_backends.tvm.requant import f32

LANES = 16

#: Layout of the per-row parameters ``token_params`` returns in its last axis.
SCALE, INVERSE, ZERO_POINT = 0, 1, 2


def _finite(x):
    """``x`` with NaN read as 0.0 (TE element function)."""
    def at(*i):
        v = x(*i)
        return tirx.Select(tirx.isnan(v), f32(0.0), v)
    return at


def token_params(x: te.Tensor) -> te.Tensor:
    """``[..., 3]`` float32 per row of ``x[..., K]``: scale, its inverse, zero point."""
    lead, k_in = list(x.shape[:-1]), x.shape[-1]
    val = _finite(x)
    lo = _row_extreme(val, lead, k_in, te.min, "row_min")
    hi = _row_extreme(val, lead, k_in, te.max, "row_max")

    def params(*i):
        *m, j = i
        low = tirx.min(lo(*m), f32(0.0))
        high = tirx.max(hi(*m), f32(0.0))
        s = tirx.max(high / f32(255.0) - low / f32(255.0), f32(TOKEN_SCALE_MIN))
        inv = f32(1.0) / s
        zp = tirx.min(tirx.max(tirx.round(-low * inv), f32(0.0)), f32(255.0))
        return tirx.Select(j == SCALE, s, tirx.Select(j == INVERSE, inv, zp))

    return te.compute((*lead, 3), params, name="token_params")


def _row_extreme(value, lead, n, reducer, name: str) -> te.Tensor:
    """``reducer`` (te.min / te.max) of ``value(*row, j)`` over a row, in ``LANES`` strided
    partials when the row length allows (the glue schedule vectorizes them: one serial
    chain of 1536 scalar min / max per row ran 0.5 ms on MiniLM's FFN input). Min and max are
    exact in any order."""
    if not isinstance(n, (int, tirx.IntImm)) or int(n) % LANES or int(n) < 2 * LANES:
        k = te.reduce_axis((0, n), name="k")
        return te.compute(lead, lambda *i: reducer(value(*i, k), axis=k), name=name)
    k = te.reduce_axis((0, int(n) // LANES), name="k")
    part = te.compute((*lead, LANES), lambda *i: reducer(value(*i[:-1], k * LANES + i[-1]),
                                                        axis=k), name=name + LANE_PARTIALS)
    lane = te.reduce_axis((0, LANES), name="lane")
    return te.compute(lead, lambda *i: reducer(part[(*i, lane)], axis=lane), name=name)


def token_quantize(x: te.Tensor, p: te.Tensor, dtype: str = "uint8") -> te.Tensor:
    """``clamp(rne(x * inv) + zp, 0, 255)`` per row (``p`` from :func:`token_params`)."""
    val = _finite(x)

    def at(*i):
        *m, _ = i
        y = tirx.round(val(*i) * p(*m, INVERSE)) + p(*m, ZERO_POINT)
        return tirx.min(tirx.max(y, f32(0.0)), f32(255.0)).astype(dtype)

    return te.compute(x.shape, at, name="token_quantize")


def token_dequantize(q: te.Tensor, p: te.Tensor) -> te.Tensor:
    """``(q - zp) * s`` per row: ``fake_quantize_per_token``'s result."""
    def at(*i):
        *m, _ = i
        return (q(*i).astype("float32") - p(*m, ZERO_POINT)) * p(*m, SCALE)
    return te.compute(q.shape, at, name="token_dequantize")


def token_epilogue(raw: te.Tensor, p: te.Tensor, colsum: te.Tensor,
                   w_scale: te.Tensor) -> te.Tensor:
    """``((raw - float32(zp * colsum[n])) * s) * w_scale[n]``; ``raw`` is the dense's
    ``float32`` of the exact sum ``q @ w.T``."""
    def at(*i):
        *m, n = i
        corr = (p(*m, ZERO_POINT).astype("int32") * colsum[n]).astype("float32")
        return ((raw(*i) - corr) * p(*m, SCALE)) * w_scale[n]
    return te.compute(raw.shape, at, name="token_epilogue")
