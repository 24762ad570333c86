"""x86 strategies, one per dot-product instruction the target has (``registry.py`` picks):

* :data:`AVX512_VNNI` (``avx512vnni``): u8 activations x s8 weights in ``[O/16, K/4, 16, 4]``
  blocks, ``vpdpbusd`` on zmm (``vnni.py``), the register-tiled template (``template.py``):
  ``rows`` output rows x ``blocks`` weight blocks of int32 accumulators held in registers over
  the whole reduction, requantized per tile.
* :data:`AVX_VNNI` (``avxvnni`` without AVX-512 VNNI: Alder Lake, Zen 5 class): the same
  layout, ``vpdpbusd`` on ymm (8 lanes per call, two calls per 16-lane block).
* :data:`AVX2` (AVX2 without VNNI): activations widened to int16 once (in ``x_enc``) x s8
  weights in ``[O/16, K/2, 16, 2]`` blocks for the exact ``vpmaddwd`` intrinsic (``avx2.py``;
  ``vpmaddubsw`` saturates int16 and is not bit-exact on full-range u8 x s8), same template.
  Its ``avx2-pairwise`` variant takes the kernels whose activation range and weights prove
  ``vpmaddubsw`` exact (``avx2.pairs_fit_int16``; always for 7-bit activations,
  ``QSpec(reduce_range=True)``): u8 activations x the VNNI blocks, twice the MACs per
  instruction. 8-bit ``matmul`` s are packed per call and run on the template too.
* :data:`GENERIC` (x86 without AVX2): the VNNI layout, TVM's default lowering.

``depthwise.py``: 8-bit depthwise convs on AVX-512 VNNI (and AMX), ``vpdpbusd`` over four
kernel rows interleaved per output row (``Strategy.kernels["conv2d_depthwise"]``). Every x86
strategy takes the CPU row kernels (``cpu.row_kernels``: per-token quantize, softmax).

Tuned records (``ptqpasses_backends.tvm.tune``) win over the fixed template; the template seeds the
search.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

from ptqpasses_backends.tvm import cpu
from ptqpasses_backends.tvm.cpu.matmul import is_packed, schedule_matmul
from ptqpasses_backends.tvm.strategy import Choice, KernelFacts, Layout, Strategy, Variant
from ptqpasses_backends.tvm.x86 import avx2, depthwise, template, vnni

#: Output rows x weight blocks per register tile of the AVX2 template (16 int32 lanes per
#: block: 4 x 1 x 2 ymm = 8 accumulators of AVX2's 16 registers).
AVX2_ROWS, AVX2_BLOCKS = 4, 1
#: AVX-512 VNNI: at most ``VNNI_TILE`` zmm accumulators per tile, so a tile is under 1024 bytes:
#: TVM keeps a buffer that small on the stack (``alloca``), which LLVM promotes to registers;
#: a larger one becomes ``TVMBackendAllocWorkspace`` memory, and LLVM then stores the
#: accumulator after every ``vpdpbusd`` and reloads each broadcast (it cannot prove the
#: workspace does not alias the operands). Measured on one Zen 4 core (the same kernels,
#: interleaved): MiniLM / BERT linears 8 x 3 (24 accumulators, workspace) 64-87 GMAC/s,
#: 4 x 3 / 8 x 1 / 6 x 2 (stack) 169-227; MobileNetV2's 1x1 convs 7 x 4 60-119, 7 x 2 95-170;
#: ResNet-18's 3x3 convs all within 5% (200-217). Dense tiles are ``VNNI_DENSE_ROWS`` rows
#: (4 x 3: the fewest loads per ``vpdpbusd`` under the limit), conv tiles the output columns
#: ``_vnni_rows`` picks per width (7 x 2 on 7-multiples).
VNNI_DENSE_ROWS, VNNI_CONV_ROWS, VNNI_BLOCKS, VNNI_TILE = 4, 7, 4, 15
#: AVX-VNNI (16 ymm registers: 4 x 1 block of 2 ymm = 8 accumulators).
VNNI256_ROWS, VNNI256_BLOCKS = 4, 1


def _template_variant(name: str, layout: Layout, register, *,
                      rows: Union[int, Mapping[str, int]], blocks: int,
                      intrin_lanes=None, tile=None, summary: str) -> Variant:
    """A variant scheduled by the register-tiled template around ``register()``'s intrinsic
    (``rows``: one count, or one per kernel kind)."""
    args = dict(lanes=layout.lanes, depth=layout.depth, rows=rows, blocks=blocks,
                intrin_lanes=intrin_lanes, cache=True, fuse_out=True, tile=tile)

    def schedule(func, kind, _target):
        return template.schedule_packed(func, kind, register(), **args)

    def seed(sch, kind):
        template.apply(sch, kind, register(), **args)

    return Variant(name, layout, schedule=schedule, intrin=register, seed=seed,
                   summary=summary)


def _matmul_avx2(func, kind, target):
    """The plain matmul tile, or the dense template on the block form (``vpmaddwd`` on int16
    pairs of both operands, ``kernels/matmul.py::matmul_packed``)."""
    if not is_packed(func):
        return schedule_matmul(func)
    args = dict(lanes=16, depth=avx2.DEPTH, rows=AVX2_ROWS,
                intrin_lanes=avx2.LANES, cache=True, fuse_out=True)
    return template.schedule_matmul_packed(func, {**args, "intrin": avx2.register_wide()})


def _matmul_vnni(func, kind, target):
    """The dense template on the block form of 8-bit matmuls: ``vpdpwssd`` (int16 pairs of
    both centered operands, 32 multiply-adds per instruction), the dense register tiles."""
    if not is_packed(func):
        return schedule_matmul(func)
    args = dict(lanes=vnni.WIDE_LANES, depth=vnni.WIDE_DEPTH, rows=VNNI_DENSE_ROWS,
                blocks=VNNI_BLOCKS, tile=VNNI_TILE, cache=True, fuse_out=True)
    return template.schedule_matmul_packed(func, {**args, "intrin": vnni.register_wide()})


VNNI_LAYOUT = Layout("uint8", 16, 4)

_AVX2_MAIN = _template_variant(
    "", Layout("int16", 16, 2, width_block=AVX2_ROWS), avx2.register, rows=AVX2_ROWS,
    blocks=AVX2_BLOCKS, intrin_lanes=avx2.LANES,
    summary="exact vpmaddwd on int16-widened activations")

#: int16-activation dense / conv (the accuracy guard's int16 raises; int16 recipes) on the
#: VNNI and AMX strategies: AVX2's exact ``vpmaddwd`` template (``vpdpbusd`` and tiles take
#: 8-bit activations). Without it those kernels took the direct ``*_wide`` compute: all-MiniLM
#: with 30 int16 linears ran 198 ms instead of ~12 on one Emerald Rapids core.
INT16_VARIANT = dataclasses.replace(_AVX2_MAIN, name="int16")


def _vnni_rows(width: int) -> int:
    """Output columns per register tile of a conv ``width`` wide: the fewest padded columns,
    then the preferred tile (7 x 2 accumulators, then 5 x 3, 6 x 2, 8 x 1, 4 x 3)."""
    prefer = (7, 5, 6, 8, 4)
    return min(prefer, key=lambda r: (-(-width // r) * r, prefer.index(r)))


def _choose_vnni(strategy: Strategy, facts: KernelFacts) -> Choice:
    if facts.in_dtype == "int16":
        return Choice(INT16_VARIANT, "int16 activations: exact vpmaddwd (the int16 variant)")
    if facts.kind != "conv2d" or facts.width is None:
        return Choice(strategy.main, "")
    return Choice(strategy.main, "", width_block=_vnni_rows(facts.width))


AVX512_VNNI = Strategy(
    "x86-avx512-vnni", "x86",
    (_template_variant("", VNNI_LAYOUT, vnni.register,
                       rows={"dense": VNNI_DENSE_ROWS, "conv2d": VNNI_CONV_ROWS},
                       blocks=VNNI_BLOCKS, tile=VNNI_TILE,
                       summary=f"vpdpbusd zmm, register tiles of <= {VNNI_TILE} accumulators"),
     INT16_VARIANT),
    choose=_choose_vnni, schedules={**cpu.SCHEDULES, "matmul": _matmul_vnni},
    matmul_block=(vnni.WIDE_LANES, vnni.WIDE_DEPTH),
    kernels={**cpu.row_kernels(16, avx512=True), "conv2d_depthwise": depthwise.emit_if_fits},
    summary="AVX-512 VNNI: u8 x s8 vpdpbusd on zmm, register-tiled template")

AVX_VNNI = Strategy(
    "x86-avx-vnni", "x86",
    (_template_variant("", Layout("uint8", 16, 4, width_block=VNNI256_ROWS), vnni.register_256,
                       rows=VNNI256_ROWS, blocks=VNNI256_BLOCKS,
                       intrin_lanes=vnni.VNNI256_LANES,
                       summary=f"vpdpbusd ymm, {VNNI256_ROWS}x{VNNI256_BLOCKS * 16} tile"),),
    schedules=cpu.SCHEDULES, kernels=cpu.row_kernels(8),
    summary="AVX-VNNI: u8 x s8 vpdpbusd on ymm, register-tiled template")


_AVX2_PAIRWISE = dataclasses.replace(
    _template_variant(
        "avx2-pairwise", Layout("uint8", 16, 4, width_block=AVX2_ROWS), avx2.register_pairwise,
        rows=AVX2_ROWS, blocks=AVX2_BLOCKS, intrin_lanes=avx2.PAIRWISE_LANES,
        summary="vpmaddubsw + vpmaddwd where every product pair provably fits int16"),
    fits=avx2.pairs_fit_int16)


def _choose_avx2(strategy: Strategy, facts: KernelFacts) -> Choice:
    """The pairwise variant where the proof holds: activations shifted to start at 0
    (``x - lo``, ``lo`` the bottom of the range the graph guarantees), times each pair of
    packed weights, fit int16. Otherwise the exact main variant."""
    lo, hi = facts.x_range
    if facts.in_dtype == "int16":
        return Choice(strategy.main, "")  # (int16 activations: the main layout already)
    pw = _AVX2_PAIRWISE
    wp = facts.pack(pw.layout.lanes, pw.layout.depth, pw.layout.k_block)
    if hi - lo <= 255 and pw.fits(wp, hi - lo):
        return Choice(pw, f"activations in [{lo}, {hi}]: every pair of products fits int16",
                      shift=-lo)
    return Choice(strategy.main, f"activations in [{lo}, {hi}]: a pair of products can "
                  "overflow int16 (QSpec(reduce_range=True) activations always fit)")


AVX2 = Strategy(
    "x86-avx2", "x86", (_AVX2_MAIN, _AVX2_PAIRWISE), choose=_choose_avx2,
    schedules={**cpu.SCHEDULES, "matmul": _matmul_avx2},
    matmul_block=(_AVX2_MAIN.layout.lanes, _AVX2_MAIN.layout.depth),
    kernels=cpu.row_kernels(8),
    summary="AVX2: exact vpmaddwd on int16 activations (vpmaddubsw where proven exact)")

GENERIC = Strategy(
    "x86-generic", "x86", (Variant("", Layout("uint8", 16, 4), summary="default lowering"),),
    schedules=cpu.SCHEDULES, kernels=cpu.row_kernels(4),
    summary="x86 without AVX2: TVM's default lowering of the kernels")
