"""Hand-written x86 schedule of the packed dense / conv2d computes (the tuning fallback).

The reduction ``acc`` is tiled as ``[spatial outer] x [rows] x [16 lanes] x [4 deep]``: the
16x4 block is tensorized with the family's dot-product intrinsic (VNNI, or the exact AVX2 one),
``rows`` output rows share each weight block (unrolled, accumulators LLVM may keep in registers), and the outermost spatial loop is parallel (TVM's thread pool).
"""

from __future__ import annotations

from tvm import s_tir, tirx


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, cap + 1) if n % d == 0)


def schedule_packed(func: tirx.PrimFunc, kind: str, intrin: str, lanes: int = 16,
                    depth: int = 4, rows: int = 4) -> tirx.PrimFunc:
    """Tile, tensorize and parallelize the ``acc`` block of a ``dense`` / ``conv2d`` kernel."""
    if kind not in ("dense", "conv2d"):
        return func
    sch = s_tir.Schedule(func)
    apply(sch, kind, intrin, lanes, depth, rows)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def apply(sch: s_tir.Schedule, kind: str, intrin: str, lanes: int = 16, depth: int = 4,
          rows: int = 4) -> None:
    """The template on a (traced) Schedule of ``main``; ``tune`` seeds its database with it."""
    blk = sch.get_sblock("acc")
    loops = sch.get_loops(blk)
    if kind == "dense":
        *outer, m, o, c = loops
        reduce_outer = []
    else:  # n, oh, ow, g, o | r, s, c
        *outer, m, g, o, r, s, c = loops
        outer = [*outer, g]
        reduce_outer = [r, s]
    m_ext = int(sch.get(m).extent) if isinstance(sch.get(m).extent, tirx.IntImm) else None
    o_out, o_in = sch.split(o, [None, lanes])
    c_out, c_in = sch.split(c, [None, depth])
    if m_ext is None:
        rows = 1
    else:
        rows = _divisor_at_most(m_ext, rows)
    m_out, m_in = sch.split(m, [None, rows])
    sch.reorder(*outer, o_out, m_out, *reduce_outer, c_out, m_in, o_in, c_in)
    par = [*outer, o_out]
    sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    init = sch.decompose_reduction(blk, (reduce_outer or [c_out])[0])
    sch.tensorize(o_in, intrin)
    sch.unroll(m_in)
    # vectorize the init and the write-back of the 16 lanes
    sch.vectorize(sch.get_loops(init)[-1])
