"""aarch64 strategies: s8 activations x s8 weights in 4x4 blocks (``sdot``, FEAT_DotProd).

uint8 activations are shifted by -128 into int8 (the shift is folded into the zero-point
correction). :data:`NEON` (no ``dotprod``) keeps TVM's default lowering of the packed
kernels. i8mm targets also use ``sdot`` here: TVM 0.27 ships no ``usdot``/``smmla`` tensor
intrinsic. Built on an x86 machine, modules are cross-compiled: ``.tar`` without, ``.so``
with the ``aarch64-linux-gnu-gcc`` cross compiler.
"""

from __future__ import annotations

from ptqpasses_backends.tvm import cpu
from ptqpasses_backends.tvm.aarch64 import sdot
from ptqpasses_backends.tvm.cpu import dot
from ptqpasses_backends.tvm.strategy import Layout, Strategy, Variant

LAYOUT = Layout("int8", 4, 4)

#: The C compiler that links aarch64 shared libraries on another machine (Debian:
#: ``gcc-aarch64-linux-gnu``).
CROSS_COMPILER = "aarch64-linux-gnu-gcc"


def _schedule(func, kind, _target):
    return dot.tensorize_acc(func, kind, sdot.register(), LAYOUT.lanes, LAYOUT.depth)


def _seed(sch, kind):
    dot.apply(sch, kind, sdot.register(), LAYOUT.lanes, LAYOUT.depth)


DOTPROD = Strategy(
    "aarch64-dotprod", "aarch64",
    (Variant("", LAYOUT, schedule=_schedule, intrin=sdot.register, seed=_seed,
             summary="sdot 4x4, tensorized"),),
    schedules=cpu.SCHEDULES, cross_compiler=CROSS_COMPILER,
    kernels=cpu.row_kernels(4),
    summary="aarch64 dot product: s8 x s8 sdot, tensorized")

NEON = Strategy(
    "aarch64-neon", "aarch64", (Variant("", LAYOUT, summary="default lowering"),),
    schedules=cpu.SCHEDULES, cross_compiler=CROSS_COMPILER,
    kernels=cpu.row_kernels(4),
    summary="aarch64 without dotprod: TVM's default lowering of the kernels")
