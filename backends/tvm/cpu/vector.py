"""Vector helpers shared by the hand-written CPU kernels (TVM IRBuilder TIR): rounding to
int32, and the reference's requantize of an int32 accumulator (``Requant``: the AMX, matmul
and VNNI depthwise epilogues)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ptqpasses_backends.tvm.requant import f32

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


@dataclass(frozen=True)
class Requant:
    """``clamp(rne(float32(acc) * mult) + out_zp, qmin, qmax)`` cast to ``out_dtype``
    (``float32(acc) * mult`` for a float32 output: a float-output op).

    Emitted as ``rne(clamp(float32(acc) * mult, qmin - out_zp, qmax - out_zp)) + out_zp``,
    which is equal for every acc (round is monotone and fixes the integer bounds; adding
    out_zp in float32 is exact inside the clamp range) and is one float op shorter.
    """

    out_zp: int
    qmin: int
    qmax: int
    out_dtype: str

    def value(self, acc, mult, lanes: int = 1):
        if self.out_dtype == "float32":  # a float-output op: the dequantized accumulator
            return T.Cast(vec("float32", lanes), acc) * mult
        return T.Cast(vec(self.out_dtype, lanes), self.int_value(acc, mult, lanes))

    def int_value(self, acc, mult, lanes: int = 1):
        """The requantized value as int32 (before the cast to ``out_dtype``)."""
        y = T.Cast(vec("float32", lanes), acc) * mult
        y = T.min(T.max(y, const(self.qmin - self.out_zp, "float32", lanes)),
                  const(self.qmax - self.out_zp, "float32", lanes))
        q = round_to_int32(y, lanes)
        if self.out_zp:
            q = q + const(self.out_zp, "int32", lanes)
        return q

    def apply(self, acc, mult, lanes: int, index):
        """The epilogue's value for output ``index`` (unused here; see ``ResidualAdd``)."""
        del index
        return self.value(acc, mult, lanes)


def vec(dtype: str, lanes: int) -> str:
    """``dtype`` with ``lanes`` lanes (the scalar type for 1)."""
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def const(v, dtype: str, lanes: int):
    """The constant ``v`` as ``dtype``, broadcast to ``lanes``."""
    c = f32(v) if dtype == "float32" else tirx.const(v, dtype)
    return c if lanes == 1 else T.broadcast(c, lanes)
