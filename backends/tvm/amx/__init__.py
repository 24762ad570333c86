"""x86 AMX (Sapphire Rapids and later: ``amx-tile``, ``amx-int8``): int8 dense / conv2d on
``tdpbusd`` tiles, the AVX-512 VNNI template where a shape is too small for tiles.

* Kernels (``kernels.py``): hand-written TIR (TVM's IRBuilder), not a TE compute plus a
  schedule: the accumulators must stay in tile registers for the whole reduction, which a
  tensorized TE block cannot express. Each kernel re-encodes its activations (u8, ``+128``
  for int8 inputs) into a tile-ordered workspace, runs a blocked GEMM of ``tm x tn``
  accumulator tiles (16 x 16 int32 each) over 64-deep steps (A: 16 rows x 64 u8, B: 64 k x
  16 channels of the packed weights, the VNNI 16x4 block order), and requantizes each block
  from a small int32 scratch with the reference formula. Convs are an implicit GEMM on the
  padded NHWC image (the tile loads read 16 output pixels in place at the conv's stride),
  ``(s, c)`` folded into 64-byte steps where channels are few (the RGB stem), or an im2col
  gather for 1x1 convs. The outer block loop is TVM's parallel loop; every pool task loads
  the tile configuration itself.
* Weights: packed at compile time for the kernel's plan (``kernels.pack_conv_amx``).
* The OS permission: Linux refuses tile data until the process asks
  (``kernels.request_amx_permission``); ``CompiledModule`` asks once, before the first run,
  and a refusal is a clear error.
* ``choose``: AMX where the GEMM fills tiles; the VNNI template (this strategy's main
  variant) where it does not (see ``_choose``).
* Not tuned: the AMX kernels have no tensor intrinsic for MetaSchedule's tiling; their VNNI
  fallbacks are tuned like ``x86-avx512-vnni``'s.
"""

from __future__ import annotations

import dataclasses

from ptqpasses_backends.tvm import x86
from ptqpasses_backends.tvm.amx import emit, kernels
from ptqpasses_backends.tvm.strategy import Choice, KernelFacts, Layout, Strategy, Variant

#: Below these the VNNI template is chosen. Measured on one Emerald Rapids core (dense K = N =
#: 768, kernel alone, us): rows 1: AMX 7.6 / VNNI ~6.8; 2: 8.1 / ~7.4; 4: 8.0 / 10.0;
#: 8: 9.7 / 16.8; 16: 11.6 / 39 (K = 512, N = 1000 alike): the tiles win from 4 rows.
MIN_ROWS = 4
MIN_COLS = 16
#: No floor on the reduction: tiles padded to 64 deep still won at every depth measured
#: (one Emerald Rapids core, whole one-conv models timed interleaved, AMX / VNNI time:
#: 1x1 convs 56x56 -> 64 with C 3, 4, 8, 16, 24, 32, 48: 0.79, 0.80, 0.78, 0.69, 0.76,
#: 0.74, 0.74; 16 -> 16: 0.63; 3x3 C 8: 0.74; the 3x3 RGB stem at 112: 1.00), and MobileNetV2
#: b1, whose expand convs reduce over 16-32 channels, ran 3.76 ms vs 4.38 with a 64 floor.
MIN_DEPTH = 1

AMX_VARIANT = Variant(
    "amx", Layout("uint8", 16, 4, k_block=kernels.TILE_K),
    kernels={"dense": emit.emit_dense, "conv2d": emit.emit_conv2d,
             "dense_per_token": emit.emit_dense},
    summary="tdpbusd 16x16x64 tiles, 2x2 accumulator blocks, hand-written TIR")


def _choose(strategy: Strategy, facts: KernelFacts) -> Choice:
    """AMX for a GEMM with at least a tile of rows (pixels or tokens), a tile of output
    channels and a 64-deep reduction; grouped convs and smaller shapes take the VNNI
    template (whose choice, e.g. the conv register tile, applies then)."""
    small = []
    if facts.groups != 1:
        small.append(f"{facts.groups} groups")
    if facts.rows is not None and facts.rows < MIN_ROWS:
        small.append(f"{facts.rows} rows < {MIN_ROWS}")
    if facts.cols < MIN_COLS:
        small.append(f"{facts.cols} output channels < {MIN_COLS}")
    if facts.depth < MIN_DEPTH:
        small.append(f"reduction {facts.depth} < {MIN_DEPTH}")
    if facts.in_dtype not in ("int8", "uint8"):
        small.append(f"{facts.in_dtype} activations")
    if small:
        vnni = x86.AVX512_VNNI.choose(strategy, facts)
        return dataclasses.replace(vnni, why="VNNI template: " + ", ".join(small))
    return Choice(AMX_VARIANT, f"AMX tiles: {facts.rows or 'batch x'} rows, {facts.cols} "
                  f"channels, reduction {facts.depth}")


AMX = Strategy(
    "x86-amx", "x86", (x86.AVX512_VNNI.main, AMX_VARIANT, x86.INT16_VARIANT), choose=_choose,
    schedules=x86.AVX512_VNNI.schedules, matmul_block=x86.AVX512_VNNI.matmul_block,
    kernels={**x86.AVX512_VNNI.kernels, "matmul": emit.emit_matmul},
    summary="AMX: u8 x s8 tdpbusd tiles (hand-written TIR), AVX-512 VNNI template for small "
            "shapes")


def needs_permission(meta: dict) -> bool:
    """Whether a compiled module runs AMX kernels (``CompiledModule`` asks the OS first)."""
    return any(v[0] == AMX_VARIANT.name for v in meta.get("variants", {}).values())
