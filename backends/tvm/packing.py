"""Weight pre-packing into dot-product blocks, and the zero-point corrections it enables.

A family's dot-product instruction multiplies ``depth`` activation bytes by a ``lanes x depth``
weight block and accumulates ``lanes`` int32 sums (x86 VNNI: 16x4, aarch64 sdot: 4x4). Weights
are packed so that block is contiguous; the compute definitions index the packed tensor
directly, which is what tensorization (now, and in tuning later) needs.

Activations are re-encoded to the family's activation dtype (VNNI wants uint8, sdot int8) by a
shift of 128, or widened unchanged to int16 (the AVX2 ``vpmaddwd`` layout); the shifted zero point ``zp_enc`` then satisfies ``x - x_zp == x_enc - zp_enc``,
so ``sum((x - x_zp) * w) == sum(x_enc * w) - zp_enc * sum(w)`` and the second term is a constant
folded, with the bias, into one int32 correction per output channel.
"""

from __future__ import annotations

import numpy as np


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def encode_shift(in_dtype: str, act_dtype: str) -> int:
    """What to add to an ``in_dtype`` activation to express it in ``act_dtype``."""
    if in_dtype == act_dtype or (act_dtype == "int16" and in_dtype in ("int8", "uint8")):
        return 0
    if (in_dtype, act_dtype) == ("int8", "uint8"):
        return 128
    if (in_dtype, act_dtype) == ("uint8", "int8"):
        return -128
    raise TypeError(f"cannot encode {in_dtype} activations as {act_dtype}")


def encoded_zero_point(x_zp: int, in_dtype: str, act_dtype: str) -> int:
    """The zero point after :func:`encode_shift`; it must fit the encoded dtype (it pads)."""
    zp = int(x_zp) + encode_shift(in_dtype, act_dtype)
    lo, hi = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-2**15, 2**15 - 1)}[act_dtype]
    if not lo <= zp <= hi:
        raise ValueError(f"zero point {x_zp} of a {in_dtype} tensor is outside {in_dtype}'s range")
    return zp


def _padded(k: int, depth: int, k_block: int) -> int:
    """``k`` rounded up to whole blocks of ``depth`` and to a multiple of ``k_block``."""
    step = np.lcm(depth, max(1, k_block))
    return ceil_div(k, step) * step // depth


def pack_dense(weight: np.ndarray, lanes: int, depth: int, k_block: int = 1) -> np.ndarray:
    """``[N, K]`` int8 -> ``[N/lanes, K/depth, lanes, depth]`` (zero padded; ``K`` also to a
    multiple of ``k_block``)."""
    n, k = weight.shape
    nb, kb = ceil_div(n, lanes), _padded(k, depth, k_block)
    w = np.zeros((nb * lanes, kb * depth), np.int8)
    w[:n, :k] = weight
    return np.ascontiguousarray(w.reshape(nb, lanes, kb, depth).transpose(0, 2, 1, 3))


def pack_conv(weight: np.ndarray, groups: int, lanes: int, depth: int,
              k_block: int = 1) -> np.ndarray:
    """OIHW ``[O, C/g, R, S]`` -> ``[O/lanes, R, S, C/depth, lanes, depth]`` for one group,
    or ``[g, Og/lanes, R, S, Cg/depth, lanes, depth]`` for grouped convs (zero padded; ``C``
    also to a multiple of ``k_block``)."""
    o, cg, r, s = weight.shape
    og = o // groups
    ob, cb = ceil_div(og, lanes), _padded(cg, depth, k_block)
    w = np.zeros((groups, ob * lanes, cb * depth, r, s), np.int8)
    w[:, :og, :cg] = weight.reshape(groups, og, cg, r, s)
    # [g, ob, lanes, cb, depth, r, s] -> [g, ob, r, s, cb, lanes, depth]
    w = w.reshape(groups, ob, lanes, cb, depth, r, s).transpose(0, 1, 5, 6, 3, 2, 4)
    w = np.ascontiguousarray(w)
    return w[0] if groups == 1 else w


def correction(weight: np.ndarray, bias: np.ndarray | None, zp_enc: int) -> np.ndarray:
    """Per output channel ``bias - zp_enc * sum(w)`` in int32 (weights ``[O, ...]``)."""
    wsum = weight.reshape(weight.shape[0], -1).astype(np.int64).sum(axis=1)
    corr = -int(zp_enc) * wsum
    if bias is not None:
        corr = corr + bias.astype(np.int64)
    if np.abs(corr).max(initial=0) >= 2**31:
        raise OverflowError("zero-point correction does not fit int32")
    return corr.astype(np.int32)
