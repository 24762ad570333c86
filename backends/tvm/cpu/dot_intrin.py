"""The semantics every dot-product tensor intrinsic shares: ``C[i] += sum_k A[k] * B[i, k]``.

One description per shape (``lanes`` output channels, ``depth`` reduction elements, activation
dtype ``a_dtype``, int8 weights, int32 accumulators) serves the VNNI (16x4 u8), AVX2 (8x2
int16; 8x4 u8 pairwise) and sdot (4x4 s8) intrinsics: tensorization matches a kernel's
``acc`` block against it, and each family's implementation says how its instruction computes
it.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def register_once(name: str, desc: tirx.PrimFunc, impl: tirx.PrimFunc) -> str:
    """Register a tensor intrinsic under ``name`` unless it is registered; returns ``name``."""
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, desc, impl)
    return name


def dot_desc(lanes: int, depth: int, a_dtype: str, b_dtype: str = "int8") -> tirx.PrimFunc:
    """The description PrimFunc of a ``lanes x depth`` dot product on ``a_dtype``
    activations and ``b_dtype`` blocks (int8 weights; int16 for the AVX2 ``matmul`` of two
    activations, ``x86/avx2.py::wide_impl``)."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((depth,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, depth), b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc
