"""CPU schedule of the depthwise ``ptq.conv2d`` (``kernels/conv2d.py::conv2d_depthwise``).

Left unscheduled, a depthwise kernel is one serial scalar loop nest (MobileNetV2 224 b1 on one
Zen 3 core: 17 kernels, 3.4 ms, 6 GMAC/s). This schedule, for every LLVM target:

- one parallel loop over batch x input channel (a symbolic batch fuses like a static one);
  under it the channel's padded ``x_enc`` plane(s), computed there (cache-resident), then the
  ``k = c_out / c_in`` output channels of that input channel;
- ``x_enc`` split by ``decompose_padding`` into a fill of the zero point and a copy of the
  interior without a bounds test, both vectorized along the row;
- ``acc`` as ``[out row] x [width / 8] x [taps, unrolled] x [8 lanes]``: one vector of 8 int32
  accumulators per tile (a buffer of its own, ``cache_write``, kept in a register), every tap a
  contiguous vector load (stride-2 kernels read the compute's column phases) times the
  broadcast weight; the compute rounds the width up to whole vectors, so there is no tail;
- ``out`` (the requantize) per output row, vectorized, straight after the row's tiles.

Only loops move: the integer sums and the float32 requantize are the compute's, so results are
bit-exact for every dtype, stride, padding, dilation and channel multiplier.

Measured on MobileNetV2's kernels (one thread, Zen 3, load ~2 on 2 cores): see the README.
The stride-2 kernels are held back by the column de-interleave of ``x_enc`` (a strided byte
read that LLVM scalarizes, about half of their time).
"""

from __future__ import annotations

from tvm import s_tir, tirx

#: int32 accumulators per tile (one AVX2 register; the compute's ``width_block``).
LANES = 8
#: ``x_enc`` / ``out`` rows up to this long that are not whole vectors are vectorized whole
#: (LLVM splits the stores), longer ones in vectors of a divisor of their length.
WHOLE_ROW = 32


def _static(extent):
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _vectorize_row(sch: s_tir.Schedule, blk) -> None:
    """Vectorize the innermost loop of ``blk`` (``x_enc`` fill / copy, ``out``: a row), if it
    is the block's own (a row of one element has no loop)."""
    loop = sch.get_loops(blk)[-1]
    if len(sch.get_child_blocks(loop)) != 1:
        return
    ext = _static(sch.get(loop).extent)
    if ext is None or ext <= 1:
        return
    if ext <= WHOLE_ROW and ext % LANES:
        sch.vectorize(loop)
        return
    v = _largest_divisor(ext, 2 * LANES)
    if v > 1:
        sch.vectorize(sch.split(loop, [None, v])[1])


def _schedule_x_enc(sch: s_tir.Schedule, enc) -> None:
    """Split the padded ``x_enc`` plane into a fill of the zero point (the whole plane as one
    loop, a memset) and a copy of the interior rows with no bounds test; a plane with no
    border to split off (``padding=0`` on whole vectors, or a stride that does not divide
    the width) keeps its one guarded copy."""
    try:
        fill = sch.decompose_padding(enc, sch.get_loops(enc)[1])
    except s_tir.ScheduleError:
        fill = None
    if fill is not None:
        plane = sch.fuse(*sch.get_loops(fill)[1:])
        ext = _static(sch.get(plane).extent)
        if ext % LANES == 0:
            sch.vectorize(sch.split(plane, [None, LANES])[1])
    _vectorize_row(sch, enc)


def schedule_depthwise(func: tirx.PrimFunc, lanes: int = LANES) -> tirx.PrimFunc:
    """Schedule the ``x_enc*`` / ``acc`` / ``out`` blocks of a depthwise conv kernel.

    Args:
        lanes: Accumulators per tile (the largest divisor of the computed width up to this).
    """
    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    enc = sch.get_sblock("x_enc")
    b, o, y, z, r, s = sch.get_loops(acc)
    c_in = _static(sch.get(enc).writes[0].source.shape[1])
    per_group = _static(sch.get(o).extent) // c_in
    inner = []
    if per_group > 1:  # channel multiplier: the k outputs of one input channel in a row
        o, k = sch.split(o, [None, per_group])
        inner = [k]
    lanes = _largest_divisor(_static(sch.get(z).extent), lanes)
    z_out, z_in = sch.split(z, [None, lanes])
    channel = sch.fuse(b, o)
    sch.reorder(channel, *inner, y, z_out, r, s, z_in)
    # the tile's accumulators in a buffer of their own (a register), written back once
    wb = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(wb, z_out)
    sch.reverse_compute_at(out, y)
    sch.compute_at(enc, channel)
    sch.parallel(channel)
    sch.unroll(r)
    sch.unroll(s)
    sch.vectorize(z_in)  # before decompose_reduction: the init inherits it
    sch.decompose_reduction(acc, r)
    sch.vectorize(sch.get_loops(wb)[-1])
    _vectorize_row(sch, out)
    _schedule_x_enc(sch, enc)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)
