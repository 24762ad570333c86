"""Hand-written x86 schedule of the packed dense / conv2d computes (the tuning fallback).

The reduction ``acc`` is tiled as ``[spatial outer] x [rows] x [lanes] x [depth]``, the
``lanes`` output channels of one packed weight block being ``lanes / intrin_lanes`` calls of the
family's dot-product intrinsic (VNNI 16x4, or the exact AVX2 8x2 one). ``rows`` output rows
(dense: rows of ``x``; conv: output columns) share each weight block (unrolled), and with
``cache=True`` the ``rows x lanes`` int32 tile accumulates in a small buffer of its own, written
back once per tile, which LLVM keeps in registers for the whole reduction. The outer spatial
loops and the output-channel blocks are fused into one parallel loop (TVM's thread pool).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import tvm
from tvm import s_tir, tirx

from ptqpasses_backends.tvm.kernels.shapes import divisor_at_most


def schedule_packed(func: tirx.PrimFunc, kind: str, intrin: str, lanes: int = 16,
                    depth: int = 4, rows: Union[int, Mapping[str, int]] = 4,
                    intrin_lanes: Optional[int] = None,
                    cache: bool = False, fuse_out: bool = False,
                    blocks: int = 1, tile: Optional[int] = None) -> tirx.PrimFunc:
    """Tile, tensorize and parallelize the ``acc`` block of a ``dense`` / ``conv2d`` kernel."""
    if kind not in ("dense", "conv2d"):
        return func
    sch = s_tir.Schedule(func)
    apply(sch, kind, intrin, lanes, depth, rows, intrin_lanes, cache, fuse_out, blocks, tile)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def apply(sch: s_tir.Schedule, kind: str, intrin: str, lanes: int = 16, depth: int = 4,
          rows: Union[int, Mapping[str, int]] = 4, intrin_lanes: Optional[int] = None,
          cache: bool = False,
          fuse_out: bool = False, blocks: int = 1, tile: Optional[int] = None) -> None:
    """The template on a (traced) Schedule of ``main``; ``tune`` seeds its database with it.

    Args:
        lanes, depth: The packed weight block (``Layout.lanes`` / ``Layout.depth``).
        rows: Output rows per tile (the largest divisor of the row extent up to this); one
            count, or a ``{kind: count}`` mapping.
        intrin_lanes: Output channels of one intrinsic call (default ``lanes``).
        cache: Accumulate each tile in its own buffer (registers) instead of in ``acc``.
        blocks: Weight blocks (of ``lanes`` output channels) per tile (the largest divisor of
            the block count up to this): a tile is ``rows x (blocks * lanes)`` accumulators,
            each broadcast activation used ``blocks`` times and each weight block ``rows``
            times.
        tile: At most this many ``rows x blocks`` accumulator vectors (AVX-512 VNNI: under
            1024 bytes, TVM's limit for a stack buffer LLVM keeps in registers; see
            ``x86.VNNI_TILE``).
    """
    intrin_lanes = intrin_lanes or lanes
    if not isinstance(rows, int):
        rows = rows[kind]
    if lanes % intrin_lanes:
        raise ValueError(f"{lanes} lanes are not a multiple of the intrinsic's {intrin_lanes}")
    blk = sch.get_sblock("acc")
    loops = sch.get_loops(blk)
    if kind == "dense":
        *outer, m, o, c = loops
        reduce_outer = []
    else:  # n, oh, ow, g, o | r, s, c
        *outer, m, g, o, r, s, c = loops
        outer = [*outer, g]
        reduce_outer = [r, s]
    m_ext = sch.get(m).extent
    rows = divisor_at_most(int(m_ext), rows) if isinstance(m_ext, tirx.IntImm) else 1
    if tile is not None:
        blocks = max(1, min(blocks, tile // rows))
    blocks = divisor_at_most(int(sch.get(o).extent) // lanes, blocks)
    o_out, o_blk, o_mid, o_in = sch.split(o, [None, blocks, lanes // intrin_lanes,
                                              intrin_lanes])
    c_out, c_in = sch.split(c, [None, depth])
    m_out, m_in = sch.split(m, [None, rows])
    tiles = [*outer, o_out, m_out]
    if cache and kind == "conv2d" and _weights_outweigh_activations(sch, blk):
        # deep layers (e.g. 512 channels on 7x7): keep each weight block hot for every
        # output pixel instead of streaming all weights once per output row
        n, oh, g = outer
        tiles = [n, g, o_out, oh, m_out]
    sch.reorder(*tiles, *reduce_outer, c_out, m_in, o_blk, o_mid, o_in, c_in)
    if cache:
        wb = sch.cache_write(blk, 0, "global")
        sch.reverse_compute_at(wb, m_out)
        if fuse_out:
            # requantize each tile straight from the accumulators: no full int32 round trip
            sch.compute_inline(wb)
            sch.reverse_compute_at(sch.get_sblock("out"), m_out)
        sch.parallel(sch.fuse(*tiles))
    else:
        par = [*outer, o_out]
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    init = sch.decompose_reduction(blk, (reduce_outer or [c_out])[0])
    sch.tensorize(o_in, intrin)
    sch.unroll(m_in)
    sch.unroll(o_blk)
    sch.unroll(o_mid)
    # vectorize the init and the write-back of the lanes
    sch.vectorize(sch.get_loops(init)[-1])
    if cache and not fuse_out:
        sch.vectorize(sch.get_loops(wb)[-1])
    if fuse_out:
        _vectorize_epilogue(sch, lanes)
    if cache:
        _schedule_x_enc(sch, kind)


def _vectorize_epilogue(sch: s_tir.Schedule, lanes: int) -> None:
    """Vectorize a tile's requantize (the ``out`` block at the tile) along its innermost loop,
    ``lanes`` per vector, where that loop is whole vectors: the output channels of NHWC convs
    and dense (an NCHW conv's innermost loop is the tile's ``rows`` <= 8 columns, left to
    LLVM). Left to LLVM's loop vectorizer, the channel loop came out as 16-lane vectors on
    some tile widths and as gathers (``vpgatherqd``) on others: 2.8x slower for a 7 x 32 tile
    of a 16 -> 96 channel 1x1 conv on a Zen 4 core."""
    loops = sch.get_loops(sch.get_sblock("out"))
    extent = sch.get(loops[-1]).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1])


def _weights_outweigh_activations(sch: s_tir.Schedule, blk) -> bool:
    """Whether the packed weights read by ``blk`` take more bytes than its ``x_enc`` input
    (per sample: a symbolic batch dim counts as 1)."""
    size = {}
    for region in sch.get(blk).reads:
        buf = region.source
        n = 1
        for d in buf.shape:
            n *= int(d) if isinstance(d, tirx.IntImm) else 1
        size[buf.name] = n * tvm.DataType(buf.dtype).bits // 8
    acts = size.pop("x_enc", None)
    return acts is not None and bool(size) and max(size.values()) > acts


def _schedule_x_enc(sch: s_tir.Schedule, kind: str) -> None:
    """Parallel activation re-encoding: over rows (dense, vectorized along K) or over padded
    input rows (conv; a NCHW -> NHWC transpose, left scalar)."""
    enc = sch.get_sblock("x_enc")
    loops = sch.get_loops(enc)
    if kind == "dense":
        *rows, k = loops
        if rows:
            sch.parallel(sch.fuse(*rows) if len(rows) > 1 else rows[0])
        k_ext = sch.get(k).extent
        if isinstance(k_ext, tirx.IntImm) and int(k_ext) % 16 == 0:
            sch.vectorize(sch.split(k, [None, 16])[1])
    else:  # b, y, z, g, c
        sch.parallel(sch.fuse(*loops[:2]))


def schedule_matmul_packed(func: tirx.PrimFunc, args: dict) -> tirx.PrimFunc:
    """Schedule the block form of ``matmul`` with the dense template.

    ``acc`` is tiled, tensorized and requantized per tile exactly as a packed ``dense``
    (``args``: the keyword arguments of :func:`apply`, with an int16 x int16 intrinsic);
    then each tile's requantize is vectorized along its lanes (when ``N`` is whole blocks) and
    the per-call packing of ``b`` runs in parallel over its column blocks, one block (lanes x
    depth) per vector.
    """
    sch = s_tir.Schedule(func)
    apply(sch, "dense", **args)
    lanes = args["lanes"]
    out = sch.get_sblock("out")
    n_out = _static_extent(sch.get(out).writes[0].source.shape[-1])
    if n_out is not None and n_out % lanes == 0:
        sch.vectorize(sch.get_loops(out)[-1])
    pack = sch.get_sblock("b_pack")
    *lead, o, _c, l, d = sch.get_loops(pack)
    outer = [*lead, o]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(sch.fuse(l, d))
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _static_extent(extent):
    return int(extent) if isinstance(extent, tirx.IntImm) else None
