"""x86: two weight layouts, chosen by the target's dot-product instruction.

* :data:`FAMILY` (targets with ``avx512vnni``, and x86 targets without AVX2): u8 activations x
  s8 weights in 16x4 blocks for ``vpdpbusd``, tensorized by ``dot_schedule.tensorize_acc``.
* :data:`AVX2_FAMILY` (AVX2 targets without VNNI): activations widened to int16 once (in
  ``x_enc``) x s8 weights in ``[O/16, K/2, 16, 2]`` blocks for the exact ``vpmaddwd``
  intrinsic (``avx2.py``; ``vpmaddubsw`` saturates int16 and is not bit-exact on full-range
  u8 x s8), scheduled by the hand-written register-tiled template (``template.py``).
  Its :data:`PAIRWISE_FAMILY` variant takes the kernels whose activation range and weights
  prove ``vpmaddubsw`` exact (``avx2.pairs_fit_int16``; always for 7-bit activations,
  ``QSpec(reduce_range=True)``): u8 activations x the VNNI ``[O/16, K/4, 16, 4]`` blocks,
  twice the MACs per instruction, same template.

Tuned records (``backends.tvm.tune``) win over both fixed schedules.
"""

from __future__ import annotations

from typing import Optional

import tvm

from backends.tvm.dot_schedule import tensorize_acc
from backends.tvm.family import Family
from backends.tvm.targets import has_feature
from backends.tvm.x86 import avx2, intrinsics, template


def _schedule_vnni(func, kind, target):
    if has_feature(target, "avx512vnni"):
        return tensorize_acc(func, kind, intrinsics.register(), 16, 4)
    return func


def _schedule_avx2(func, kind, target):
    args = template_args(target)
    if args is None or args["intrin"] != avx2.AVX2_INTRIN:
        return func
    return template.schedule_packed(func, kind, **args)


def _schedule_pairwise(func, kind, target):
    if not uses_avx2_layout(target):
        return func
    return template.schedule_packed(func, kind, **template_args(target, PAIRWISE_FAMILY.variant))


#: Output rows per register tile of the AVX2 template (rows x 16 int32 accumulators).
AVX2_ROWS = 4

FAMILY = Family("x86", act_dtype="uint8", lanes=16, depth=4, schedule=_schedule_vnni)
PAIRWISE_FAMILY = Family("x86", act_dtype="uint8", lanes=16, depth=4, width_block=AVX2_ROWS,
                         schedule=_schedule_pairwise, variant="avx2-pairwise",
                         fits=avx2.pairs_fit_int16)
AVX2_FAMILY = Family("x86", act_dtype="int16", lanes=16, depth=2, width_block=AVX2_ROWS,
                     schedule=_schedule_avx2, pairwise=PAIRWISE_FAMILY, packs_matmul=True)


def uses_avx2_layout(target: Optional[tvm.target.Target]) -> bool:
    """Whether ``target`` gets :data:`AVX2_FAMILY` (AVX2 without AVX-512 VNNI)."""
    return (target is not None and has_feature(target, "avx2")
            and not has_feature(target, "avx512vnni"))


def family_for(target: Optional[tvm.target.Target]) -> Family:
    """The x86 family variant of ``target`` (:data:`FAMILY` when no target is given)."""
    return AVX2_FAMILY if uses_avx2_layout(target) else FAMILY


def template_args(target: tvm.target.Target, variant: str = "") -> Optional[dict]:
    """Keyword arguments of ``template.apply`` (intrinsic, block shape, tiling) for the
    family of ``target`` (and the kernel's ``ptq.variant``), or None where no dot-product
    intrinsic applies."""
    if has_feature(target, "avx512vnni"):
        return dict(intrin=intrinsics.register(), lanes=16, depth=4, rows=1)
    if variant == PAIRWISE_FAMILY.variant:
        if not uses_avx2_layout(target):
            return None
        return dict(intrin=avx2.register_pairwise(), lanes=PAIRWISE_FAMILY.lanes,
                    depth=PAIRWISE_FAMILY.depth, rows=AVX2_ROWS,
                    intrin_lanes=avx2.PAIRWISE_LANES, cache=True, fuse_out=True)
    if uses_avx2_layout(target):
        return dict(intrin=avx2.register(), lanes=AVX2_FAMILY.lanes, depth=AVX2_FAMILY.depth,
                    rows=AVX2_ROWS, intrin_lanes=avx2.LANES, cache=True, fuse_out=True)
    return None
