"""The reference's float32 formulas, written once for TE and once for Relax.

Each function reproduces one docstring of ``ptqpasses/ops/reference.py`` operation by
operation: a single float32 multiply before a half-to-even round (``tir.round`` lowers to
``llvm.nearbyint``), a true division in ``quantize``, and the clamp done in float32 before the
cast. Measured: the LLVM backend keeps ``vdivps`` and does not contract these into FMAs
(``round`` sits between the multiply and the add).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx


def f32(value) -> tirx.PrimExpr:
    """An exact float32 immediate for a Python/NumPy scalar."""
    return tirx.const(float(np.float32(value)), "float32")


def requant_te(acc, multiplier, out_zp: int, qmin: int, qmax: int, dtype: str):
    """``clamp(rne(float32(acc) * m) + out_zp, qmin, qmax)`` cast to ``dtype`` (TE scalar);
    ``float32(acc) * m`` for a float32 output (a float-output op)."""
    if dtype == "float32":
        return acc.astype("float32") * multiplier
    y = tirx.round(acc.astype("float32") * multiplier) + f32(out_zp)
    y = tirx.min(tirx.max(y, f32(qmin)), f32(qmax))
    return y.astype(dtype)


def _emit(bb: relax.BlockBuilder, expr):
    return bb.emit(expr)


def requant_relax(bb, acc, multiplier, out_zp: int, qmin: int, qmax: int, dtype: str):
    """Relax form of :func:`requant_te`; ``multiplier`` is a float or a float32 constant."""
    m = multiplier if isinstance(multiplier, relax.Expr) else relax.const(
        np.float32(multiplier), "float32")
    y = _emit(bb, relax.op.astype(acc, "float32"))
    y = _emit(bb, relax.op.multiply(y, m))
    if dtype == "float32":  # a float-output op
        return y
    y = _emit(bb, relax.op.round(y))
    y = _emit(bb, relax.op.add(y, relax.const(np.float32(out_zp), "float32")))
    y = _emit(bb, relax.op.clip(y, float(qmin), float(qmax)))
    return _emit(bb, relax.op.astype(y, dtype))


def centered_relax(bb, q, zp: int, dtype: str = "int32"):
    """``dtype(q) - zp`` (``int64`` where int16 operands could overflow an int32 sum)."""
    x = _emit(bb, relax.op.astype(q, dtype))
    if zp == 0:
        return x
    return _emit(bb, relax.op.subtract(x, relax.const(np.array(zp, dtype), dtype)))


def quantize_relax(bb, x, scale: float, zp: int, qmin: int, qmax: int, dtype: str):
    """``clamp(rne(x / scale) + zp, qmin, qmax)`` in float32; a true division, as the spec;
    NaN reads as 0.0."""
    y = x if _dtype(x) == "float32" else _emit(bb, relax.op.astype(x, "float32"))
    y = bb.emit_te(_nan_to_zero, y, primfunc_name_hint="nan_to_zero")
    y = _emit(bb, relax.op.divide(y, relax.const(np.float32(scale), "float32")))
    y = _emit(bb, relax.op.round(y))
    y = _emit(bb, relax.op.add(y, relax.const(np.float32(zp), "float32")))
    y = _emit(bb, relax.op.clip(y, float(qmin), float(qmax)))
    return _emit(bb, relax.op.astype(y, dtype))


def _nan_to_zero(x):
    # a TE select, not relax where(isnan(x), 0, x): that legalizes to a bool buffer cast to
    # int64, which TVM's vectorizer scalarized (quantize islands lost their vcvttps2dq)
    from tvm import te

    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)),
                                                      tirx.const(0, "float32"), x(*i)),
                      name="nan_to_zero")


def dequantize_relax(bb, q, scale, zp):
    """``float32(int32(q) - zp) * scale``; ``scale``/``zp`` scalars or broadcastable consts."""
    x = _emit(bb, relax.op.astype(q, "int32"))
    z = zp if isinstance(zp, relax.Expr) else relax.const(np.int32(zp), "int32")
    x = _emit(bb, relax.op.subtract(x, z))
    x = _emit(bb, relax.op.astype(x, "float32"))
    s = scale if isinstance(scale, relax.Expr) else relax.const(np.float32(scale), "float32")
    return _emit(bb, relax.op.multiply(x, s))


def _dtype(expr) -> str:
    return str(expr.ty.dtype)
