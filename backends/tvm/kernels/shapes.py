"""Shape helpers for TE kernels."""

from __future__ import annotations

from tvm import tirx


def static_shape(t) -> list:
    """``t.shape`` with constant dims as Python ints (so output-size arithmetic stays
    constant-folded) and symbolic dims (the batch) left as PrimExprs."""
    return [int(d) if isinstance(d, tirx.IntImm) else d for d in t.shape]


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` (>= 1) that is at most ``cap``."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
