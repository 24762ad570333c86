"""Vector helpers shared by the hand-written CPU kernels (TVM IRBuilder TIR)."""

from __future__ import annotations

from tvm.script.ir_builder import tirx as T

#: ``_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC``.
_RN_SAE = 8


def round_to_int32(y, lanes: int, avx512: bool = True):
    """``int32(rne(y))`` of a float32 value (or ``lanes``-wide vector) already inside the
    int32 range. With AVX-512 and 16 lanes: one ``vcvtps2dq`` with embedded
    round-to-nearest-even (``{rn-sae}``), which LLVM does not form from ``round`` + cast
    (``vrndscaleps`` + ``vcvttps2dq``: one more vector op); otherwise ``round`` then the
    cast (``vroundps`` / ``frintn``)."""
    if lanes != 16 or not avx512:
        return T.Cast("int32" if lanes == 1 else f"int32x{lanes}", T.round(y))
    return T.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.mask.cvtps2dq.512", y,
        T.broadcast(T.int32(0), 16), T.int16(-1), T.int32(_RN_SAE))
