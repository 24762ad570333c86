"""Float32 softmax over the last axis on CPUs, one row at a time, with the quantize that
follows it (attention probabilities -> uint8) in the same pass.

``kernels/softmax.py`` is the TE form the glue schedule fuses with its quantize (TVM's dlight
``Reduction`` rule, 8-lane partials): ~300 us per MiniLM layer (12 x 128 x 128) on one
Emerald Rapids core. Here a hand-written PrimFunc (TVM IRBuilder) keeps each row in L1: the
max in ``lanes``-wide vector partials, ``e = exp(x - max)`` (``kernels.softmax
.exp_nonpositive`` on whole vectors) into a row buffer with the sum in vector partials, then
``e * (1 / sum)``, stored as float32 or quantized as ``ptq.quantize`` specifies::

    q = clamp(rne(y / scale) + zp, qmin, qmax)     (NaN read as 0; a true division)

computed as ``int32(rne(clamp(y / scale, qmin - zp, qmax - zp))) + zp``, equal for every
``y`` (round is monotone and keeps the integer bounds). The softmax itself is the TE
kernel's arithmetic with the partial sums taken over ``lanes`` instead of 8 lanes: within
``kernels.softmax.SOFTMAX_TOLERANCE`` of ``torch.softmax`` like it (a float island: the
spec is a tolerance, not bits).

Rows of a static length that is a multiple of ``lanes``; the emitter keeps the TE kernel for
the others (symbolic sequence lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ptqpasses_backends.tvm.cpu.vector import round_to_int32
from ptqpasses_backends.tvm.kernels.softmax import exp_nonpositive
from ptqpasses_backends.tvm.requant import f32

#: Rows per parallel task (its row buffer is one workspace allocation).
ROWS_PER_TASK = 32

_OPAQUE = 8  # relax OpPatternKind.kOpaque


@dataclass(frozen=True)
class Quantize:
    """The ``ptq.quantize`` folded into the kernel's store."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: str


def fits(n, lanes: int) -> bool:
    """Whether rows of length ``n`` (an int or ``IntImm``; symbolic: no) take this kernel."""
    return isinstance(n, (int, tirx.IntImm)) and int(n) % lanes == 0 and int(n) >= lanes


def softmax_rows(m, n: int, *, lanes: int, avx512: bool, quant: Quantize | None = None,
                 parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, n] float32, out [m, n])``: the softmax of each row, float32 or
    quantized by ``quant``. ``m``: an int, or None for a symbolic ``int64`` row count."""
    m = tirx.Var("m", "int64") if m is None else int(m)
    if not fits(n, lanes):
        raise ValueError(f"softmax_rows takes rows of a multiple of {lanes}, got {n}")
    n = int(n)
    steps = n // lanes

    def bcast(v):
        return T.broadcast(v, lanes)

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((m, n), "float32"))
            out = T.arg("out", T.buffer((m, n), quant.dtype if quant else "float32"))
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})

            def row(r, buf):
                # acc: vector partials; st: the row max and 1 / sum; e: the row's exps.
                acc, st, e = (T.decl_buffer((size,), "float32", data=buf.data, elem_offset=o)
                              for size, o in ((lanes, 0), (lanes, lanes), (n, 2 * lanes)))
                lane = T.ramp(0, 1, lanes)
                T.buffer_store(acc, x[r, lane], [lane])
                with T.serial(1, steps) as kv:
                    T.buffer_store(acc, tirx.max(acc[lane], x[r, T.ramp(kv * lanes, 1, lanes)]),
                                   [lane])
                with T.serial(1, lanes) as j:
                    T.buffer_store(acc, tirx.max(acc[0], acc[j]), [0])
                T.buffer_store(st, acc[0], [0])
                T.buffer_store(acc, bcast(f32(0.0)), [lane])
                with T.serial(0, steps) as kv:
                    idx = T.ramp(kv * lanes, 1, lanes)
                    T.buffer_store(e, exp_nonpositive(x[r, idx] - bcast(st[0])), [idx])
                    T.buffer_store(acc, acc[lane] + e[idx], [lane])
                with T.serial(1, lanes) as j:
                    T.buffer_store(acc, acc[0] + acc[j], [0])
                T.buffer_store(st, f32(1.0) / acc[0], [1])
                with T.serial(0, steps) as kv:
                    idx = T.ramp(kv * lanes, 1, lanes)
                    y = e[idx] * bcast(st[1])
                    if quant is not None:
                        y = tirx.Select(tirx.isnan(y), bcast(f32(0.0)), y) / bcast(
                            f32(quant.scale))
                        y = tirx.min(tirx.max(y, bcast(f32(quant.qmin - quant.zero_point))),
                                     bcast(f32(quant.qmax - quant.zero_point)))
                        y = (round_to_int32(y, lanes, avx512)
                             + bcast(T.int32(quant.zero_point))).astype(
                                 f"{quant.dtype}x{lanes}")
                    T.buffer_store(out, y, [r, idx])

            # A root block (see cpu/token.py); one row buffer per task.
            with T.sblock("root"):
                tasks = (-(-m // ROWS_PER_TASK) if isinstance(m, int)
                         else tirx.floordiv(m + (ROWS_PER_TASK - 1), ROWS_PER_TASK))
                with (T.parallel if parallel else T.serial)(0, tasks) as t:
                    buf = T.alloc_buffer((2 * lanes + n,), "float32", scope="local")
                    with T.serial(0, ROWS_PER_TASK) as i:
                        r = t * ROWS_PER_TASK + i
                        with T.If(r < m):
                            with T.Then():
                                row(r, buf)
    return ib.get()


def emit(em, x, *, lanes: int, avx512: bool):
    """``softmax(x, -1)`` of float32 ``x [..., n]`` (``fits``) as one kernel call on the rows
    flattened; registers in ``em.quantize_epilogues`` how to build the same call with a
    quantize folded in (``ptq_ops.quantize`` calls it with the fields of :class:`Quantize`)."""
    shape = list(x.ty.shape.values)
    lead, n = shape[:-1], int(shape[-1])
    flat = x if len(lead) == 1 else em.bb.emit(relax.op.reshape(x, [-1, n]))
    m = flat.ty.shape.values[0]
    rows = int(m) if isinstance(m, tirx.IntImm) else None

    def call(quant):
        func = softmax_rows(rows, n, lanes=lanes, avx512=avx512, quant=quant)
        func = func.with_attrs({"ptq.kernel": "softmax", "op_pattern": _OPAQUE})
        gv = em.bb.add_func(func, "softmax_rows" if quant is None else "softmax_quantize")
        y = em.bb.emit(relax.call_tir(
            gv, [flat], relax.TensorType([m, n], quant.dtype if quant else "float32")))
        return y if len(lead) == 1 else em.bb.emit(relax.op.reshape(y, [*lead, n]))

    y = call(None)
    em.quantize_epilogues[y] = lambda **quant: call(Quantize(**quant))
    return y
