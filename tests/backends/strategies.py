"""Hypothesis strategies for integer-op parameters (kept small: every example compiles)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


@st.composite
def qdtype(draw):
    """(dtype, zero point, qmin, qmax), sometimes with a fused ReLU (qmin = zp)."""
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    lo, hi = DTYPES[dtype]
    zp = draw(st.integers(lo, hi))
    qmin, qmax = lo, hi
    if draw(st.booleans()):
        qmin = zp  # fused ReLU
    return dtype, zp, qmin, qmax


@st.composite
def out_qdtype(draw):
    """An output's (dtype, zero point, qmin, qmax): :func:`qdtype`, or now and then float32
    (a float-output conv / linear / matmul: ``float32(acc) * m``, no zero point or clamp)."""
    if draw(st.integers(0, 3)) == 0:
        return torch.float32, 0, 0, 0
    return draw(qdtype())


def multiplier(draw) -> float:
    """A float32 multiplier; powers of two make round-half-to-even ties frequent."""
    m = draw(st.one_of(st.sampled_from([0.5, 0.25, 0.125, 1.0]),
                       st.floats(1e-4, 0.05).map(lambda v: float(np.float32(v)))))
    return float(np.float32(m))


def int_tensor(seed: int, shape, dtype: torch.dtype) -> torch.Tensor:
    lo, hi = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, tuple(shape), generator=g, dtype=torch.int16).to(dtype)


def weight(seed: int, shape) -> torch.Tensor:
    return int_tensor(seed, shape, torch.int8)


def multipliers(seed: int, n: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, generator=g) + 0.05) * scale
    # Every other channel an exact power of two, to hit rounding ties.
    m[::2] = 2.0 ** -torch.randint(6, 12, (len(m[::2]),), generator=g).float()
    return m.float()
