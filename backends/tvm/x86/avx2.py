"""Bit-exact dot-product intrinsics for AVX2 without VNNI: 8x2 int16 x s8 (any input), and
8x4 u8 x s8 (``vpmaddubsw``) where the weights and activation range prove it exact.

``vpmaddubsw`` (TVM's ``dot_16x4_avx512`` / the usual AVX2 trick) adds two u8 x s8 products in
int16 and saturates on full-range inputs, so it is not bit-exact. ``vpmaddwd`` multiplies int16
pairs and adds each pair into an exact int32; with int8 values widened to int16 that is an
exact 2-deep dot product per int32 lane.

The AVX2 family packs s8 weights in ``[O/16, K/2, 16, 2]`` blocks and widens activations to
int16 in the kernels' ``x_enc`` block, once per element. Each call widens one 8x2 weight block
(16 bytes, ``vpmovsxbw`` straight from memory) and ``vpmaddwd``-s it with the broadcast
activation pair (``vpbroadcastd``): the 8 output channels' partial sums land directly in their
accumulator lanes, with no horizontal reduction or shuffle. The schedule (``template.py``)
shares each widened block across several output rows and keeps their accumulators in
registers across the whole reduction. (Weights pre-widened to int16 at pack time were measured
too: no faster on ResNet-18 and ~10% slower on single kernels run between other work, with
twice the constant memory.)

Where the activations' range is known to be small enough (``QSpec(reduce_range=True)``:
u8 in ``[0, 127]``; or weights whose adjacent pairs are small), the pairwise intrinsic does
twice the work per instruction: ``vpmaddubsw`` on the u8 activation quad and an 8x4 weight
block (the VNNI packing, ``[O/16, K/4, 16, 4]``), then ``vpmaddwd`` with ones adds each lane's
two pair sums into int32. ``pairs_fit_int16`` is the proof the emitter checks per kernel
(127 * (127 + 127) < 2**15, so a 7-bit activation range always qualifies).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ptqpasses_backends.tvm.cpu.dot_intrin import dot_desc, register_once

AVX2_INTRIN = "ptq_dot_8x2_i16i8i32_avx2"

#: Output channels and reduction depth of one intrinsic call.
LANES, DEPTH = 8, 2


avx2_desc = dot_desc(LANES, DEPTH, "int16")


def _vpmaddwd_impl(b_dtype: str):
    """The 8x2 ``vpmaddwd`` implementation on a ``b_dtype`` (int8 or int16) weight block."""

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((8, 2), b_dtype, offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            # the activation pair as one int32, broadcast to the 8 lanes (vpbroadcastd); the
            # block widened to int16 (vpmovsxbw; no-op for int16). No named temporaries:
            # TVMScript makes each a local buffer, which a kernel's parallel loop turns into a
            # TVMBackendAllocWorkspace call per tile.
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                T.Cast("int16x16", B.vload([0, 0], dtype=b_dtype + "x16")), dtype="int32x8")

    return impl


avx2_impl = _vpmaddwd_impl("int8")


WIDE_INTRIN = "ptq_dot_8x2_i16i16i32_avx2"


wide_desc = dot_desc(LANES, DEPTH, "int16", "int16")


wide_impl = _vpmaddwd_impl("int16")  # block already int16: one 32-byte load


PAIRWISE_INTRIN = "ptq_dot_8x4_u8i8i32_avx2_pairwise"

#: Output channels and reduction depth of one pairwise intrinsic call.
PAIRWISE_LANES, PAIRWISE_DEPTH = 8, 4

#: ``vpmaddubsw`` saturates each sum of two products to this int16 range.
INT16_MIN, INT16_MAX = -2**15, 2**15 - 1


pairwise_desc = dot_desc(PAIRWISE_LANES, PAIRWISE_DEPTH, "uint8")


@T.prim_func(s_tir=True)
def pairwise_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # vpmaddubsw of the 4 activation bytes (one int32, broadcast to the 8 lanes) and the
        # 8x4 block: u8 x s8, adjacent products summed in (saturating) int16; then vpmaddwd
        # with ones: each lane's two pair sums into one exact int32. (No named temporaries,
        # see avx2_impl.)
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                          8), dtype="uint8x32"),
                B.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
            T.broadcast(T.int16(1), 16), dtype="int32x8")


def register() -> str:
    """Register the AVX2 intrinsic (idempotent); returns its name."""
    return register_once(AVX2_INTRIN, avx2_desc, avx2_impl)


def register_wide() -> str:
    """Register the int16 x int16 intrinsic (idempotent; ``matmul`` of two activations packed
    per call, ``kernels/matmul.py``); returns its name."""
    return register_once(WIDE_INTRIN, wide_desc, wide_impl)


def register_pairwise() -> str:
    """Register the pairwise ``vpmaddubsw`` intrinsic (idempotent); returns its name."""
    return register_once(PAIRWISE_INTRIN, pairwise_desc, pairwise_impl)


def pairs_fit_int16(w_packed, u_max: int) -> bool:
    """Whether ``vpmaddubsw`` is exact on these packed weights for activations in
    ``[0, u_max]``: every sum of two adjacent products ``u0 * w0 + u1 * w1`` (the pairs along
    the packed depth axis, which is last and a multiple of 2) stays inside int16.

    The sum is largest with ``u = u_max`` on the positive weights of the pair and 0 on the
    negative ones, and smallest the other way round.
    """
    import numpy as np

    w = np.asarray(w_packed, dtype=np.int64).reshape(-1, 2)
    pos = np.clip(w, 0, None).sum(axis=1).max(initial=0)
    neg = np.clip(-w, 0, None).sum(axis=1).max(initial=0)
    return int(u_max) * int(pos) <= INT16_MAX and int(u_max) * int(neg) <= -INT16_MIN
