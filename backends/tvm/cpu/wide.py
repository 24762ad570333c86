"""A plain CPU schedule of the int16-activation kernels (``kernels/wide.py``).

The ``dense_wide`` / ``conv2d_wide`` computes have no dot-product intrinsic to map onto (their
activations are 16-bit, their sums possibly int64); left to the default lowering they run on
one thread. This only parallelizes: the spatial loops of each block (``x_enc``, ``acc``,
``out``; for convs batch x channel) are fused and bound to TVM's thread pool. Reduction order
and dtypes are untouched, so results stay bit-exact.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from ptqpasses_backends.tvm.kernels.wide import KINDS


def schedule_wide(func: tirx.PrimFunc, kind: str) -> tirx.PrimFunc:
    """Parallelize a ``dense_wide`` / ``conv2d_wide`` kernel (others are returned unchanged)."""
    if kind not in KINDS:
        return func
    sch = s_tir.Schedule(func)
    for name in ("x_enc", "acc", "out"):
        blk = sch.get_sblock(name)
        n_spatial = sum(iv.iter_type == 0 for iv in sch.get(blk).iter_vars)  # data-parallel
        loops = sch.get_loops(blk)[:n_spatial]
        # dense: every spatial dim (lead dims x features); conv: batch x channel
        outer = loops if kind == "dense_wide" else loops[:2]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)
