"""What one target family contributes to a compiled model, as one object (TVM topi's idea of a
strategy per target): the weight layouts it packs, how it picks a kernel variant for a
dense / conv2d, the schedules of its kernels, its tuning space and template seed, and its
device facts.

Value types only. Each family folder (``x86/``, ``amx/``, ``aarch64/``, ``cuda/``) builds its
:class:`Strategy` objects from these; ``registry.py`` imports the folders and picks the one a
target gets. Nothing here imports a family folder, so there is no import circle.

A reader looking for "how is an int8 conv made fast on family F" reads F's folder: the
strategy object names the layout (``Variant.layout``), the fixed schedule
(``Variant.schedule``), the tuning intrinsic and seed, and the schedules of the other kernel
kinds (``Strategy.schedules``, mostly the LLVM-generic ones of ``cpu/``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tvm
from tvm import tirx

#: ``(kernel PrimFunc, kernel kind, target) -> scheduled PrimFunc``.
ScheduleFn = Callable[[tirx.PrimFunc, str, tvm.target.Target], tirx.PrimFunc]

#: Kernel kinds that multiply activations by packed int8 weights (what ``Variant`` covers).
PACKED_KINDS = ("dense", "conv2d")


class Device(enum.Enum):
    """Where a strategy's code runs."""
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True)
class Layout:
    """What emission bakes into a packed dense / conv2d kernel.

    Attributes:
        act_dtype: Activation encoding the dot-product instruction wants (``x_enc``).
        lanes: Output channels per packed weight block.
        depth: Reduction elements per packed weight block.
        width_block: Packed convs compute their output width rounded up to a multiple of this
            (the fixed schedule's register tile of output columns).
        k_block: The reduction (dense ``K``, conv input channels) is padded with zero
            weights to a multiple of this (AMX: 64 bytes, one tile row).
    """

    act_dtype: str
    lanes: int
    depth: int
    width_block: int = 1
    k_block: int = 1


@dataclasses.dataclass(frozen=True)
class KernelFacts:
    """What a strategy's ``choose`` may look at for one packed dense / conv2d node.

    Attributes:
        kind: ``dense`` or ``conv2d``.
        node: The fx node's name (for messages).
        in_dtype: The activation dtype (``int8`` / ``uint8`` / ``int16``).
        x_range: ``[lo, hi]`` the graph guarantees for the activations (zero point included).
        rows: Output rows of the GEMM (dense: the static product of the leading dims, or
            None when it holds the symbolic batch; conv: output pixels per image).
        cols: Output columns (output channels).
        depth: The reduction length (dense ``K``; conv ``C * R * S``).
        width: Conv output width (None for dense).
        channels: Conv input channels per group (None for dense).
        groups: Conv groups (1 for dense).
        pack: ``(lanes, depth, k_block) -> packed weights`` for a layout.
    """

    kind: str
    node: str
    in_dtype: str
    x_range: tuple[int, int]
    rows: Optional[int]
    cols: int
    depth: int
    width: Optional[int] = None
    channels: Optional[int] = None
    groups: int = 1
    pack: Optional[Callable[[int, int, int], np.ndarray]] = None


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way a strategy runs packed dense / conv2d kernels.

    Attributes:
        name: Stored in the kernel's ``ptq.variant`` attribute ("" for a strategy's main one).
        layout: The packing and activation encoding.
        schedule: The fixed schedule of a packed kernel (None: TVM's default lowering).
        intrin: Registers and returns the tensor intrinsic the tuning space tiles around
            (None: this variant is not tuned).
        seed: Applies the fixed schedule to a traced ``s_tir.Schedule`` of ``main`` (the
            tuning seed); ``(sch, kind) -> None``.
        fits: The proof ``choose`` checks before taking this variant (x86 pairwise:
            ``(packed weights, largest encoded activation) -> bool``).
        kernels: Kernel builders replacing the TE computes of ``kernels/``, by kind
            (AMX: hand-written TIR): ``(em, x, weight, corr, mult, *, variant, **params)
            -> relax value`` with the unpacked int8 weights (the builder packs them for its
            plan) and the numpy ``corr`` / ``mult`` of the TE computes. Kind
            ``dense_per_token``: the dense of ``ptq.linear_dynamic`` with its per-row
            epilogue, given ``per_token=(params, colsum)`` and the weight scales as ``mult``.
        summary: One line for reports.
    """

    name: str
    layout: Layout
    schedule: Optional[ScheduleFn] = None
    intrin: Optional[Callable[[], str]] = None
    seed: Optional[Callable[[Any, str], None]] = None
    fits: Optional[Callable[[np.ndarray, int], bool]] = None
    kernels: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    summary: str = ""


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``Strategy.choose`` decided for one kernel: the variant, the activation shift
    (None: the layout's encoding of the input dtype), why (``compiled.meta['variants']``),
    and the conv output width multiple (None: the layout's ``width_block``)."""

    variant: Variant
    why: str
    shift: Optional[int] = None
    width_block: Optional[int] = None


def _choose_main(strategy: "Strategy", facts: KernelFacts) -> Choice:
    return Choice(strategy.main, "")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Everything one target family contributes.

    Attributes:
        name: ``x86-avx2``, ``x86-avx512-vnni``, ``x86-amx``, ``aarch64-dotprod``, ...
        arch: The target architecture (``x86``, ``aarch64``, ``cuda``): triple and device.
        variants: The strategy's dense / conv2d variants; the first is the main one.
        choose: ``(strategy, KernelFacts) -> Choice`` for each packed kernel (default: the
            main variant).
        schedules: Fixed schedules of the other ptq kernel kinds (``matmul``,
            ``conv2d_depthwise``, ``max_pool2d``, ``dense_wide``, ``conv2d_wide``).
        matmul_block: ``(lanes, depth)``: emit 8-bit ``matmul`` s in block form, both operands
            centered to int16 and the right one packed per call in blocks of this shape
            (``kernels/matmul.py::matmul_packed``; x86: ``vpmaddwd`` / ``vpdpwssd`` pairs);
            None: the plain compute.
        kernels: Hand-written kernels that replace a TE compute (and its schedule) where
            they apply, by name; each returns None where a shape does not suit it:
            ``token_quantize``: ``(em, x) -> (q, p)``, the per-token codes and row
            parameters of a float32 ``[..., K]`` tensor (``linear_dynamic``'s input) in
            one kernel (CPU: ``cpu/token.py``; else the TE pair of ``kernels/token.py``);
            ``softmax``: ``(em, x) -> value``, a float32 softmax over the last axis that
            can store the quantize after it (CPU: ``cpu/softmax.py``);
            ``matmul``: ``(em, a, b, *, a_zp, b_zp, multiplier, out_zp, qmin, qmax,
            out_dtype) -> (value, variant, why)`` for an 8-bit ``ptq.matmul`` (AMX tiles);
            ``conv2d_depthwise``: ``(em, x, w, corr, mult, *, kernel, stride, padding,
            dilation, x_zp, out_zp, qmin, qmax, out_dtype) -> value`` for an 8-bit depthwise
            conv on an NHWC input, NHWC out (AVX-512 VNNI: ``x86/depthwise.py``).
        schedule_glue: Schedule the non-ptq PrimFuncs with ``cpu/glue.py``.
        nhwc: Keep 4-D activations channel-last between the integer ops that take them
            (``ptq_ops.LAYOUTS``): convs read and write NHWC, no transpose around each.
        device: Where the code runs.
        cross_compiler: The C compiler that links a ``.so`` for this architecture on another
            machine (None: the host's own, or no ``.so``).
        summary: One line for reports.
    """

    name: str
    arch: str
    variants: tuple[Variant, ...]
    choose: Callable[["Strategy", KernelFacts], Choice] = _choose_main
    schedules: Mapping[str, ScheduleFn] = dataclasses.field(default_factory=dict)
    matmul_block: Optional[tuple[int, int]] = None
    kernels: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    schedule_glue: bool = True
    nhwc: bool = True
    device: Device = Device.CPU
    cross_compiler: Optional[str] = None
    summary: str = ""

    @property
    def main(self) -> Variant:
        return self.variants[0]

    def variant(self, name: str) -> Variant:
        """The variant called ``name`` ("" is the main one)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"kernel emitted for variant {name!r}, which strategy {self.name!r} "
                         f"does not have (variants: {[v.name or 'main' for v in self.variants]})")

    def of_kernel(self, func: tirx.PrimFunc) -> Variant:
        """The variant a ptq kernel was emitted with (its ``ptq.variant`` attribute)."""
        name = str(func.attrs.get("ptq.variant", "")) if func.attrs else ""
        return self.variant(name)

    def schedule_for(self, func: tirx.PrimFunc, kind: str) -> Optional[ScheduleFn]:
        """The fixed schedule of a ptq kernel of ``kind`` (None: default lowering)."""
        if kind in PACKED_KINDS:
            return self.of_kernel(func).schedule
        return self.schedules.get(kind)

    def unscheduled(self) -> "Strategy":
        """This strategy with no fixed schedules (``compile(schedule=False)``): same layouts
        and kernels, TVM's default lowering."""
        return dataclasses.replace(
            self, variants=tuple(dataclasses.replace(v, schedule=None) for v in self.variants),
            schedules={}, schedule_glue=False)

    def kernel(self, name: str) -> Optional[Callable]:
        """The hand-written kernel builder ``name`` of ``kernels`` (None: not this family)."""
        return self.kernels.get(name)

    def layouts(self) -> tuple:
        """What emission bakes in (a module emitted for one strategy compiles for another only
        when these agree)."""
        return (self.arch, tuple(sorted((v.name, v.layout) for v in self.variants)),
                self.matmul_block)
