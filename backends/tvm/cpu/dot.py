"""A fixed (untuned) schedule that tensorizes a ptq kernel's ``acc`` block.

The packed compute of ``kernels/dense.py`` and ``kernels/conv2d.py`` ends in two loops of extent
``lanes`` x ``depth`` after splitting (output channel, reduction channel); this moves them
innermost and maps them onto a dot-product intrinsic. It is what tuning does too, minus the
search over the outer loops.
"""

from __future__ import annotations

from tvm import s_tir, tirx


def tensorize_acc(func: tirx.PrimFunc, kind: str, intrin: str, lanes: int,
                  depth: int) -> tirx.PrimFunc:
    """Tensorize the ``acc`` block of a ``dense`` / ``conv2d`` kernel with ``intrin``."""
    if kind not in ("dense", "conv2d"):
        return func
    sch = s_tir.Schedule(func)
    apply(sch, kind, intrin, lanes, depth)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def apply(sch: s_tir.Schedule, kind: str, intrin: str, lanes: int, depth: int) -> None:
    """:func:`tensorize_acc` on a (traced) Schedule of ``main`` (the tuning seed)."""
    blk = sch.get_sblock("acc")
    loops = sch.get_loops(blk)
    if kind == "dense":
        *spatial, o, c = loops
        reduce_outer = []
    else:  # n, oh, ow, g, o | r, s, c
        *spatial, o, r, s, c = loops
        reduce_outer = [r, s]
    o_out, o_in = sch.split(o, [None, lanes])
    c_out, c_in = sch.split(c, [None, depth])
    sch.reorder(*spatial, o_out, *reduce_outer, c_out, o_in, c_in)
    sch.decompose_reduction(blk, (reduce_outer or [c_out])[0])
    sch.tensorize(o_in, intrin)
