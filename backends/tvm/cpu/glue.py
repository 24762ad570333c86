"""A CPU schedule of the PrimFuncs that are not ptq kernels: the integer glue (residual add and
requantize, dequantize, LUT gathers, ``mean``) and the float islands (softmax, layer norm) that
TVM legalizes and fuses into PrimFuncs of its own.

Left to TVM's default CPU lowering, these run unscheduled: every fused intermediate is a
full-size buffer and nothing is vectorized (MiniLM s128: ~6 ms of ~54 on one Zen 3 core).
Three rules, the first that applies wins:

* A column reduction ``C[..., n] = sum_k A[..., k] * B[..., k, n]`` with an injective
  epilogue (a float ``linear`` kept in float, its constant weight stored ``[K, N]``): the
  reduction loop outside a tile of vectorized outputs (``_column_reduction``).
* TVM's dlight CPU ``Reduction`` rule for functions of row reductions followed by injective
  blocks (softmax, layer-norm statistics, ``mean``): one parallel loop over the rows, every
  block computed per row, injective blocks vectorized, reductions split and unrolled (their
  serial order is kept, so float sums are unchanged); reductions a kernel wrote as per-lane
  partials (``LANE_PARTIALS``) then get vector accumulators.
* All blocks injective but perhaps the last: every block inlined into the last one (one pass,
  no intermediates); its innermost axis vectorized when it is injective, the axes outside it
  one parallel loop from ``PARALLEL_MIN`` elements. Not a fused flat
  axis: broadcast operands would be addressed by div/mod of the flat index, which LLVM turns
  into gathers. (A last reduction, e.g. ResNet's global ``mean`` after its requantize chain,
  only loses its intermediates.)

Both change loops, not arithmetic, with one exception: once a float multiply and the add after
it are inlined into one expression, LLVM (TVM builds with fp-contract fast) may fuse them into
an FMA, so a float island can move by an ulp from the unscheduled lowering. Integer glue stays
bit-exact: its only float multiply (requantize) is followed by ``round``.
"""

from __future__ import annotations

from typing import Optional

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

#: Reduction blocks whose name contains this keep one partial result per lane in their last
#: spatial axis (``kernels/softmax.py``); after the ``Reduction`` rule, that axis is moved
#: inside the reduction loops and vectorized: independent vector accumulators instead of one
#: serial chain (the reduction order is the block's own, lane by lane).
LANE_PARTIALS = "_lanes"

#: Lanes of the vectorized innermost axis, the first that divides its extent. 32 first: a
#: float32 -> 8-bit quantize vectorized by 16 (or 8) lanes comes out of LLVM (22, in TVM 0.27) as a strided
#: re-vectorization across the outer loop (``vinsertps`` gathers, ``vpextrb`` scatters), 3.2x
#: slower than by 32 lanes (one ymm store of bytes): [128, 384] 28.6 vs 8.8 us on one Zen 3
#: core; float32 -> float32 blocks take the same time at 8 to 64 lanes.
VECTOR_LANES = (32, 16, 8, 4)

#: Rows per tile of the column-reduction rule (with up to 4 vectors of columns: 16
#: accumulators): one load of ``B`` per ``ROWS`` multiply-adds instead of one per
#: multiply-add (MobileNetV2's float 1x1 convs, 49 x 160 -> 960: ~300 us a row at a time on
#: one Emerald Rapids core).
ROWS = 4


#: Elements an injective glue block needs before its outer loops run in parallel (below it,
#: the parallel launch costs more than it saves).
PARALLEL_MIN = 16384


def is_glue(func) -> bool:
    """A PrimFunc this schedule is for: not a ptq kernel, not already scheduled (our
    ``tir.is_scheduled`` or dlight's ``tirx.is_scheduled``)."""
    if not isinstance(func, tirx.PrimFunc):
        return False
    attrs = func.attrs
    return not (attrs and ("ptq.kernel" in attrs or "tir.is_scheduled" in attrs
                           or "tirx.is_scheduled" in attrs))


def schedule_glue(func: tirx.PrimFunc, target: Target) -> Optional[tirx.PrimFunc]:
    """``func`` scheduled by the first rule that applies (see the module docstring), marked
    scheduled; None when none applies (e.g. a reduction whose last block is not injective).

    Raises whatever TVM's schedule primitives raise on a function they cannot transform; the
    pipeline (``ApplyGlueSchedules``) keeps the function as it was then.
    """
    if any(str(getattr(p, "dtype", "")) == "bool" for p in func.params):
        return None  # (vectorized bool stores fail in TVM's codegen: masks stay scalar)
    sch = _column_reduction(func)
    if sch is None:
        sch = dlight.cpu.Reduction().apply(func, target, False)
        if sch is not None:
            _vectorize_lane_partials(sch)
    if sch is None:
        sch = _inline_and_vectorize(func)
    if sch is None:
        return None
    # Both attribute spellings: ours (ApplyPtqSchedules, this pass) and dlight's
    # ApplyDefaultSchedule, so that a later dlight pass leaves the function alone too.
    return (sch.mod["main"].with_attr("tir.is_scheduled", True)
            .with_attr("tirx.is_scheduled", True))


def _column_reduction(func: tirx.PrimFunc) -> Optional[s_tir.Schedule]:
    """The first rule: ``C[..., n] = sum_k A[..., k] * B[..., k, n]`` (a float ``linear``
    whose constant weight TVM stored transposed, ``[K, N]``) and an injective epilogue.

    Reduced row by row (dlight's ``Reduction``), each output walks a column of ``B`` with a
    stride of ``N`` elements: MobileNetV2's float classifier (1280 -> 1000) took 1.9 ms. Here
    the reduction loop goes outside a tile of outputs: for each ``k``, a row segment of ``B``
    (``lanes`` x up to 8 vectors, contiguous) is multiplied into the tile's accumulators. Every
    output is still summed serially in ``k`` order.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or infos[0].is_injective() or not all(i.is_injective() for i in infos[1:]):
        return None
    block = infos[0].block_rv
    stmt = sch.get(block)
    spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce) != 1 or not spatial or len(stmt.writes) != 1:
        return None
    n_var, k_var = spatial[-1].var, reduce[0].var
    if not stmt.writes[0].region[-1].min.same_as(n_var):
        return None
    walks_column = any(len(r.region) >= 2 and r.region[-1].min.same_as(n_var)
                       and r.region[-2].min.same_as(k_var) for r in stmt.reads)
    loops = sch.get_loops(block)
    extents = [sch.get(lp).extent for lp in loops]
    if not walks_column or len(loops) != len(spatial) + 1 \
            or not all(isinstance(e, tirx.IntImm) for e in extents[-2:]):
        return None
    n = int(extents[-2])
    lanes = next((v for v in (16, 8) if n % v == 0), None)
    if lanes is None:
        return None
    *outer, n_loop, k_loop = loops
    rows = ROWS if outer else 1
    vectors = max(d for d in range(1, 9 if rows == 1 else 5) if (n // lanes) % d == 0)
    n_o, n_m, n_i = sch.split(n_loop, [None, vectors, lanes])
    if rows > 1:  # a tile of rows x vectors: each B vector loaded serves ROWS rows
        r_o, r_i = sch.split(outer[-1], [None, rows])
        outer = outer[:-1] + [r_o]
        sch.reorder(r_o, n_o, k_loop, r_i, n_m, n_i)
        sch.unroll(r_i)
    else:
        sch.reorder(n_o, k_loop, n_m, n_i)
    sch.parallel(sch.fuse(*outer, n_o) if outer else n_o)
    sch.unroll(n_m)
    sch.vectorize(n_i)
    sch.decompose_reduction(block, k_loop)
    for info in infos[1:-1]:
        sch.compute_inline(info.block_rv)
    if len(infos) > 1:
        last = infos[-1].block_rv
        sch.reverse_compute_at(last, sch.get_loops(block)[len(outer) - 1 if outer else 0])
        _vectorize_innermost(sch, last)
    return sch


def _inline_and_vectorize(func: tirx.PrimFunc) -> Optional[s_tir.Schedule]:
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not all(info.is_injective() for info in infos[:-1]):
        return None
    if len(infos) == 1 and not infos[0].is_injective():
        return None
    kept = []
    for info in infos[:-1]:
        try:
            sch.compute_inline(info.block_rv)
        except s_tir.ScheduleError:  # it writes an output of a multi-output function
            kept.append(info.block_rv)
    if infos[-1].is_injective():
        kept.append(infos[-1].block_rv)
    for block in kept:
        _vectorize_innermost(sch, block)
        _parallelize_outer(sch, block)
    return sch


def _parallelize_outer(sch: s_tir.Schedule, block) -> None:
    """One parallel loop over all but the innermost loop of ``block`` (the vectorized one),
    where the block has at least ``PARALLEL_MIN`` elements (a symbolic extent counts as 1):
    MiniLM's GELU, per-token epilogues and attention-mask adds ran on one thread of two."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    total = 1
    for lp in loops:
        extent = sch.get(lp).extent
        total *= int(extent) if isinstance(extent, tirx.IntImm) else 1
    if total < PARALLEL_MIN:
        return
    outer = loops[:-1]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _vectorize_innermost(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extent = sch.get(loops[-1]).extent
    if not isinstance(extent, tirx.IntImm):
        return  # a symbolic innermost axis: left scalar
    n = int(extent)
    lanes = next((v for v in VECTOR_LANES if n % v == 0), None)
    if lanes is None:
        return
    sch.vectorize(loops[-1] if n == lanes else sch.split(loops[-1], [None, lanes])[1])


def _vectorize_lane_partials(sch: s_tir.Schedule) -> None:
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if LANE_PARTIALS not in stmt.name_hint:
            continue
        spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        extents = [iv.dom.extent for iv in spatial[-1:] + reduce]
        if not spatial or not reduce or not all(isinstance(e, tirx.IntImm) for e in extents):
            continue
        lanes, total = int(extents[0]), 1
        for e in extents[1:]:
            total *= int(e)
        # The reduction loops are the innermost ones whose extents multiply to ``total``
        # (the rule may have split them); the lane loop is just outside them.
        loops = sch.get_loops(block)
        i, seen = len(loops), 1
        while i > 0 and seen < total:
            i -= 1
            ext = sch.get(loops[i]).extent
            if not isinstance(ext, tirx.IntImm):
                break
            seen *= int(ext)
        lane_ext = sch.get(loops[i - 1]).extent if i > 0 else None
        if seen != total or not isinstance(lane_ext, tirx.IntImm) or int(lane_ext) != lanes:
            continue
        sch.reorder(*loops[i:], loops[i - 1])
        sch.vectorize(loops[i - 1])
