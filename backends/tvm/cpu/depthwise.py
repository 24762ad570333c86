"""CPU schedule of the depthwise ``ptq.conv2d`` (``kernels/conv2d.py::conv2d_depthwise``).

Left unscheduled, a depthwise kernel is one serial scalar loop nest (MobileNetV2 224 b1 on one
Zen 3 core: 17 kernels, 3.4 ms, 6 GMAC/s). This schedule, for every LLVM target:

- one parallel loop over batch x input channel (a symbolic batch fuses like a static one);
  under it the channel's padded ``x_enc`` plane, computed there (cache-resident), then the
  ``k = c_out / c_in`` output channels of that input channel;
- ``x_enc`` split by ``decompose_padding`` into a fill of the zero point (a vectorized
  memset of the plane) and a copy of the interior without a bounds test, vectorized along the
  row; for stride 2 the copy splits input columns into the two phases with a small tensor
  intrinsic (a contiguous vector load, two shuffles, two widening casts; generic LLVM IR),
  as TVM would otherwise load every lane of a stride-2 read on its own;
- ``acc`` as ``[out row] x [width / 8] x [taps, unrolled] x [8 lanes]``: one vector of 8 int32
  accumulators per tile (a buffer of its own, ``cache_write``, kept in a register), every tap a
  contiguous vector load (stride-2 kernels read the compute's column phases) times the
  broadcast weight; the compute rounds the width up to whole vectors, so there is no tail;
- ``out`` (the requantize) per output row, vectorized, straight after the row's tiles.

Only loops move: the integer sums and the float32 requantize are the compute's, so results are
bit-exact for every dtype, stride, padding, dilation and channel multiplier.

Measured on MobileNetV2 224 b1, one thread, Zen 3 (a shared machine, load 2.5-3.5 on 2
cores): the 17 depthwise kernels from 4.2 to 2.4 ms (kernel replays), the whole model from
12.3 to 11.2 ms (min of 300 calls, both builds in one process); 96x112 s2 786 -> 372 us,
144x56 s1 490 -> 343 us. What remains: small planes (14x14, 7x7: the requantize of 14- or
7-lane rows and fixed costs per channel; no faster than the unscheduled code, 4-7 GMAC/s),
the zero-point fill of the whole plane (~15% on the 112x112 kernels), and stride-2 rows
whose half-width is not a multiple of 4 (14x14 and 28x28 inputs: scalar column split).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ptqpasses_backends.tvm.kernels.shapes import divisor_at_most

#: int32 accumulators per tile (one AVX2 register; the compute's ``width_block``).
LANES = 8
#: ``x_enc`` / ``out`` rows up to this long that are not whole vectors are vectorized whole
#: (LLVM splits the stores), longer ones in vectors of a divisor of their length.
WHOLE_ROW = 32


def _static(extent):
    return int(extent) if isinstance(extent, tirx.IntImm) else None


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
    v = divisor_at_most(ext, 2 * LANES)
    if v > 1:
        sch.vectorize(sch.split(loop, [None, v])[1])


def _deinterleave_intrin(in_dtype: str, enc_dtype: str, lanes: int) -> str:
    """Register (once) and name the stride-2 column split of ``2 * lanes`` input elements:
    ``C[p, i] = enc_dtype(A[2 * i + p])``, as one contiguous vector load, two shuffles (even
    and odd lanes) and two widening casts: plain LLVM vector IR, so any LLVM target has it.
    Without it TVM loads each lane of a stride-2 read on its own (``vpinsrb`` per byte)."""
    name = f"ptq_deinterleave2_{in_dtype}_{enc_dtype}_{lanes}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    n = 2 * lanes

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        row = T.int32()
        A = T.match_buffer(a, (n,), in_dtype, offset_factor=1)
        C = T.match_buffer(c, (2, lanes), enc_dtype, offset_factor=1, strides=[row, 1])
        with T.sblock("root"):
            T.reads(A[0:n])
            T.writes(C[0:2, 0:lanes])
            for p, i in T.grid(2, lanes):
                with T.sblock("copy"):
                    vp, vi = T.axis.remap("SS", [p, i])
                    C[vp, vi] = T.Cast(enc_dtype, A[vi * 2 + vp])

    even = [tirx.IntImm("int32", 2 * i) for i in range(lanes)]
    odd = [tirx.IntImm("int32", 2 * i + 1) for i in range(lanes)]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        row = T.int32()
        A = T.match_buffer(a, (n,), in_dtype, offset_factor=1)
        C = T.match_buffer(c, (2, lanes), enc_dtype, offset_factor=1, strides=[row, 1])
        with T.sblock("root"):
            T.reads(A[0:n])
            T.writes(C[0:2, 0:lanes])
            C[0, T.ramp(T.int32(0), 1, lanes)] = T.Cast(
                f"{enc_dtype}x{lanes}", T.Shuffle([A.vload([0], f"{in_dtype}x{n}")], even))
            C[1, T.ramp(T.int32(0), 1, lanes)] = T.Cast(
                f"{enc_dtype}x{lanes}", T.Shuffle([A.vload([0], f"{in_dtype}x{n}")], odd))

    TensorIntrin.register(name, desc, impl)
    return name


def _deinterleave(sch: s_tir.Schedule, copy) -> bool:
    """Tensorize a stride-2 interior copy ``[channel, y, p, zz]`` with the column split
    (``zz`` in vectors of 8 or 4 lanes); False where it does not apply (another stride, a row
    not a whole number of vectors)."""
    loops = sch.get_loops(copy)
    if len(loops) != 4 or _static(sch.get(loops[2]).extent) != 2:
        return False
    _, _, p, zz = loops
    block = sch.get(copy)
    ext = _static(sch.get(zz).extent)
    for lanes in (LANES, LANES // 2):
        if ext % lanes == 0:
            zz_out, zz_in = sch.split(zz, [None, lanes])
            sch.reorder(zz_out, p, zz_in)
            sch.tensorize(p, _deinterleave_intrin(str(block.reads[0].source.dtype),
                                                  str(block.writes[0].source.dtype), lanes))
            return True
    return False


def _schedule_x_enc(sch: s_tir.Schedule, enc, deinterleave: bool) -> None:
    """Split the padded ``x_enc`` plane into a fill of the zero point (the whole plane as one
    loop, a memset) and a copy of the interior rows with no bounds test (stride 2: tensorized
    column split, ``_deinterleave``); a plane with no border to split off (``padding=0`` on
    whole vectors, or a stride that does not divide the width) keeps its one guarded copy."""
    try:
        fill = sch.decompose_padding(enc, sch.get_loops(enc)[1])
    except s_tir.ScheduleError:
        fill = None
    if fill is not None:
        plane = sch.fuse(*sch.get_loops(fill)[1:])
        if _static(sch.get(plane).extent) % LANES == 0:
            sch.vectorize(sch.split(plane, [None, LANES])[1])
        if deinterleave and _deinterleave(sch, enc):
            return
    _vectorize_row(sch, enc)


def schedule_depthwise(func: tirx.PrimFunc, lanes: int = LANES) -> tirx.PrimFunc:
    """Schedule the ``x_enc`` / ``acc`` / ``out`` blocks of a depthwise conv kernel (retried
    without the stride-2 column split if that one fails to tensorize).

    Args:
        lanes: Accumulators per tile (the largest divisor of the computed width up to this).
    """
    try:
        return _schedule(func, lanes, deinterleave=True)
    except s_tir.ScheduleError:
        return _schedule(func, lanes, deinterleave=False)


def _schedule(func: tirx.PrimFunc, lanes: int, deinterleave: bool) -> tirx.PrimFunc:
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
    lanes = divisor_at_most(_static(sch.get(z).extent), lanes)
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
    _schedule_x_enc(sch, enc, deinterleave)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


#: NHWC depthwise tile: output pixels x int32 channel lanes (x blocks of them).
NHWC_ROWS, NHWC_LANES, NHWC_BLOCKS = 4, 16, 2


def schedule_depthwise_nhwc(func: tirx.PrimFunc, rows: int = NHWC_ROWS,
                            lanes: int = NHWC_LANES, blocks: int = NHWC_BLOCKS
                            ) -> tirx.PrimFunc:
    """Schedule ``kernels/conv2d.py::conv2d_depthwise_nhwc``: output rows in one parallel
    loop; per row, tiles of ``rows`` pixels x ``blocks * lanes`` channels accumulate in a
    buffer of their own (registers) over the unrolled taps, every tap a vector of inputs
    (widened from 8 bits) times a vector of weights; the requantize per row, vectorized along
    channels. The padded ``x_enc`` copy runs first, parallel over rows, vectorized along
    channels. Only loops move: bit-exact."""
    sch = s_tir.Schedule(func)
    acc, out, enc = sch.get_sblock("acc"), sch.get_sblock("out"), sch.get_sblock("x_enc")
    b, y, z, o, r, s = sch.get_loops(acc)
    c = _static(sch.get(o).extent)
    lanes = divisor_at_most(c, lanes)
    blocks = divisor_at_most(c // lanes, blocks)
    rows = divisor_at_most(_static(sch.get(z).extent), rows)
    z_out, z_in = sch.split(z, [None, rows])
    o_out, o_blk, o_in = sch.split(o, [None, blocks, lanes])
    row = sch.fuse(b, y)
    sch.reorder(row, z_out, o_out, r, s, z_in, o_blk, o_in)
    wb = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(wb, o_out)
    sch.reverse_compute_at(out, row)
    sch.parallel(row)
    sch.unroll(r)
    sch.unroll(s)
    sch.unroll(z_in)
    sch.unroll(o_blk)
    sch.vectorize(o_in)  # before decompose_reduction: the init inherits it
    sch.decompose_reduction(acc, r)
    *_, wb_in = sch.get_loops(wb)
    sch.vectorize(wb_in)
    _vectorize_channels(sch, out)
    eb, ey, ez, ec = sch.get_loops(enc)
    sch.parallel(sch.fuse(eb, ey))
    _vectorize_channels(sch, enc)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _vectorize_channels(sch: s_tir.Schedule, blk) -> None:
    """Vectorize the innermost (channel) loop of ``blk`` by up to 64 lanes."""
    inner = sch.get_loops(blk)[-1]
    n = _static(sch.get(inner).extent)
    if n is None:
        return
    width = divisor_at_most(n, 64)
    if width > 1:
        sch.vectorize(sch.split(inner, [None, width])[1] if width < n else inner)
