"""x86: u8 activations x s8 weights in 16x4 blocks (AVX-512 VNNI ``vpdpbusd``).

Every x86 target uses the VNNI packing so one weight layout serves all of them; only targets
with ``avx512vnni`` get the tensorized schedule, the others keep the default lowering (the
non-VNNI ``vpmaddubsw`` path saturates int16 and is not bit-exact on full-range u8 x s8).
"""

from __future__ import annotations

from backends.tvm.dot_schedule import tensorize_acc
from backends.tvm.family import Family
from backends.tvm.targets import has_feature
from backends.tvm.x86 import intrinsics


def _schedule(func, kind, target):
    if not has_feature(target, "avx512vnni"):
        return func
    return tensorize_acc(func, kind, intrinsics.register(), 16, 4)


FAMILY = Family("x86", act_dtype="uint8", lanes=16, depth=4, schedule=_schedule)
