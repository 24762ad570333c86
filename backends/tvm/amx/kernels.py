"""Intel AMX int8 kernels (``tdpbusd``) written directly in TIR for TVM 0.27.

Two PrimFunc builders, :func:`dense_amx` and :func:`conv2d_amx`, compute the requantized int8
linear / conv2d of ``backends/tvm/kernels/{dense,conv2d}.py`` bit-exactly::

    acc[.., o] = sum_k x_enc[.., k] * w[o, k] + corr[o]                        (int32)
    out[.., o] = clamp(rne(float32(acc) * mult[o]) + out_zp, qmin, qmax)     (requant_te)

with ``x_enc = uint8(x + shift)`` (``shift`` 128 for int8 inputs, 0 for uint8) and
``corr = bias - zp_enc * sum(w)`` (``packing.correction``).

How a kernel runs
-----------------
1. An encode pass writes ``x_enc`` into an internal uint8 workspace (``T.parallel``): dense
   and im2col convs in GEMM rows (K zero-padded to 64, rows to 16); direct convs as the
   padded NHWC image (border ``zp_enc``, channels padded to 64 with zeros), read in place by
   the tile loads (implicit GEMM, no im2col). Padded K meets zero weights.
2. A blocked GEMM over M tiles (16 rows: batch rows / output pixels) x N tiles (16 output
   channels): each output block holds ``tm x tn`` accumulator tiles (default 2x2 = 32 x 32)
   in tile registers for the whole reduction; A (16 x 64 u8) and B (16 x 64 s8 = 64 k x 16
   channels, the VNNI 16x4 block layout of the packed weights) tiles are ``tileloadd`` ed per
   64-deep step. Accumulators start as the bias tile (``corr`` broadcast to 16 rows by a
   stride-0 ``tileloadd``), so the epilogue needs no add.
3. Epilogue per block: ``tilestored`` every accumulator into an int32 scratch, then
   requantize 16-channel rows straight into ``out``; rows past the output (padded M) and
   channels past ``n_out`` are masked there. Tiles always have 16 rows: measured, a
   ``tdpbusd`` costs the same with 1 and with 16 configured rows, so padding M costs nothing
   over partial-row configs and keeps one static tile config.
4. Threads: the block loop is ``T.parallel`` (TVM's pool) under
   ``pragma_parallel_launch_point``, so each pool task runs ``ldtilecfg`` once before its
   share of blocks and ``tilerelease`` after it (the config is per thread; ``ldtilecfg``
   costs ~85 ns, as much as ~15 ``tdpbusd``). A parallel iteration runs ``group`` blocks
   software-pipelined: block u's tiles are stored, then block u-1 is requantized while the
   tile unit works on block u. Blocks go M-outer (tasks split output rows) for small
   weights, N-outer (each weight panel streamed once per task) above 1 MiB.

Convs pick a :class:`ConvPlan`: im2col for 1x1 (a gather, then a dense); direct implicit
GEMM otherwise, with ``fold`` (K = (s, c), for C < 64: the RGB stem) and ``flat`` (stride 1:
tiles run over the padded-width pixel grid, so 7x7 maps fill whole tiles).

The process must ask Linux for the AMX state first (:func:`request_amx_permission`), or the
first tile instruction raises SIGILL. Compile for :data:`AMX_TARGET` (an ``mcpu`` with AMX).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ptqpasses_backends.tvm.cpu.vector import Requant
from ptqpasses_backends.tvm.cpu.vector import const as _const
from ptqpasses_backends.tvm.cpu.vector import vec as _vec
from ptqpasses_backends.tvm.packing import pack_conv, pack_dense
from ptqpasses_backends.tvm.requant import f32

#: Rows of an A / C tile (batch rows or output pixels per tile).
TILE_M = 16
#: int32 columns of a C tile (output channels per tile).
TILE_N = 16
#: Bytes of an A row = reduction depth of one ``tdpbusd`` (a B row holds 4 k of 16 channels).
TILE_K = 64

#: An LLVM target with AMX. Any ``mcpu`` with ``amx-int8`` works (``sapphirerapids``,
#: ``graniterapids``, ``emeraldrapids``); ``num-cores`` only matters to MetaSchedule.
AMX_TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids",
              "num-cores": 1}

_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> None:
    """Ask Linux for the AMX tile-data state for this process (idempotent, any thread).

    Without it the first tile instruction kills the process with SIGILL. Raises ``OSError``
    when the kernel refuses (no AMX, or Linux older than 5.16).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: "
                           + ctypes.cast(libc.strerror(err), ctypes.c_char_p).value.decode())


def cpu_has_amx() -> bool:
    """``amx_int8`` in /proc/cpuinfo (LLVM's CPU name is unreliable under hypervisors)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("amx_int8" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


#: PrimFunc attributes. ``tir.is_scheduled``: the function is final TIR, so Relax
#: pipelines (legalize-then-schedule passes, dlight, MetaSchedule) leave it as it is.
#: No ``global_symbol``: the module that adds the function names it.
_FUNC_ATTRS = {"tirx.noalias": True, "tir.is_scheduled": True}


def build(func: tirx.PrimFunc, target=None):
    """Compile one kernel alone (``tvm.compile`` of a one-function IRModule, entry "main")
    for an AMX target."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(target or AMX_TARGET))


def _ceil_div(a, b):
    return -(-a // b) if isinstance(a, int) else tirx.floordiv(a + (b - 1), b)


def _batch_dim(value, name: str):
    """An int for a static dim; a fresh ``int64`` var for ``None`` (dynamic batch)."""
    return tirx.Var(name, "int64") if value is None else int(value)


# --- tile instructions -------------------------------------------------------------------


def _intrin(name: str, *args) -> None:
    T.evaluate(T.call_llvm_intrin("void", name, *args))


def _ptr(buf, idx):
    """Address of ``buf[idx]`` for a tile load. Every buffer tiles are loaded from is written
    whole by ordinary stores first (or is a parameter), so TVM's buffer analyses see its
    full extent; StorageRewrite may still give a dead one's memory to a later buffer, which
    ``address_of`` follows (a ``tvm_access_ptr`` then fails its element-type check)."""
    return T.address_of(buf[tuple(idx)])


def _store_ptr(buf, idx):
    """Pointer for ``tilestored`` into a scratch written by nothing else: a
    ``tvm_access_ptr`` (write, to the end of the buffer), so that CompactBufferAllocation
    does not shrink the scratch to the part the epilogue reads (a 16-row store then smashed
    the stack of a 9-pixel-wide conv)."""
    off = 0
    for d, i in zip(buf.shape, idx):
        off = off * d + i
    return buf.access_ptr("w", offset=off)


def _load(tile: int, ptr, stride) -> None:
    _intrin("llvm.x86.tileloadd64", T.int8(tile), ptr, T.int64(stride))


def _write_tile_config(cfg) -> None:
    """Palette 1, all 8 tiles 16 rows x 64 bytes, into an int32 ``[16]`` buffer.

    The 64-byte config: byte 0 palette, bytes ``16 + 2t`` colsb of tile t (uint16), byte
    ``48 + t`` rows of tile t, the rest zero.
    """
    words = [0] * 16
    words[0] = 1
    for t in range(8):
        words[4 + t // 2] |= TILE_K << (16 * (t % 2))
        words[12 + t // 4] |= TILE_M << (8 * (t % 4))
    for i, v in enumerate(words):
        T.buffer_store(cfg, T.int32(v - (1 << 32) if v >= 1 << 31 else v), [i])


def _outer_loop(extent, parallel: bool):
    """The outer loop of a pass: ``T.parallel`` (TVM's thread pool) or serial."""
    return T.parallel(0, extent) if parallel else T.serial(0, extent)


def _when(cond, body) -> None:
    """``body()`` under ``if cond`` (None: unconditionally)."""
    if cond is None:
        body()
        return
    with T.If(cond):
        with T.Then():
            body()


def _all(*conds):
    conds = [c for c in conds if c is not None]
    if not conds:
        return None
    out = conds[0]
    for c in conds[1:]:
        out = tirx.all(out, c)
    return out


class _Frames:
    """Enter several IRBuilder frames; yields the list of their loop vars."""

    def __init__(self, frames):
        self.frames = frames

    def __enter__(self):
        return [f.__enter__() for f in self.frames]

    def __exit__(self, *exc):
        for f in reversed(self.frames):
            f.__exit__(*exc)


# --- register blocking -------------------------------------------------------------------


@dataclass(frozen=True)
class Blocking:
    """``tm x tn`` accumulator tiles per output block (tile registers ``0 .. tm*tn-1``).

    The other tile registers hold operands. If the ``tn`` B tiles fit beside one A slot they
    stay resident for a k step and A tiles rotate through the rest (2x2: B 4-5, A 6-7; 4x1:
    B 4, A rotates 5-7); otherwise one A tile stays and B rotates (1x4: A 4, B 5-7). With
    room for two operand sets (1x2, 2x1, 1x1) consecutive k steps alternate between them.
    Loads per ``tdpbusd``: 2x2 1, 1x2 / 2x1 1.5, 1x4 / 4x1 1.25.
    """

    tm: int = 2
    tn: int = 2

    def __post_init__(self):
        free = 8 - self.tm * self.tn
        if self.tm < 1 or self.tn < 1 or (self.tn + 1 > free and self.tm + 1 > free):
            raise ValueError(f"{self.tm}x{self.tn} accumulators leave no room for operands")

    @property
    def n_acc(self) -> int:
        return self.tm * self.tn

    def acc(self, i: int, j: int) -> int:
        return i * self.tn + j

    @property
    def double_buffered(self) -> bool:
        """Room for two operand sets (1x2, 2x1, 1x1): consecutive k steps load into
        alternate tile registers, so a load never waits for the previous step's reads."""
        return 2 * (self.tm + self.tn) <= 8 - self.n_acc

    def emit_k_step(self, a_ptr, a_stride, b_ptr, m_ok, n_ok, phase: int = 0) -> None:
        """One 64-deep step of every accumulator.

        ``a_ptr(i)`` / ``b_ptr(j)``: pointers to tile i's A rows / tile j's B block;
        ``m_ok(i)`` / ``n_ok(j)``: None (valid) or a condition guarding the tile;
        ``phase``: which operand set (double-buffered blockings alternate).
        """
        free = list(range(self.n_acc, 8))

        def dot(i, j, a, b):
            _intrin("llvm.x86.tdpbusd", T.int8(self.acc(i, j)), T.int8(a), T.int8(b))

        if self.double_buffered:
            base = self.n_acc + phase * (self.tm + self.tn)
            free = list(range(base, base + self.tm + self.tn))
        if self.tn + 1 <= len(free):  # B resident, A rotating
            b_slots, a_slots = free[:self.tn], free[self.tn:]
            for j in range(self.tn):
                _when(n_ok(j), lambda j=j: _load(b_slots[j], b_ptr(j), TILE_K))
            for i in range(self.tm):
                a = a_slots[i % len(a_slots)]

                def row(i=i, a=a):
                    _load(a, a_ptr(i), a_stride)
                    for j in range(self.tn):
                        _when(n_ok(j), lambda j=j: dot(i, j, a, b_slots[j]))

                _when(m_ok(i), row)
        else:  # A resident, B rotating
            a_slots, b_slots = free[:self.tm], free[self.tm:]
            for i in range(self.tm):
                _when(m_ok(i), lambda i=i: _load(a_slots[i], a_ptr(i), a_stride))
            for j in range(self.tn):
                b = b_slots[j % len(b_slots)]

                def col(j=j, b=b):
                    _load(b, b_ptr(j), TILE_K)
                    for i in range(self.tm):
                        _when(m_ok(i), lambda i=i: dot(i, j, a_slots[i], b))

                _when(n_ok(j), col)


def default_blocking(m_tiles, n_tiles: int) -> Blocking:
    """2x2 where both sides have 2+ tiles; one M tile (small batch): 1x2; one N tile: 4x1;
    few M tiles (e.g. 7x7 maps) with many N tiles: all M tiles in one block (4x1 / 3x1),
    so every weight tile is loaded once."""
    m_static = m_tiles if isinstance(m_tiles, int) else None
    if m_static == 1:
        return Blocking(1, 2 if n_tiles >= 2 else 1)
    if n_tiles == 1:
        return Blocking(4, 1)
    if m_static is not None and m_static in (3, 4) and n_tiles >= 8:
        return Blocking(m_static, 1)
    return Blocking(2, 2)


# --- requantization ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ResidualAdd:
    """A conv's requantized output added to a residual tensor in the epilogue: the
    reference ``conv2d`` then ``add``, in registers (no int8 round trip through memory, no
    second kernel)::

        q   = conv.int_value(acc)                               (the conv's own output)
        sum = (q - a_zp) * a_mult + (res[index] - b_zp) * b_mult        (int32, exact)
        out = requant(sum, multiplier)                          (``out``: the add's)

    ``conv`` and ``res`` (the residual buffer, indexed like the output: ``[pixel, channel]``
    rows) are filled in by :func:`conv2d_amx`; callers give the rest. The
    integer sum is exact in int32 for 8-bit inputs (``|mult| <= 2^14``), as the reference's
    int64 one; ``float32(sum)`` is then the same value.
    """

    a_zp: int
    a_mult: int
    b_zp: int
    b_mult: int
    multiplier: float
    out: Requant
    conv: Requant | None = None
    res: object = None

    @property
    def out_dtype(self) -> str:
        return self.out.out_dtype

    def apply(self, acc, mult, lanes: int, index):
        i32 = _vec("int32", lanes)
        q = self.conv.int_value(acc, mult, lanes)
        r = T.Cast(i32, self.res[tuple(index)])
        total = ((q - _const(self.a_zp, "int32", lanes)) * _const(self.a_mult, "int32", lanes)
                 + (r - _const(self.b_zp, "int32", lanes)) * _const(self.b_mult, "int32", lanes))
        return self.out.value(total, _const(self.multiplier, "float32", lanes), lanes)


def _epilogue_row(rq, scratch, half, acc: int, r, o0, n_out: int, mult_p, out,
                  prefix) -> None:
    """Requantize row r of accumulator tile ``acc`` (``scratch[half, acc]``, bias included)
    into ``out[*prefix, o0 : o0+16]``: one 16-lane vector, or scalars for a tile past
    ``n_out``. ``rq``: a :class:`Requant` or a :class:`ResidualAdd`."""

    def vector():
        index = [*prefix, T.ramp(o0, 1, TILE_N)]
        v = rq.apply(scratch[half, acc, r, T.ramp(0, 1, TILE_N)],
                     mult_p[T.ramp(o0, 1, TILE_N)], TILE_N, index)
        T.buffer_store(out, v, index)

    if n_out % TILE_N == 0:
        vector()
        return
    with T.If(o0 + TILE_N <= n_out):
        with T.Then():
            vector()
        with T.Else():
            with T.serial(0, TILE_N) as c:
                _when(o0 + c < n_out, lambda: T.buffer_store(
                    out, rq.apply(scratch[half, acc, r, c], mult_p[o0 + c], 1,
                                  [*prefix, o0 + c]), [*prefix, o0 + c]))


# --- the blocked GEMM --------------------------------------------------------------------


def _padded_vec(src, n: int, dtype: str):
    """An internal ``[ceil(n/16)*16]`` copy of ``src`` (zeros after n): whole 16-lane loads
    and a bias tile for the last, partial channel tile."""
    n_pad = _ceil_div(n, TILE_N) * TILE_N
    buf = T.alloc_buffer((n_pad,), dtype, align=64)
    with T.serial(0, n_pad) as i:
        T.buffer_store(buf, T.if_then_else(i < n, src[tirx.min(i, n - 1)], tirx.const(0, dtype)),
                       [i])
    return buf


#: Weights above this are streamed once per task (n_outer block order); smaller ones are
#: re-read from L2 by every task and block row (m_outer: no output cache line is written by
#: two threads).
N_OUTER_MIN_WEIGHT_BYTES = 1 << 20


def _ask_tile_permission():
    """``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` as a TIR call: 0 when this
    process may use the tile registers (idempotent; +0.3-0.9 us per kernel call, measured
    interleaved against kernels without it on an Emerald Rapids VM)."""
    return T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL),
                         T.int64(_ARCH_REQ_XCOMP_PERM), T.int64(_XFEATURE_XTILEDATA))


#: The error of a kernel whose process Linux refused the tile state.
PERMISSION_REFUSED = ("AMX: Linux refused this process the tile-data state "
                      "(arch_prctl(ARCH_REQ_XCOMP_PERM) failed: no AMX, or Linux < 5.16); "
                      "compile for 'x86-avx512-vnni'")


def _gemm(**kw) -> None:
    """:func:`_gemm_body`, after asking Linux for the tile state: every AMX kernel asks for
    it on each call, so a module works in any process that loads it (a TVM RPC server, C++
    through the TVM runtime), not only where ``CompiledModule`` asked first; a refusal is a
    TVM error naming it instead of a SIGILL at the first tile instruction."""
    with T.Assert(_ask_tile_permission() == T.int64(0), PERMISSION_REFUSED):
        _gemm_body(**kw)


def _gemm_body(*, m_tiles, n_out: int, blk: Blocking, k_loops, a_ptr, a_stride, b_ptr, corr, mult,
          rq: Requant, row_out, weight_bytes: int, group: int = 4, parallel: bool = True,
          order: str | None = None) -> None:
    """The parallel blocked AMX GEMM with its fused requantization.

    Args:
        m_tiles: number of 16-row M tiles (int, or an expression of the batch var).
        k_loops: extents of the reduction loop nest (dense ``[K/64]``, conv ``[R, S, C/64]``).
        a_ptr(q, ks) / b_ptr(nt, ks): pointers of M tile q's / N tile nt's 64-deep step
            ``ks`` (the reduction loop vars); ``a_stride``: bytes between A rows.
        row_out(q): for M tile q, ``r -> (cond, out_buffer, index_prefix)``: where its
            row r goes, if cond (per-row work should be cheap: no division by a variable).
        group: blocks per parallel iteration, software-pipelined: block u's accumulators are
            stored, then block u-1 is requantized while the tile unit works on block u (tile
            registers are not renamed: without this the AMX unit idles through every
            epilogue and every store-to-reload turnaround).
        order: ``"n_outer"``: consecutive blocks (and each task's contiguous share) keep the
            same weight panel, which is streamed once per task; ``"m_outer"``: tasks split
            the output rows, and every task reads all the weights. None: n_outer for weights
            over ``N_OUTER_MIN_WEIGHT_BYTES``. With small N, n_outer makes two threads write
            the two halves of the same output cache lines (64 channels: every line): a 3x3
            conv 64->64 ran no faster on 2 threads than on 1.
    """
    nt = _ceil_div(n_out, TILE_N)
    m_blocks = _ceil_div(m_tiles, blk.tm)
    n_blocks = _ceil_div(nt, blk.tn)
    extent = n_blocks * m_blocks
    # (a corr already padded to whole tiles is used in place: matmul_amx's differs per task)
    corr_p = corr if tuple(corr.shape) == (nt * TILE_N,) else _padded_vec(corr, n_out, "int32")
    mult_p = _padded_vec(mult, n_out, "float32")
    cfg = T.alloc_buffer((16,), "int32", align=64)
    _write_tile_config(cfg)
    tiles = list(itertools.product(range(blk.tm), range(blk.tn)))
    static_m = isinstance(m_tiles, int) and m_tiles % blk.tm == 0

    if order is None:
        order = "n_outer" if weight_bytes > N_OUTER_MIN_WEIGHT_BYTES else "m_outer"

    def coords(t):
        if order == "n_outer":
            nb, mb = tirx.floordiv(t, m_blocks), tirx.floormod(t, m_blocks)
        else:
            mb, nb = tirx.floordiv(t, n_blocks), tirx.floormod(t, n_blocks)
        qs = [mb * blk.tm + i for i in range(blk.tm)]
        ns = [nb * blk.tn + j for j in range(blk.tn)]
        m_ok = [None if static_m else q < m_tiles for q in qs]
        n_ok = [None if nt % blk.tn == 0 else n < nt for n in ns]
        return qs, ns, m_ok, n_ok

    def compute(t, scratch, half):
        """Bias, reduction and tilestored of block t into ``scratch[half]``."""
        qs, ns, m_ok, n_ok = coords(t)
        for i, j in tiles:
            _when(_all(m_ok[i], n_ok[j]), lambda i=i, j=j: _load(
                blk.acc(i, j), _ptr(corr_p, [ns[j] * TILE_N]), 0))

        def reduction(guarded: bool):
            def step(ks, phase=0):
                blk.emit_k_step(lambda i: a_ptr(qs[i], ks), a_stride, lambda j: b_ptr(ns[j], ks),
                                (lambda i: m_ok[i]) if guarded else (lambda i: None),
                                (lambda j: n_ok[j]) if guarded else (lambda j: None), phase)

            if not blk.double_buffered:
                with _Frames([T.serial(0, e) for e in k_loops]) as ks:
                    step(ks)
                return
            # one flat loop over all steps, two steps (operand sets 0 and 1) per iteration
            total = int(np.prod(k_loops))

            def split(flat):
                ks = []
                for e in reversed(k_loops):
                    ks.append(tirx.floormod(flat, e) if e > 1 else 0)
                    flat = tirx.floordiv(flat, e) if e > 1 else flat
                return ks[::-1]

            if total // 2:
                with T.serial(0, total // 2) as kk:
                    step(split(2 * kk), 0)
                    step(split(2 * kk + 1), 1)
            if total % 2:
                step(split(total - 1), 0)

        all_ok = _all(m_ok[-1], n_ok[-1])
        if all_ok is None:
            reduction(False)
        else:  # edge blocks only pay the per-tile branches
            with T.If(all_ok):
                with T.Then():
                    reduction(False)
                with T.Else():
                    reduction(True)
        for i, j in tiles:
            acc = blk.acc(i, j)
            _when(_all(m_ok[i], n_ok[j]), lambda acc=acc: _intrin(
                "llvm.x86.tilestored64", T.int8(acc), _store_ptr(scratch, [half, acc, 0, 0]),
                T.int64(TILE_N * 4)))

    def finish(t, scratch, half):
        """Requantize block t from ``scratch[half]``: row by row of each M tile, every N
        tile of the row (the row's output address is computed once for all of them)."""
        qs, ns, m_ok, n_ok = coords(t)
        for i in range(blk.tm):
            def rows(i=i):
                row = row_out(qs[i])
                with T.serial(0, TILE_M) as r:
                    cond, out, prefix = row(r)

                    def each_n():
                        for j in range(blk.tn):
                            _when(n_ok[j], lambda j=j: _epilogue_row(
                                rq, scratch, half, blk.acc(i, j), r, ns[j] * TILE_N, n_out,
                                mult_p, out, prefix))

                    _when(cond, each_n)

            _when(m_ok[i], rows)

    g = group if not isinstance(extent, int) else max(1, min(group, extent // 2))
    n_groups = _ceil_div(extent, g)

    def iteration(it):
        # Per-iteration scratch (8 KiB for 2x2: a TVMBackendAllocWorkspace per iteration),
        # private to the task inside the parallel loop. Scope "local" keeps StorageRewrite
        # from placing it in a "global" buffer of the function that is dead by then or, as
        # seen in a parallel loop, still being read by other iterations (x_enc).
        scratch = T.alloc_buffer((2, blk.n_acc, TILE_M, TILE_N), "int32", scope="local",
                                 align=64)
        if g == 1:
            compute(it, scratch, 0)
            finish(it, scratch, 0)
            return
        with T.serial(0, g + 1) as u:
            t = it * g + u
            _when(_all(u < g, t < extent), lambda: compute(t, scratch, tirx.floormod(u, 2)))
            _when(_all(u > 0, t - 1 < extent),
                  lambda: finish(t - 1, scratch, tirx.floormod(u - 1, 2)))

    def task(loop):
        _intrin("llvm.x86.ldtilecfg", T.address_of(cfg[0]))
        with loop as it:
            iteration(it)
        _intrin("llvm.x86.tilerelease")

    if not parallel or (isinstance(n_groups, int) and n_groups == 1):
        # Serial (parallel=False), or one iteration: no parallel loop (TVM drops a one-iteration loop, and then refuses a
        # launch point without one: "Cannot find parallel loop within parallel launch").
        task(T.serial(0, n_groups))
        return
    # The attr's body runs once per pool task and the T.parallel loop inside it is split
    # among the tasks. Buffers allocated between the two would be hoisted out by
    # StorageRewrite and shared by all tasks: cfg is read-only here, the scratch lives in the
    # loop body.
    with T.attr(0, "pragma_parallel_launch_point", 0):
        task(T.parallel(0, n_groups))


# --- encoding ----------------------------------------------------------------------------


def _encode(v, in_dtype: str, shift: int):
    """``uint8(v + shift)``: a sign-bit flip for int8 (shift 128), a copy for uint8."""
    if (in_dtype, shift) == ("int8", 128):
        return T.reinterpret("uint8", v) ^ T.uint8(0x80)
    if (in_dtype, shift) == ("uint8", 0):
        return v
    raise ValueError(f"AMX kernels take int8 inputs with shift 128 or uint8 with shift 0, "
                     f"got {in_dtype} with shift {shift}")


def _copy(n: int, store, load, lanes: int = 64) -> None:
    """``store(k, load(k))`` for k in [0, n): ``lanes``-wide vectors, then one tail vector."""
    if n >= lanes:
        with T.serial(0, n // lanes) as kv:
            with T.vectorized(0, lanes) as kl:
                store(kv * lanes + kl, load(kv * lanes + kl))
    if n % lanes:
        base = n // lanes * lanes
        with T.vectorized(0, n % lanes) as kl:
            store(base + kl, load(base + kl))


def _fill(n: int, store, value) -> None:
    if n:
        _copy(n, lambda k, v: store(k, v), lambda k: value)


# --- dense -------------------------------------------------------------------------------


def dense_amx(m, k_in: int, n_out: int, *, in_dtype: str, shift: int, out_zp: int, qmin: int,
              qmax: int, out_dtype: str, blocking=None, group: int = 4,
              parallel: bool = True, order: str | None = None,
              per_token: bool = False) -> tirx.PrimFunc:
    """Requantized int8 linear layer on AMX.

    PrimFunc params (in order):
        x: ``[m, k_in]`` ``in_dtype`` (int8 / uint8); ``m`` an int, or None for a symbolic
            ``int64`` batch (the buffer's first dim is a ``T.int64()`` var).
        w_packed: int8 ``[ceil(n_out/16), ceil(k_in/64)*16, 16, 4]`` = :func:`pack_dense_amx`
            (``packing.pack_dense(w, 16, 4)`` with K zero-padded to a multiple of 64).
        corr: int32 ``[n_out]`` (``packing.correction(w, bias, zp_enc)``).
        mult: float32 ``[n_out]``.
        out: ``[m, n_out]`` ``out_dtype``.
    ``blocking``: a :class:`Blocking` or ``(tm, tn)``; None: :func:`default_blocking`.
    ``per_token``: the epilogue of ``ptq.linear_dynamic`` (:class:`TokenDequant`, float32
        out, ``mult`` the weight scales): two more params before ``out``, ``params [m, 3]``
        float32 (``kernels/token.py`` layout) and ``colsum [n_out]`` int32.
    ``group``: output blocks per parallel iteration, software-pipelined (see ``_gemm``).
    ``parallel``: False builds a single-threaded kernel (no thread-pool launch; small kernels
    measured faster that way with 2 pool threads). ``order``: block order (see ``_gemm``).
    """
    m = _batch_dim(m, "m")
    kb = _ceil_div(k_in, TILE_K)
    nt = _ceil_div(n_out, TILE_N)
    mt = _ceil_div(m, TILE_M)
    blk = _as_blocking(blocking, mt, nt)
    rq = Requant(out_zp, qmin, qmax, out_dtype)

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((m, k_in), in_dtype))
            w = T.arg("w_packed", T.buffer((nt, kb * 16, 16, 4), "int8"))
            corr = T.arg("corr", T.buffer((n_out,), "int32"))
            mult = T.arg("mult", T.buffer((n_out,), "float32"))
            if per_token:
                rq = TokenDequant(T.arg("params", T.buffer((m, 3), "float32")),
                                  T.arg("colsum", T.buffer((n_out,), "int32")))
            out = T.arg("out", T.buffer((m, n_out), out_dtype))
            T.func_attr(_FUNC_ATTRS)

            # x_enc in A-tile order [mt, kb, 16, 64] (each A tile one contiguous KiB, the
            # k steps of a row tile adjacent); padded rows and k are zeros.
            xe = T.alloc_buffer((mt, kb, TILE_M, TILE_K), "uint8", align=64)
            with _outer_loop(mt, parallel) as rt:
                with T.serial(0, TILE_M) as ri:
                    r = rt * TILE_M + ri
                    _encode_row(xe, rt, ri, r < m, lambda k, r=r: _encode(x[r, k], in_dtype,
                                                                          shift), k_in)

            def row_out(q):
                exact = isinstance(m, int) and m % TILE_M == 0
                return lambda r: ((None if exact else q * TILE_M + r < m), out, [q * TILE_M + r])

            _gemm(m_tiles=mt, n_out=n_out, blk=blk, k_loops=[kb],
                  a_ptr=lambda q, ks: _ptr(xe, [q, ks[0], 0, 0]), a_stride=TILE_K,
                  b_ptr=lambda j, ks: _ptr(w, [j, ks[0] * 16, 0, 0]),
                  corr=corr, mult=mult, rq=rq, row_out=row_out, group=group,
                  parallel=parallel, order=order, weight_bytes=nt * kb * 1024)
    return ib.get()


def _as_blocking(blocking, m_tiles, n_tiles) -> Blocking:
    if blocking is None:
        return default_blocking(m_tiles, n_tiles)
    return blocking if isinstance(blocking, Blocking) else Blocking(*blocking)


# --- conv2d ------------------------------------------------------------------------------


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvPlan:
    """How :func:`conv2d_amx` maps one conv onto tiles (and what the weight packing needs).

    mode:
        ``"im2col"``: the encode pass gathers GEMM rows ``[n*oh*ow (padded to 16),
        ceil(R*S*C/64)*64]`` with ``k = (r*S + s)*C + c``; the conv is then a dense.
        Weights ``[ceil(O/16), ceil(R*S*C/64)*16, 16, 4]``; for 1x1 convs (the default
        there) the same bytes as ``pack_conv``'s ``[ceil(O/16), 1, 1, ceil(C/64)*16, 16, 4]``,
        which is the shape used.
        ``"direct"``: implicit GEMM on the padded NHWC image, A tiles loaded in place.
    fold (direct): the reduction of one kernel row is ``(s, c)`` folded into 64-byte steps,
        ``k = s*C + c``: an A row is the ``S*C`` consecutive bytes of S adjacent pixels.
        Weights ``[ceil(O/16), R, ceil(S*C/64)*16, 16, 4]``. Otherwise
        ``[ceil(O/16), R, S, ceil(C/64)*16, 16, 4]`` = ``pack_conv`` with C padded to 64.
    flat (direct, stride 1): M runs over the padded-width pixel grid ``j = y*wp + x``: input
        pixel ``j + r*dh*wp + s*dw`` is linear in j, so a tile may span output rows and
        small maps fill whole tiles (7x7: 4 tiles instead of 7); columns ``x >= ow`` are
        computed and dropped. Otherwise (``rows``) a tile is 16 pixels of one output row,
        and the tiles of a block lie on consecutive output rows.
    """

    h: int
    w: int
    c_in: int
    c_out: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    mode: str
    fold: bool = False
    flat: bool = False

    @property
    def oh(self) -> int:
        return conv_out_size(self.h, self.kh, self.sh, self.ph, self.dh)

    @property
    def ow(self) -> int:
        return conv_out_size(self.w, self.kw, self.sw, self.pw, self.dw)

    @property
    def n_tiles(self) -> int:
        return _ceil_div(self.c_out, TILE_N)

    @property
    def cp(self) -> int:
        """Bytes per pixel of the padded image (C padded to 64 for direct unfolded)."""
        if self.mode == "im2col" or self.fold:
            return self.c_in
        return _ceil_div(self.c_in, TILE_K) * TILE_K

    @property
    def wp(self) -> int:
        return self.w + 2 * self.pw

    @property
    def hp(self) -> int:
        return self.h + 2 * self.ph

    @property
    def k_steps(self) -> int:
        """64-deep steps: in total (im2col), per kernel row (fold), per (r, s) (direct)."""
        per = {"im2col": self.kh * self.kw * self.c_in}.get(
            self.mode, self.kw * self.c_in if self.fold else self.c_in)
        return _ceil_div(per, TILE_K)

    @property
    def weight_shape(self) -> tuple:
        if self.mode == "im2col" and (self.kh, self.kw) != (1, 1):
            return (self.n_tiles, self.k_steps * 16, 16, 4)
        if self.fold:
            return (self.n_tiles, self.kh, self.k_steps * 16, 16, 4)
        return (self.n_tiles, self.kh, self.kw, self.k_steps * 16, 16, 4)

    def m_tiles_per_image(self) -> int:
        """M tiles of one image (direct modes)."""
        if self.flat:
            return _ceil_div(self.oh * self.wp, TILE_M)
        return _ceil_div(self.ow, TILE_M) * self.oh

    @property
    def image_bytes(self) -> int:
        return self.hp * self.wp * self.cp

    @property
    def slack_bytes(self) -> int:
        """Bytes after the last padded image that loads for dropped pixels may touch."""
        if self.flat:
            start = self.m_tiles_per_image() * TILE_M - 1 + (self.kh - 1) * self.dh * self.wp
        else:
            start = (((self.oh - 1) * self.sh + (self.kh - 1) * self.dh) * self.wp
                     + (_ceil_div(self.ow, TILE_M) * TILE_M - 1) * self.sw)
        if self.fold:
            end = start * self.cp + self.k_steps * TILE_K
        else:
            end = (start + (self.kw - 1) * self.dw + 1) * self.cp
        return max(0, end - self.image_bytes)


def conv_plan(h: int, w: int, c_in: int, c_out: int, kernel, stride, padding, dilation, *,
              mode: str | None = None, fold: bool | None = None,
              flat: bool | None = None) -> ConvPlan:
    """The tile mapping of a conv; None picks: im2col for 1x1 convs (a gather of the strided
    pixels, then a dense); else direct, folded where that needs fewer 64-deep steps (C < 64:
    the RGB stem takes 7 steps instead of 49), flat (stride 1) where that needs fewer tiles.

    Measured (one core): the stem's im2col copy of 12544 x 192 bytes cost more than the
    steps it saves: direct folded 0.29 ms, im2col 0.45 ms, direct unfolded 1.5 ms."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(kernel), _pair(stride), _pair(padding),
                                              _pair(dilation))
    base = dict(h=h, w=w, c_in=c_in, c_out=c_out, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw,
                dh=dh, dw=dw)
    if mode is None:
        mode = "im2col" if (kh, kw) == (1, 1) else "direct"
    if mode == "im2col":
        return ConvPlan(**base, mode="im2col")
    if mode != "direct":
        raise ValueError(f"unknown conv mode {mode!r}")
    if fold is None:
        fold = dw == 1 and _ceil_div(kw * c_in, TILE_K) < kw * _ceil_div(c_in, TILE_K)
    if fold and dw != 1:
        raise ValueError("folding (s, c) into K needs dilation_w == 1")
    if flat is None:
        flat = (sh, sw) == (1, 1) and (
            ConvPlan(**base, mode=mode, fold=fold, flat=True).m_tiles_per_image()
            < ConvPlan(**base, mode=mode, fold=fold, flat=False).m_tiles_per_image())
    if flat and (sh, sw) != (1, 1):
        raise ValueError("the flat pixel grid needs stride 1")
    return ConvPlan(**base, mode=mode, fold=fold, flat=flat)


def conv2d_amx(n, h: int, w: int, c_in: int, c_out: int, kernel, stride, padding, dilation, *,
               in_dtype: str, shift: int, zp_enc: int, out_zp: int, qmin: int, qmax: int,
               out_dtype: str, blocking=None, mode: str | None = None,
               fold: bool | None = None, flat: bool | None = None,
               group: int = 4, parallel: bool = True,
               order: str | None = None, residual: ResidualAdd | None = None,
               res_dtype: str = "int8") -> tirx.PrimFunc:
    """Requantized int8 NHWC conv2d (groups == 1) on AMX; with ``residual``, followed in the
    epilogue by the ``add`` of a residual tensor (``res``, ``res_dtype``).

    PrimFunc params (in order):
        x: NHWC ``[n, h, w, c_in]`` ``in_dtype``; ``n`` an int or None (symbolic ``int64``).
        w_packed: int8 ``plan.weight_shape`` = :func:`pack_conv_amx` (weight, plan) with
            ``plan = conv_plan(h, w, c_in, c_out, kernel, stride, padding, dilation,
            mode=..., fold=..., flat=...)`` (the same options as here). Direct unfolded:
            ``[ceil(O/16), R, S, ceil(C/64)*16, 16, 4]`` = ``pack_conv`` with C padded to 64.
        corr: int32 ``[c_out]`` (``correction(w, bias, zp_enc)``); mult: float32 ``[c_out]``.
        res (with ``residual`` only): NHWC ``[n, oh, ow, c_out]`` ``res_dtype``.
        out: NHWC ``[n, oh, ow, c_out]`` ``out_dtype`` (``residual.out_dtype`` with one).
    Padding holds ``zp_enc`` (the encoded input zero point). See :class:`ConvPlan` for
    ``mode`` / ``fold`` / ``flat``.
    """
    nb_ = _batch_dim(n, "n")
    p = conv_plan(h, w, c_in, c_out, kernel, stride, padding, dilation, mode=mode, fold=fold,
                  flat=flat)
    oh, ow = p.oh, p.ow
    rq = Requant(out_zp, qmin, qmax, out_dtype)

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((nb_, h, w, c_in), in_dtype))
            wt = T.arg("w_packed", T.buffer(p.weight_shape, "int8"))
            corr = T.arg("corr", T.buffer((c_out,), "int32"))
            mult = T.arg("mult", T.buffer((c_out,), "float32"))
            res = None if residual is None else T.arg(
                "res", T.buffer((nb_, oh, ow, c_out), res_dtype))
            final_dtype = out_dtype if residual is None else residual.out_dtype
            out = T.arg("out", T.buffer((nb_, oh, ow, c_out), final_dtype))
            T.func_attr(_FUNC_ATTRS)

            # The output (and residual) as [pixel, channel] rows: the epilogue writes row r
            # of an M tile at one flat pixel index (1x1 convs: the GEMM row itself).
            rows = T.decl_buffer((nb_ * oh * ow, c_out), final_dtype, data=out.data)
            if residual is not None:
                res_rows = T.decl_buffer((nb_ * oh * ow, c_out), res_dtype, data=res.data)
                rq = dataclasses.replace(residual, conv=rq, res=res_rows)
            common = dict(n_out=c_out, corr=corr, mult=mult, rq=rq, group=group,
                          parallel=parallel, order=order,
                          weight_bytes=int(np.prod(p.weight_shape)))
            if p.mode == "im2col":
                _conv_im2col(p, nb_, x, wt, rows, in_dtype, shift, zp_enc, blocking, common)
            else:
                _conv_direct(p, nb_, x, wt, rows, in_dtype, shift, zp_enc, blocking, common)
    return ib.get()


def _padded_image(p: ConvPlan, x, nb_, in_dtype: str, shift: int, zp_enc: int,
                  parallel: bool):
    """The encoded, padded NHWC input, flat: image b at ``b * image_bytes``, pixel (yy, xx)
    at ``(yy * wp + xx) * cp``; border pixels ``zp_enc``, channels past C zeros (zero
    weights), then ``slack_bytes`` zeros. Parallel over (image, row)."""
    cp, wp, img = p.cp, p.wp, p.image_bytes
    row_bytes = wp * cp
    slack = p.slack_bytes if p.mode == "direct" else 0
    xp = T.alloc_buffer((nb_ * img + slack,), "uint8", align=64)
    pad = T.uint8(zp_enc)
    with _outer_loop(nb_ * p.hp, parallel) as by:
        b, yy = tirx.floordiv(by, p.hp), tirx.floormod(by, p.hp)
        row = b * img + yy * row_bytes

        def fill(start, count, value):
            _fill(count, lambda k, v: T.buffer_store(xp, v, [start + k]), value)

        with T.If(tirx.all(yy >= p.ph, yy < p.ph + p.h)):
            with T.Then():
                fill(row, p.pw * cp, pad)
                src = yy - p.ph
                if cp == p.c_in:  # the interior of the row is one contiguous run
                    _copy(p.w * cp, lambda k, v: T.buffer_store(xp, v, [row + p.pw * cp + k]),
                          lambda k: _encode(x[b, src, tirx.floordiv(k, cp), tirx.floormod(k, cp)],
                                            in_dtype, shift))
                else:
                    with T.serial(0, p.w) as xx:
                        px = row + (p.pw + xx) * cp
                        _copy(p.c_in, lambda c, v: T.buffer_store(xp, v, [px + c]),
                              lambda c: _encode(x[b, src, xx, c], in_dtype, shift))
                        fill(px + p.c_in, cp - p.c_in, T.uint8(0))
                fill(row + (p.pw + p.w) * cp, p.pw * cp, pad)
            with T.Else():
                fill(row, row_bytes, pad)
    if slack:
        fill_start = nb_ * img
        _fill(slack, lambda k, v: T.buffer_store(xp, v, [fill_start + k]), T.uint8(0))
    return xp


def _conv_direct(p: ConvPlan, nb_, x, wt, out, in_dtype, shift, zp_enc, blocking, common):
    """Implicit GEMM: A tiles read in place from the padded image, row stride ``sw * cp``.
    ``out``: the output as ``[n * oh * ow, c_out]`` rows."""
    cp, wp, oh, ow = p.cp, p.wp, p.oh, p.ow
    xp = _padded_image(p, x, nb_, in_dtype, shift, zp_enc, common["parallel"])
    per_img = p.m_tiles_per_image()
    m_tiles = nb_ * per_img
    if blocking is None and p.fold and p.n_tiles >= 4:
        # folded A tiles are unaligned, overlapping rows (stride sw*C bytes): load each
        # once for four N tiles (stem: 1x4 0.29 ms, 2x2 0.33 ms)
        blocking = Blocking(1, 4)
    blk = _as_blocking(blocking, m_tiles if isinstance(nb_, int) else None, p.n_tiles)

    def where(q):
        """(image, start pixel of the tile in the padded image, output mapping of row r)."""
        b, qq = tirx.floordiv(q, per_img), tirx.floormod(q, per_img)
        if p.flat:
            j0 = qq * TILE_M
            y0, x0 = tirx.floordiv(j0, wp), tirx.floormod(j0, wp)

            def row(r):  # pixel j0 + r of the (oh x wp) grid, without a per-row floordiv
                dy = tirx.truncdiv(x0 + r, wp)
                y, xo = y0 + dy, x0 + r - dy * wp
                return tirx.all(y < oh, xo < ow), [(b * oh + y) * ow + xo]

            return b, j0, row
        # rows: q = (x tile, y) with y fastest, so a block's tiles are consecutive rows
        xtile, y = tirx.floordiv(qq, oh), tirx.floormod(qq, oh)
        x0 = xtile * TILE_M

        def row(r):
            return (None if ow % TILE_M == 0 else x0 + r < ow), [(b * oh + y) * ow + x0 + r]

        return b, y * p.sh * wp + x0 * p.sw, row

    if p.fold:
        k_loops = [p.kh, p.k_steps]

        def a_ptr(q, ks):
            b, start, _ = where(q)
            return _ptr(xp, [b * p.image_bytes + (start + ks[0] * p.dh * wp) * cp
                             + ks[1] * TILE_K])

        def b_ptr(j, ks):
            return _ptr(wt, [j, ks[0], ks[1] * 16, 0, 0])
    else:
        k_loops = [p.kh, p.kw, p.k_steps]

        def a_ptr(q, ks):
            b, start, _ = where(q)
            r, s, cc = ks
            return _ptr(xp, [b * p.image_bytes + (start + r * p.dh * wp + s * p.dw) * cp
                             + cc * TILE_K])

        def b_ptr(j, ks):
            return _ptr(wt, [j, ks[0], ks[1], ks[2] * 16, 0, 0])

    def row_out(q):
        row = where(q)[2]

        def at(r):
            cond, idx = row(r)
            return cond, out, idx

        return at

    _gemm(m_tiles=m_tiles, blk=blk, k_loops=k_loops, a_ptr=a_ptr, a_stride=p.sw * cp,
          b_ptr=b_ptr, row_out=row_out, **common)


def _conv_im2col(p: ConvPlan, nb_, x, wt, out, in_dtype, shift, zp_enc, blocking, common):
    """Gather GEMM rows (one per output pixel, ``k = (r*S + s)*C + c``), then a dense."""
    oh, ow, c = p.oh, p.ow, p.c_in
    pixels = nb_ * oh * ow
    mt = _ceil_div(pixels, TILE_M)
    kp = p.k_steps * TILE_K
    run = p.kw * c if p.dw == 1 else c  # contiguous bytes per copy
    padded = p.ph or p.pw
    parallel = common["parallel"]
    src = _padded_image(p, x, nb_, in_dtype, shift, zp_enc, parallel) if padded else None
    xe = T.alloc_buffer((mt * TILE_M, kp), "uint8", align=64)
    with _outer_loop(mt, parallel) as rt:
        with T.serial(0, TILE_M) as ri:
            m = rt * TILE_M + ri
            b = tirx.floordiv(m, oh * ow)
            y, xo = tirx.floordiv(tirx.floormod(m, oh * ow), ow), tirx.floormod(m, ow)
            with T.If(m < pixels):
                with T.Then():
                    with T.serial(0, p.kh) as r:
                        for s in range(1 if p.dw == 1 else p.kw):
                            k0 = (r * p.kw + s) * c
                            iy, ix = y * p.sh + r * p.dh, xo * p.sw + s * p.dw
                            if padded:
                                base = b * p.image_bytes + (iy * p.wp + ix) * c
                                _copy(run, lambda k, v, k0=k0: T.buffer_store(xe, v, [m, k0 + k]),
                                      lambda k, base=base: src[base + k])
                            else:  # no padding: straight from x (1x1 convs), encoded here
                                _copy(run, lambda k, v, k0=k0: T.buffer_store(xe, v, [m, k0 + k]),
                                      lambda k, iy=iy, ix=ix: _encode(
                                          x[b, iy, ix + tirx.floordiv(k, c),
                                            tirx.floormod(k, c)], in_dtype, shift))
                    k_used = p.kh * p.kw * c
                    _fill(kp - k_used, lambda k, v: T.buffer_store(xe, v, [m, k_used + k]),
                          T.uint8(0))
                with T.Else():
                    _fill(kp, lambda k, v: T.buffer_store(xe, v, [m, k]), T.uint8(0))

    def row_out(q):
        pix0 = q * TILE_M
        exact = isinstance(pixels, int) and pixels % TILE_M == 0

        def at(r):  # GEMM row = output pixel
            return (None if exact else pix0 + r < pixels), out, [pix0 + r]

        return at

    blk = _as_blocking(blocking, mt, p.n_tiles)
    _gemm(m_tiles=mt, blk=blk, k_loops=[p.k_steps],
          a_ptr=lambda q, ks: _ptr(xe, [q * TILE_M, ks[0] * TILE_K]), a_stride=kp,
          b_ptr=lambda j, ks: _ptr(wt, [j, *([0, 0] if len(wt.shape) == 6 else []),
                                        ks[0] * 16, 0, 0]),
          row_out=row_out, **common)


# --- matmul (activation x activation) ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class RowCorrected:
    """An epilogue whose int32 accumulator also lacks a per-row term: ``acc - zb *
    row_sum[row]`` (``ptq.matmul``'s ``b`` zero point times the row sums of the encoded
    ``a``), then ``out``'s requantization. ``row_sum`` is filled in by :func:`matmul_amx`;
    ``index`` is ``[batch, row, channels]``."""

    zb: int
    out: Requant
    row_sum: object = None

    @property
    def out_dtype(self) -> str:
        return self.out.out_dtype

    def apply(self, acc, mult, lanes: int, index):
        row = T.int32(-self.zb) * self.row_sum[index[1]]
        return self.out.value(acc + (row if lanes == 1 else T.broadcast(row, lanes)), mult,
                              lanes)


@dataclass(frozen=True, eq=False)
class TokenDequant:
    """The float output of ``ptq.linear_dynamic`` from the exact sum of per-token uint8 codes
    and int8 weights: ``((float32(acc) - float32(zp[row] * colsum)) * s[row]) * w_scale``
    (``kernels/token.py::token_epilogue``, the reference's operation order; no multiply
    feeds an add, so FMA contraction cannot change it). ``params`` (``[rows, 3]``: scale,
    inverse, zero point per row) and ``colsum`` (int32 ``[n_out]``) are filled in by
    :func:`dense_amx`; ``mult`` is the per-channel weight scale."""

    params: object = None
    colsum: object = None
    out_dtype: str = "float32"

    def apply(self, acc, mult, lanes: int, index):
        row, ch = index[0], index[-1]
        zp = T.Cast("int32", self.params[row, 2])
        s = self.params[row, 0]
        if lanes == 1:
            corr = T.Cast("float32", zp * self.colsum[ch])
            return ((T.Cast("float32", acc) - corr) * s) * mult
        corr = T.Cast(_vec("float32", lanes), T.broadcast(zp, lanes) * self.colsum[ch])
        return ((T.Cast(_vec("float32", lanes), acc) - corr) * T.broadcast(s, lanes)) * mult


class _Scalar:
    """A constant read like a buffer (``_padded_vec``'s source of a per-tensor multiplier)."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, _index):
        return self.value


#: Largest reduction ``matmul_amx`` takes: its int32 terms (``sum a'b'``, the two zero-point
#: products, ``K za zb``) each stay under ``K * 255 * 255``, and their sum must fit int32.
MATMUL_MAX_K = (2**31 - 1) // (4 * 255 * 255)


def matmul_amx(batch, m: int, k_in: int, n_out: int, *, a_dtype: str, b_dtype: str,
               a_zp: int, b_zp: int, multiplier: float, out_zp: int, qmin: int, qmax: int,
               out_dtype: str, blocking=None, parallel: bool = True) -> tirx.PrimFunc:
    """``ptq.matmul`` of two 8-bit activations on AMX, batched:
    ``out[t] = requant((a[t] - a_zp) @ (b[t] - b_zp))`` (the reference's exact int32 sum).

    PrimFunc params: ``a [batch, m, k_in]`` ``a_dtype``, ``b [batch, k_in, n_out]``
    ``b_dtype``, ``out [batch, m, n_out]`` ``out_dtype``; ``batch`` an int or None (a
    symbolic ``int64``). Per batch entry (the parallel loop): ``a`` encoded to uint8 in
    A-tile order (``a' = a`` or ``a ^ 0x80``, zero point ``za'``) with its row sums, ``b``
    packed to int8 B tiles (``b' = b`` or ``b ^ 0x80``, zero point ``zb'``) with its column
    sums, then the serial blocked GEMM of the dense kernels::

        sum_k (a - za)(b - zb) = sum_k a'b' - zb' rowsum(a') - za' colsum(b') + K za' zb'

    the last two terms as the bias tile, the row term in the epilogue (:class:`RowCorrected`).
    Padded K is zero on both sides, so it adds nothing.
    """
    if k_in > MATMUL_MAX_K:
        raise ValueError(f"matmul_amx takes K <= {MATMUL_MAX_K}, got {k_in}")
    bt = _batch_dim(batch, "batch")
    a_shift = 128 if a_dtype == "int8" else 0
    b_flip = b_dtype == "uint8"
    za, zb = a_zp + a_shift, b_zp - (128 if b_flip else 0)
    kb = _ceil_div(k_in, TILE_K)
    mt, nt = _ceil_div(m, TILE_M), _ceil_div(n_out, TILE_N)
    blk = _as_blocking(blocking, mt, nt)
    rq = RowCorrected(zb, Requant(out_zp, qmin, qmax, out_dtype))

    with IRBuilder() as ib:
        with T.prim_func():
            a = T.arg("a", T.buffer((bt, m, k_in), a_dtype))
            b = T.arg("b", T.buffer((bt, k_in, n_out), b_dtype))
            out = T.arg("out", T.buffer((bt, m, n_out), out_dtype))
            T.func_attr(_FUNC_ATTRS)
            with T.Assert(_ask_tile_permission() == T.int64(0), PERMISSION_REFUSED):
                with _outer_loop(bt, parallel) as t:
                    xe = T.alloc_buffer((mt, kb, TILE_M, TILE_K), "uint8", scope="local",
                                        align=64)
                    bp = T.alloc_buffer((nt, kb * 16, TILE_N, 4), "int8", scope="local",
                                        align=64)
                    sums = T.alloc_buffer((mt * TILE_M + nt * TILE_N,), "int32",
                                          scope="local", align=64)
                    row_sum = T.decl_buffer((mt * TILE_M,), "int32", data=sums.data)
                    corr = T.decl_buffer((nt * TILE_N,), "int32", data=sums.data,
                                         elem_offset=mt * TILE_M)
                    _matmul_encode_a(a, t, xe, row_sum, m, k_in, a_dtype, a_shift)
                    _matmul_pack_b(b, t, bp, corr, k_in, n_out, b_flip)
                    # the bias tile: K za' zb' - za' colsum(b')
                    with T.serial(0, nt) as j:
                        cols = T.ramp(j * TILE_N, 1, TILE_N)
                        T.buffer_store(corr, T.broadcast(T.int32(k_in * za * zb), TILE_N)
                                       - T.broadcast(T.int32(za), TILE_N) * corr[cols], [cols])

                    def row_out(q):
                        exact = m % TILE_M == 0
                        return lambda r: ((None if exact else q * TILE_M + r < m), out,
                                          [t, q * TILE_M + r])

                    _gemm_body(m_tiles=mt, n_out=n_out, blk=blk, k_loops=[kb],
                               a_ptr=lambda q, ks: _ptr(xe, [q, ks[0], 0, 0]), a_stride=TILE_K,
                               b_ptr=lambda j, ks: _ptr(bp, [j, ks[0] * 16, 0, 0]),
                               corr=corr, mult=_Scalar(f32(multiplier)),
                               rq=dataclasses.replace(rq, row_sum=row_sum), row_out=row_out,
                               weight_bytes=nt * kb * 1024, parallel=False)
    return ib.get()


def _encode_row(xe, q, ri, valid, load, k_in: int) -> None:
    """Row ``ri`` of A tile ``q`` of ``xe [tiles, K/64, 16, 64]``: ``load(k)`` (the encoded
    u8 activation) for k < K in 64-byte vectors, zeros past K, and all zeros where ``valid``
    is false (rows past M)."""
    kb = xe.shape[1]
    full, tail = divmod(k_in, TILE_K)

    def put(kc, lo, n, value):
        _copy(n, lambda l, v: T.buffer_store(xe, v, [q, kc, ri, lo + l]), value)

    with T.If(valid):
        with T.Then():
            if full:
                with T.serial(0, full) as kc:
                    put(kc, 0, TILE_K, lambda l, kc=kc: load(kc * TILE_K + l))
            if tail:
                put(full, 0, tail, lambda l: load(full * TILE_K + l))
                put(full, tail, TILE_K - tail, lambda l: T.uint8(0))
        with T.Else():
            with T.serial(0, kb) as kc:
                put(kc, 0, TILE_K, lambda l: T.uint8(0))


def _matmul_encode_a(a, t, xe, row_sum, m: int, k_in: int, a_dtype: str, a_shift: int):
    """``a[t]`` into A tiles (``_encode``; rows past m and k past K zero) and the int32 sums of
    the encoded rows, in 16-lane partials of each 64-byte step."""
    mt, kb = xe.shape[0], xe.shape[1]
    part = T.alloc_buffer((TILE_N,), "int32", scope="local", align=64)
    with T.serial(0, mt * TILE_M) as r:
        q, ri = tirx.floordiv(r, TILE_M), tirx.floormod(r, TILE_M)
        _encode_row(xe, q, ri, r < m, lambda k: _encode(a[t, r, k], a_dtype, a_shift), k_in)
        lanes = T.ramp(0, 1, TILE_N)
        T.buffer_store(part, T.broadcast(T.int32(0), TILE_N), [lanes])
        with T.serial(0, kb) as kc:
            for c in range(TILE_K // TILE_N):
                T.buffer_store(part, part[lanes] + T.Cast(
                    "int32x16", xe[q, kc, ri, T.ramp(c * TILE_N, 1, TILE_N)]), [lanes])
        T.buffer_store(row_sum, T.int32(0), [r])
        with T.serial(0, TILE_N) as c:
            T.buffer_store(row_sum, row_sum[r] + part[c], [r])


#: ``tirx.Shuffle`` indices interleaving four 16-byte rows (k = 4kq + d, 16 channels) into
#: one 64-byte B-tile row: lane ``4c + d`` takes row d's channel c.
_B_ROW = [(lane % 4) * TILE_N + lane // 4 for lane in range(TILE_K)]


def _matmul_pack_b(b, t, bp, colsum, k_in: int, n_out: int, flip: bool):
    """``b[t]`` (``[K, N]``) into int8 B tiles ``bp [N/16, K/4 (padded to 64), 16, 4]``
    (``b ^ 0x80`` for uint8: ``b - 128``) and the column sums of what was packed into
    ``colsum``. Whole 16-channel x 4-k groups are four row loads and one shuffle; the edges
    (and padding) element by element."""
    nt, kq_all = bp.shape[0], bp.shape[1]

    def val(v):
        if not flip:
            return v
        lanes = v.ty.dtype.lanes
        u8 = "uint8" if lanes == 1 else f"uint8x{lanes}"
        i8 = "int8" if lanes == 1 else f"int8x{lanes}"
        x80 = T.uint8(0x80) if lanes == 1 else T.broadcast(T.uint8(0x80), lanes)
        return T.reinterpret(i8, T.reinterpret(u8, v) ^ x80)

    n_full, k_full = n_out // TILE_N, k_in // 4
    flat = T.decl_buffer((nt * kq_all * TILE_K,), "int8", data=bp.data)
    if n_full and k_full:
        with T.serial(0, n_full) as j:
            with T.serial(0, k_full) as kq:
                rows = [val(b[t, kq * 4 + d, T.ramp(j * TILE_N, 1, TILE_N)]) for d in range(4)]
                T.buffer_store(flat, tirx.Shuffle(rows, _B_ROW),
                               [T.ramp((j * kq_all + kq) * TILE_K, 1, TILE_K)])

    def edge(j, kq):
        with T.serial(0, TILE_N) as c:
            with T.serial(0, 4) as d:
                k, n = kq * 4 + d, j * TILE_N + c
                T.buffer_store(bp, T.if_then_else(
                    tirx.all(k < k_in, n < n_out),
                    val(b[t, tirx.min(k, k_in - 1), tirx.min(n, n_out - 1)]), T.int8(0)),
                    [j, kq, c, d])

    k_used = -(-k_in // 4)  # groups holding some k < K; the rest is zero padding
    with T.serial(0, nt) as j:
        with T.serial(k_used, kq_all) as kq:
            T.buffer_store(flat, T.broadcast(T.int8(0), TILE_K),
                           [T.ramp((j * kq_all + kq) * TILE_K, 1, TILE_K)])
        if n_full < nt:  # the last, partial channel tile
            with T.If(j >= n_full):
                with T.Then():
                    with T.serial(0, k_used) as kq:
                        edge(j, kq)
        if k_full < k_used:  # the last, partial k group of the full tiles
            with T.If(j < n_full):
                with T.Then():
                    edge(j, k_full)
    # column sums of the packed values (padding is zero): each tile's bytes in 4 int32x16
    # partials (lane l of partial v holds channel (16 v + l) // 4), then 4 lanes per channel
    part = T.alloc_buffer((TILE_K,), "int32", scope="local", align=64)
    with T.serial(0, nt) as j:
        T.buffer_store(part, T.broadcast(T.int32(0), TILE_K), [T.ramp(0, 1, TILE_K)])
        with T.serial(0, kq_all) as kq:
            for v in range(TILE_K // TILE_N):
                lanes = T.ramp(v * TILE_N, 1, TILE_N)
                T.buffer_store(part, part[lanes] + T.Cast("int32x16", flat[T.ramp(
                    (j * kq_all + kq) * TILE_K + v * TILE_N, 1, TILE_N)]), [lanes])
        with T.serial(0, TILE_N) as c:
            T.buffer_store(colsum, part[4 * c] + part[4 * c + 1] + part[4 * c + 2]
                           + part[4 * c + 3], [j * TILE_N + c])


# --- weight packing (host side) ----------------------------------------------------------


def pack_dense_amx(weight: np.ndarray) -> np.ndarray:
    """``[N, K]`` int8 -> ``[ceil(N/16), ceil(K/64)*16, 16, 4]`` (K zero-padded to 64)."""
    n, k = weight.shape
    wp = np.zeros((n, _ceil_div(k, TILE_K) * TILE_K), np.int8)
    wp[:, :k] = weight
    return pack_dense(wp, 16, 4)


def pack_conv_amx(weight: np.ndarray, plan: ConvPlan | None = None) -> np.ndarray:
    """OIHW ``[O, C, R, S]`` int8 -> ``plan.weight_shape`` (see :class:`ConvPlan`).

    No plan, direct unfolded or 1x1: ``pack_conv`` with C zero-padded to 64. im2col (RxS):
    the ``[O, (r, s, c)]`` matrix through :func:`pack_dense_amx`. Folded: per kernel row, the
    ``[O, (s, c)]`` matrix through :func:`pack_dense_amx`.
    """
    o, c, r, s = weight.shape
    if plan is not None and plan.mode == "im2col" and (r, s) != (1, 1):
        return pack_dense_amx(weight.transpose(0, 2, 3, 1).reshape(o, r * s * c))
    if plan is not None and plan.fold:
        rows = weight.transpose(2, 0, 3, 1).reshape(r, o, s * c)  # [r, o, (s, c)]
        packed = np.stack([pack_dense_amx(rows[i]) for i in range(r)])
        return np.ascontiguousarray(packed.transpose(1, 0, 2, 3, 4))
    wp = np.zeros((o, _ceil_div(c, TILE_K) * TILE_K, r, s), np.int8)
    wp[:, :c] = weight
    return pack_conv(wp, 1, 16, 4)
