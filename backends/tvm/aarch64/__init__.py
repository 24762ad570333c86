"""aarch64: s8 activations x s8 weights in 4x4 blocks (``sdot``, FEAT_DotProd).

uint8 activations are shifted by -128 into int8 (the shift is folded into the zero-point
correction). Targets without ``dotprod`` keep the default lowering. i8mm targets also use
``sdot`` here: TVM 0.27 ships no ``usdot``/``smmla`` tensor intrinsic.
"""

from __future__ import annotations

from backends.tvm.dot_schedule import tensorize_acc
from backends.tvm.family import Family
from backends.tvm.aarch64 import intrinsics
from backends.tvm.targets import has_feature


def _schedule(func, kind, target):
    if not has_feature(target, "dotprod"):
        return func
    return tensorize_acc(func, kind, intrinsics.register(), 4, 4)


FAMILY = Family("aarch64", act_dtype="int8", lanes=4, depth=4, schedule=_schedule)
