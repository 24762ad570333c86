"""A bit-exact 8x2 int16 x s8 -> int32 dot-product intrinsic for AVX2 (no VNNI).

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
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

AVX2_INTRIN = "ptq_dot_8x2_i16i8i32_avx2"

#: Output channels and reduction depth of one intrinsic call.
LANES, DEPTH = 8, 2


@T.prim_func(s_tir=True)
def avx2_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def avx2_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        # the activation pair as one int32, broadcast to the 8 lanes (vpbroadcastd)
        pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a16 = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            a16, T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")), dtype="int32x8")


def register() -> str:
    """Register the AVX2 intrinsic (idempotent); returns its name."""
    if TensorIntrin.get(AVX2_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_INTRIN, avx2_desc, avx2_impl)
    return AVX2_INTRIN
