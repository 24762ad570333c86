"""4x4 s8 x s8 -> s32 ``sdot`` tensor intrinsic (FEAT_DotProd), checked under LLVM 22.

Same shape as TVM's ``dot_4x4_i8i8s32_sdot``; defined here so the fixed schedule does not have
to import ``tvm.s_tir.tensor_intrin`` (~50 s). LLVM 22 declares
``llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)``, which is what this
passes (unlike the x86 VNNI intrinsic, TVM's operand types were already right).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ptqpasses_backends.tvm.cpu.dot_intrin import dot_desc, register_once

SDOT_INTRIN = "ptq_dot_4x4_i8i8s32_sdot"


sdot_desc = dot_desc(4, 4, "int8")


@T.prim_func(s_tir=True)
def sdot_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # no named temporaries: TVMScript makes each a local buffer, which a kernel's parallel
        # loop turns into a TVMBackendAllocWorkspace call per tile
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                          dtype="int8x16"),
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


def register() -> str:
    """Register the intrinsic (idempotent); returns its name."""
    return register_once(SDOT_INTRIN, sdot_desc, sdot_impl)
