"""CPU schedules of ``ptq.matmul`` (``kernels/matmul.py``): a plain register tile for every LLVM
target, and the dense template for the packed form that x86 AVX2 emits for 8-bit operands.

Both operands are activations, so there is no weight block packed ahead of time. The plain
schedule (``schedule_matmul``) only tiles, vectorizes and parallelizes the TE compute, with no
intrinsic, so x86 and aarch64 share it. On x86 AVX2 (``Strategy.matmul_block``) 8-bit matmuls
are emitted in block form instead (``b`` packed per call, both operands centered to int16), and
``x86/template.py::schedule_matmul_packed`` runs the dense template on ``vpmaddwd`` over them
(16 multiply-adds per instruction instead of 8 multiplies plus 8 adds). Measured on a Zen 3, one
thread, MiniLM's 12 attention matmuls: 17 ms unscheduled, 3.6 ms plain, 1.7 ms packed.

Plain schedule:

The reduction ``acc [..., M, N]`` is tiled as ``[batch, M / rows, N / cols] x K x [rows x
cols]``: for each ``k`` one row of ``cols`` centered ``b`` values (a vector) is multiplied by
``rows`` broadcast ``a`` values and added to a ``rows x cols`` accumulator tile. The tile lives
in a buffer of its own (``cache_write``) that LLVM keeps in registers for the whole reduction
(4 x 16 int32: eight AVX2 registers), and the requantize (``out``) runs straight from it, once
per tile. The batch and tile loops are fused into one parallel loop (TVM's thread pool).

Tile sizes fall back to divisors: ``rows`` is the largest divisor of ``M`` up to 4 and ``cols``
the largest power-of-two divisor of ``N`` up to 16 (else the largest divisor up to 16); a
symbolic ``M`` / ``N`` (dynamic batch of a 2-D operand) gets a tile side of 1. The arithmetic
(dtypes, products, the order of the sum over ``k``) is the compute's own, so results are
bit-exact for every operand dtype; ``acc_dtype="int64"`` kernels (int16 operands) get the same
tiling, with 64-bit lanes.
"""

from __future__ import annotations

from tvm import s_tir, tirx

#: Accumulator tile: output rows x output columns (int32 lanes; 4 x 16 fits AVX2's registers).
ROWS, COLS = 4, 16


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _rows(m: int | None, cap: int) -> int:
    if m is None or m < 1:
        return 1
    return max(d for d in range(1, min(cap, m) + 1) if m % d == 0)


def _cols(n: int | None, cap: int) -> int:
    if n is None or n < 1:
        return 1
    p = cap
    while p > 1 and n % p:
        p //= 2
    if p >= 4 or n < 4:
        return p
    return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)


def schedule_matmul(func: tirx.PrimFunc, rows: int = ROWS, cols: int = COLS) -> tirx.PrimFunc:
    """Tile, vectorize and parallelize the ``acc`` / ``out`` blocks of a ``matmul`` kernel.

    Args:
        rows: Largest number of output rows per tile (of ``a``'s ``M``).
        cols: Largest number of output columns per tile (of ``b``'s ``N``; the vector).
    """
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    *batch, i, j, k = sch.get_loops(acc)
    rows = _rows(_static(sch.get(i).extent), rows)
    cols = _cols(_static(sch.get(j).extent), cols)
    i_out, i_in = sch.split(i, [None, rows])
    j_out, j_in = sch.split(j, [None, cols])
    tiles = [*batch, i_out, j_out]
    sch.reorder(*tiles, k, i_in, j_in)
    # the rows x cols accumulators in a buffer of their own, requantized once per tile
    wb = sch.cache_write(acc, 0, "global")
    sch.compute_inline(wb)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, j_out)
    sch.parallel(sch.fuse(*tiles) if len(tiles) > 1 else tiles[0])
    sch.unroll(i_in)
    if cols > 1:
        sch.vectorize(j_in)  # before decompose_reduction: the init inherits it
    sch.decompose_reduction(acc, k)
    tile = list(sch.get_loops(out)[1:])  # under the fused loop; unit loops are dropped
    if cols > 1:
        sch.vectorize(tile.pop())
    if rows > 1:
        sch.unroll(tile.pop())
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def is_packed(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is the block form (``kernels/matmul.py::matmul_packed``)."""
    try:
        s_tir.Schedule(func).get_sblock("b_pack")
    except Exception:  # noqa: BLE001  (no such block: TVM raises its generic ScheduleError)
        return False
    return True
