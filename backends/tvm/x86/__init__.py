"""x86: u8 activations x s8 weights in 16x4 blocks (AVX-512 VNNI ``vpdpbusd``).

Every x86 target uses the VNNI packing so one weight layout serves all of them. Targets with
``avx512vnni`` get the tensorized VNNI schedule; AVX2 targets without VNNI get the hand-written
template (``template.py``) tensorized with the exact AVX2 intrinsic (``avx2.py``: int16
widening + ``vpmaddwd``; ``vpmaddubsw`` saturates int16 and is not bit-exact on full-range
u8 x s8). Others keep the default lowering. Tuned records (``backends.tvm.tune``) win over both.
"""

from __future__ import annotations

from backends.tvm.dot_schedule import tensorize_acc
from backends.tvm.family import Family
from backends.tvm.targets import has_feature
from backends.tvm.x86 import avx2, intrinsics, template


def _schedule(func, kind, target):
    if has_feature(target, "avx512vnni"):
        return tensorize_acc(func, kind, intrinsics.register(), 16, 4)
    if has_feature(target, "avx2"):
        return template.schedule_packed(func, kind, avx2.register(), 16, 4, rows=4)
    return func


FAMILY = Family("x86", act_dtype="uint8", lanes=16, depth=4, schedule=_schedule)
