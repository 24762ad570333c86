"""What a target family contributes to emission: activation encoding, block shape, schedules."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tvm


@dataclasses.dataclass(frozen=True)
class Family:
    """Emission parameters of one target family.

    Attributes:
        name: ``x86``, ``aarch64`` or ``cuda``.
        act_dtype: Activation encoding the dot-product instruction wants.
        lanes: Output channels per weight block.
        depth: Reduction elements per weight block.
        width_block: Packed convs compute their output width rounded up to a multiple of this
            (the fixed schedule's register tile).
        schedule: ``(PrimFunc, kernel_kind, Target) -> PrimFunc`` applied to ptq kernels before
            lowering, or None to leave them to the default pipeline.
        variant: Name of this variant; kernels emitted with it carry it in their
            ``ptq.variant`` attribute ("" for a family's main variant).
        pairwise: A faster variant for the packed dense / conv kernels whose u8 x s8 product
            pairs provably fit int16 (x86 AVX2: ``vpmaddubsw``); the emitter checks the proof
            per kernel (``fits``) and uses this family's own layout otherwise.
        fits: ``(packed weights, largest encoded activation) -> bool``, the proof for
            ``pairwise`` (on the pairwise variant).
        packs_matmul: Emit 8-bit ``matmul`` s (activation x activation) with both operands
            centered to int16 and the right one packed per call in ``[N/lanes, K/depth, lanes,
            depth]`` blocks (``kernels/matmul.py::matmul_packed``; x86 AVX2's ``vpmaddwd``).
    """

    name: str
    act_dtype: str
    lanes: int
    depth: int
    width_block: int = 1
    schedule: Optional[Callable[[tvm.tirx.PrimFunc, str, tvm.target.Target],
                                tvm.tirx.PrimFunc]] = None
    variant: str = ""
    pairwise: Optional["Family"] = None
    fits: Optional[Callable[[object, int], bool]] = None
    packs_matmul: bool = False

    def of_kernel(self, func: tvm.tirx.PrimFunc) -> "Family":
        """The variant a ptq kernel was emitted with (its ``ptq.variant`` attribute)."""
        variant = str(func.attrs.get("ptq.variant", "")) if func.attrs else ""
        if variant and self.pairwise is not None and variant == self.pairwise.variant:
            return self.pairwise
        if variant and variant != self.variant:
            raise ValueError(f"kernel emitted for variant {variant!r}, which family "
                             f"{self.name!r} ({self.variant or 'main'}) does not have")
        return self


def get_family(name: str, target: Optional[tvm.target.Target] = None) -> Family:
    """The Family for ``x86`` / ``aarch64`` / ``cuda``; ``target`` picks among a family's
    variants (x86: the int16 AVX2 layout on AVX2 targets without VNNI)."""
    if name == "x86":
        from backends.tvm.x86 import family_for

        return family_for(target)
    if name == "aarch64":
        from backends.tvm.aarch64 import FAMILY
    elif name == "cuda":
        from backends.tvm.cuda import FAMILY
    else:
        raise ValueError(f"no emitter family {name!r}")
    return FAMILY
