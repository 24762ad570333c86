"""The 16x4 u8 x s8 -> s32 VNNI tensor intrinsic, fixed for the LLVM 22 bundled with TVM 0.27.

TVM registers ``dot_16x4_vnni`` with ``<16 x i32>`` operands for ``llvm.x86.avx512.vpdpbusd.512``;
LLVM 22 types them as ``<64 x i8>`` and the build fails verification (``Call parameter type
does not match function signature!``). This implementation passes the activation broadcast as
``uint8x64`` and the weight block as ``int8x64``.

It is registered under the project's own name (:data:`VNNI_INTRIN`) for the fixed schedule,
because importing ``tvm.s_tir.tensor_intrin`` costs ~50 s here (its CUDA intrinsics alone take
38 s). :func:`override_tvm_vnni` replaces TVM's ``dot_16x4_vnni`` (``override=True``) for
MetaSchedule, whose VNNI rules look that name up; it must run after TVM's registry is imported,
or TVM's own registration would later fail as a duplicate.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ptqpasses_backends.tvm.cpu.dot_intrin import dot_desc, register_once

VNNI_INTRIN = "ptq_dot_16x4_u8i8i32_vnni"
TVM_VNNI_INTRIN = "dot_16x4_vnni"


def _vpdpbusd_impl(lanes: int):
    """``lanes`` x 4 u8 x s8 -> s32 with ``vpdpbusd`` on a ``32 * lanes``-bit register (16
    lanes: zmm, AVX-512 VNNI; 8 lanes: ymm, which LLVM encodes as AVX-VNNI's ``{vex}
    vpdpbusd`` on CPUs without AVX512VL)."""
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # no named temporaries: TVMScript makes each a local buffer, which a kernel's
            # parallel loop turns into a TVMBackendAllocWorkspace call per tile
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                          lanes), dtype=f"uint8x{4 * lanes}"),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"),
                dtype=f"int32x{lanes}",
            )

    return impl


vnni_desc = dot_desc(16, 4, "uint8")
vnni_impl = _vpdpbusd_impl(16)

#: The 256-bit form (AVX-VNNI: Alder Lake, Zen 5 class; or AVX-512 VNNI with AVX512VL).
VNNI256_INTRIN = "ptq_dot_8x4_u8i8i32_vnni256"
VNNI256_LANES = 8
vnni256_desc = dot_desc(VNNI256_LANES, 4, "uint8")
vnni256_impl = _vpdpbusd_impl(VNNI256_LANES)


#: 16 x 2 int16 x int16 -> int32 with ``vpdpwssd`` (AVX-512 VNNI): ``matmul`` of two
#: activations, both centered to int16 and the right one packed per call
#: (``kernels/matmul.py::matmul_packed``); |centered| <= 255, so every product and pair sum is
#: exact in int32.
WIDE_INTRIN = "ptq_dot_16x2_i16i16i32_vpdpwssd"
WIDE_LANES, WIDE_DEPTH = 16, 2
wide_desc = dot_desc(WIDE_LANES, WIDE_DEPTH, "int16", "int16")


@T.prim_func(s_tir=True)
def wide_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int16", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        # the activation pair as one int32, broadcast to the 16 lanes; no named temporaries
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 16),
                          dtype="int16x32"),
            B.vload([0, 0], dtype="int16x32"),
            dtype="int32x16",
        )


def register_wide() -> str:
    """Register the 16x2 int16 ``vpdpwssd`` intrinsic (idempotent); returns its name."""
    return register_once(WIDE_INTRIN, wide_desc, wide_impl)


def register() -> str:
    """Register the fixed intrinsic under the project name (idempotent); returns the name."""
    return register_once(VNNI_INTRIN, vnni_desc, vnni_impl)


def register_256() -> str:
    """Register the 8x4 ymm ``vpdpbusd`` intrinsic (idempotent); returns its name."""
    return register_once(VNNI256_INTRIN, vnni256_desc, vnni256_impl)


def override_tvm_vnni() -> str:
    """Replace TVM's broken ``dot_16x4_vnni`` with the fixed one.

    TVM's x86 intrinsics must be registered first (or a later import of its registry would
    fail on the duplicate name). Its registry package imports every family's intrinsics
    (CUDA's alone take ~30 s to parse here), so where that package is not imported yet, only
    its x86 module is: the package's ``__init__`` is skipped by a stand-in module that lives
    only during the import. A later ``import tvm.s_tir.tensor_intrin`` runs the real
    ``__init__``, which finds the x86 module already imported and does not register it again.
    """
    import importlib
    import importlib.util
    import sys
    import types

    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        importlib.import_module(package + ".x86")
    else:
        spec = importlib.util.find_spec(package)
        stand_in = types.ModuleType(package)
        stand_in.__path__ = list(spec.submodule_search_locations)
        stand_in.__package__ = package
        sys.modules[package] = stand_in
        try:
            importlib.import_module(package + ".x86")
        finally:
            del sys.modules[package]
    TensorIntrin.register(TVM_VNNI_INTRIN, vnni_desc, vnni_impl, override=True)
    return TVM_VNNI_INTRIN
