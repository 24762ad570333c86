"""Float32 ``erf`` and exact ``gelu`` (``aten.erf`` / ``aten.gelu`` islands, emitted by
``emit.py``).

TVM lowers ``tir.erf`` for LLVM to a call of libm's ``erff`` per element (16 scalar calls per
vector): an int16 GELU island of all-MiniLM (128 x 1536 values) took ~3 ms on one Emerald
Rapids core. Here ``erf`` is the rational approximation used by Eigen and XLA for float32:
``x`` clamped to [-4, 4] (``erf`` is 1 to float32 precision beyond), then
``x * P(x^2) / Q(x^2)`` (P of degree 6, Q of degree 4 in ``x^2``): branch-free and vectorizable.
GELU is ATen's exact form ``x * 0.5 * (1 + erf(x / sqrt(2)))``.

Accuracy against ``torch.erf`` (ATen's vectorized Sleef, 1 ulp) on a grid of -6..6 (step 6e-5)
and log grids 1e-30..6.3 of both signs: worst 7 ulps, at |x| ~ 3.3 where ``erf`` ~ 0.999997
(4.2e-7 absolute); ``ERF_TOLERANCE`` bounds it. NaN stays NaN.
"""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.requant import f32

#: ``P`` (highest power first), ``Q`` likewise: erf(x) ~ x * P(x^2) / Q(x^2) on [-4, 4].
_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
      -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
      -1.60960333262415e-02)
_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
      -7.37332916720468e-03, -1.42647390514189e-02)
#: Beyond this |x| the approximation is evaluated at the bound (erf = 1 in float32).
CLAMP = 4.0
_SQRT1_2 = 0.7071067811865476
#: What the tests allow against ``torch.erf``: ``|ours - torch| <= rtol * |torch| + atol``.
ERF_TOLERANCE = dict(rtol=8 * 2.0**-23, atol=1e-30)


def _horner(coeffs, z):
    p = f32(coeffs[0])
    for c in coeffs[1:]:
        p = p * z + f32(c)
    return p


def erf_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erf(x)`` of a float32 scalar expression."""
    xc = tirx.min(tirx.max(x, f32(-CLAMP)), f32(CLAMP))
    z = xc * xc
    y = xc * _horner(_P, z) / _horner(_Q, z)
    return tirx.Select(tirx.isnan(x), x, y)


def erf(x: te.Tensor) -> te.Tensor:
    if x.dtype != "float32":
        raise ValueError(f"erf kernel takes float32, got {x.dtype}")
    return te.compute(x.shape, lambda *i: erf_expr(x[i]), name="erf")


def gelu(x: te.Tensor) -> te.Tensor:
    """``x * 0.5 * (1 + erf(x * sqrt(1/2)))`` (``gelu(approximate="none")``), float32."""
    if x.dtype != "float32":
        raise ValueError(f"gelu kernel takes float32, got {x.dtype}")
    return te.compute(x.shape, lambda *i: x[i] * f32(0.5) * (
        f32(1.0) + erf_expr(x[i] * f32(_SQRT1_2))), name="gelu")
