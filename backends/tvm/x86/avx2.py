"""A bit-exact 16x4 u8 x s8 -> s32 dot-product intrinsic for AVX2 (no VNNI).

``vpmaddubsw`` (TVM's ``dot_16x4_avx512`` / the usual AVX2 trick) adds two u8 x s8 products in
int16 and saturates on full-range inputs. This one widens both operands to int16 first
(``vpmovsxbw`` / ``vpmovzxbw``), so ``vpmaddwd`` forms exact int32 pair sums; the two pair sums
of each output lane are then added with an even/odd shuffle. Same description as the VNNI
intrinsic (``C[16] += A[4] . B[16, 4]``), so the packed layout and every schedule that
tensorizes with VNNI tensorize with this one too.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from backends.tvm.x86.intrinsics import vnni_desc

AVX2_INTRIN = "ptq_dot_16x4_u8i8i32_avx2"


@T.prim_func(s_tir=True)
def avx2_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a16 = T.Cast("int16x16", T.reinterpret(T.broadcast(a_i32, 4), dtype="uint8x16"))
        p0 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")), a16, dtype="int32x8")
        p1 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([4, 0], dtype="int8x16")), a16, dtype="int32x8")
        p2 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([8, 0], dtype="int8x16")), a16, dtype="int32x8")
        p3 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([12, 0], dtype="int8x16")), a16, dtype="int32x8")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + (
            T.Shuffle([p0, p1], [0, 2, 4, 6, 8, 10, 12, 14])
            + T.Shuffle([p0, p1], [1, 3, 5, 7, 9, 11, 13, 15]))
        C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + (
            T.Shuffle([p2, p3], [0, 2, 4, 6, 8, 10, 12, 14])
            + T.Shuffle([p2, p3], [1, 3, 5, 7, 9, 11, 13, 15]))


def register() -> str:
    """Register the AVX2 intrinsic (idempotent); returns its name."""
    if TensorIntrin.get(AVX2_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_INTRIN, vnni_desc, avx2_impl)
    return AVX2_INTRIN
