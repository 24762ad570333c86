"""Float32 ``tanh`` (``aten.tanh`` islands, emitted by ``emit.py``).

TVM legalizes ``tir.tanh`` for LLVM as ``(1 - exp(-2x)) / (1 + exp(-2x))``: near 0 the
numerator cancels, so ``tanh(1e-9)`` is 0 and ``tanh(-4.66e-7)`` is ``-2^-21`` (2% off; the fuzzer
found it on a linear with tiny weights followed by tanh). Here:

- ``|x| < SMALL``: the odd Taylor series ``x * P(x^2)`` (``TAYLOR_TERMS`` terms, coefficients
  ``2^2n (2^2n - 1) B_2n / (2n)!`` from the Bernoulli numbers, computed below in exact
  fractions); at ``|x| = SMALL`` the first dropped term is below 2^-26 of ``|x|``.
- otherwise ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= e^-1``: the result is >= 0.46, so
  the subtraction loses at most one bit; ``exp`` is the vectorizable one of the softmax kernel
  (``exp(-2|x|)`` is 0 below -87, where ``tanh`` is 1 in float32 anyway); the sign is put back.

NaN stays NaN; ``-0.0`` stays ``-0.0``. Against ``torch.tanh`` (ATen's vectorized Sleef, 1 ulp)
on a log grid 1e-30..20 of both signs and a fine grid across ``SMALL``: within
``TANH_TOLERANCE`` (measured worst 1 ulp from torch, 1.3 from the float64 result; TVM's own
lowering: 0 for 1e-9, a relative error of 1).
"""

from __future__ import annotations

from fractions import Fraction
from math import comb, factorial

from tvm import te, tirx

from ptqpasses_backends.tvm.kernels.softmax import exp_nonpositive
from ptqpasses_backends.tvm.requant import f32

#: Below this ``|x|`` the Taylor series is used.
SMALL = 0.5
#: Terms of the series (``x`` to ``x^(2 TAYLOR_TERMS - 1)``).
TAYLOR_TERMS = 11
#: What the tests allow against ``torch.tanh``: ``|ours - torch| <= rtol * |torch|``.
TANH_TOLERANCE = dict(rtol=4 * 2.0**-23, atol=0.0)


def _bernoulli(n: int) -> list:
    """``B_0 .. B_n`` (``B_1 = -1/2``), by the recurrence ``sum_k C(m+1, k) B_k = 0``."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return b


def taylor_coefficients(terms: int = TAYLOR_TERMS) -> list:
    """Coefficients ``c_n`` of ``tanh x = sum_n c_n x^(2n-1)``, n = 1..terms (1, -1/3, 2/15...)."""
    b = _bernoulli(2 * terms)
    return [float(4**n * (4**n - 1) * b[2 * n] / factorial(2 * n)) for n in range(1, terms + 1)]


_COEFFS = taylor_coefficients()


def tanh_expr(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``tanh(x)`` of a float32 scalar expression, branch-free (two selects)."""
    a = tirx.abs(x)
    x2 = x * x
    p = f32(_COEFFS[-1])
    for c in reversed(_COEFFS[:-1]):
        p = p * x2 + f32(c)
    small = x * p
    e = exp_nonpositive(f32(-2.0) * a)
    big = (f32(1.0) - e) / (f32(1.0) + e)
    big = tirx.Select(x < f32(0.0), -big, big)
    return tirx.Select(a < f32(SMALL), small, big)


def tanh(x: te.Tensor) -> te.Tensor:
    """Elementwise ``tanh`` of a float32 tensor (any shape, symbolic dims included)."""
    if x.dtype != "float32":
        raise ValueError(f"tanh kernel takes float32, got {x.dtype}")
    return te.compute(x.shape, lambda *i: tanh_expr(x[i]), name="tanh")


_SQRT_2_OVER_PI = 0.7978845608028654
_KAPPA = 0.044715


def gelu_tanh(x: te.Tensor) -> te.Tensor:
    """``gelu(approximate="tanh")`` as ATen computes it,
    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``, float32, with
    :func:`tanh_expr`."""
    if x.dtype != "float32":
        raise ValueError(f"gelu kernel takes float32, got {x.dtype}")

    def f(*i):
        v = x[i]
        inner = f32(_SQRT_2_OVER_PI) * (v + f32(_KAPPA) * v * v * v)
        return f32(0.5) * v * (f32(1.0) + tanh_expr(inner))

    return te.compute(x.shape, f, name="gelu_tanh")
