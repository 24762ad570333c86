"""Per-token (dynamic) uint8 activations on CPUs: row statistics and codes in one pass.

The TE form (``kernels/token.py``: ``token_params`` then ``token_quantize``, two glue
kernels) reads each row twice from memory and writes the parameters in between; on one
Emerald Rapids core it cost ~55 us per [128, 384] MiniLM input. :func:`token_quantize_rows`
is one hand-written PrimFunc (TVM IRBuilder, like the AMX kernels): per row, ``acc``
vector accumulators of the row's min and max (exact in any order), the three parameters,
then the codes, while the row is still in L1. 16 float lanes with AVX-512 (the round is
one ``vcvtps2dq {rn-sae}``), 8 with AVX2, 4 elsewhere; the arithmetic is
``ptqpasses.ops.reference.token_qparams`` / ``_token_quantize`` op for op, so it is
bit-exact with the reference (and with the TE kernels):

    lo = min(min_k x, 0), hi = max(max_k x, 0)          (NaN read as 0)
    s = max(hi / 255 - lo / 255, 2^-126), inv = 1 / s, zp = clamp(rne(-lo * inv), 0, 255)
    q = clamp(rne(x * inv) + zp, 0, 255)

Computing ``rne(x * inv)`` as an int32 and adding ``zp`` in int32 is the reference's float
sum: ``|x * inv| <= 255 * (1 + 2^-23)`` for every finite row, so both are exact integers.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ptqpasses.ops.reference import TOKEN_SCALE_MIN
from ptqpasses_backends.tvm.cpu.vector import round_to_int32
from ptqpasses_backends.tvm.kernels.token import INVERSE, SCALE, ZERO_POINT
from ptqpasses_backends.tvm.requant import f32

#: Rows per parallel task (the row-local accumulators are allocated once per task).
ROWS_PER_TASK = 32
#: Elements (rows x K) from which the row loop is parallel: below, a thread-pool launch
#: costs more than the work (~2 us with one pool thread).
PARALLEL_ELEMENTS = 1 << 16

_OPAQUE = 8  # relax OpPatternKind.kOpaque


def token_quantize_rows(m, k: int, *, lanes: int, avx512: bool, accumulators: int = 2,
                        parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k] float32, q [m, k] uint8, p [m, 3] float32)``: the per-token codes
    and per-row ``(scale, inverse, zero point)`` (``kernels/token.py`` layout). ``m``: an int,
    or None for a symbolic ``int64`` row count."""
    m = tirx.Var("m", "int64") if m is None else int(m)
    width = lanes * accumulators

    def finite(v, n):
        zero = f32(0.0) if n == 1 else T.broadcast(f32(0.0), n)
        return tirx.Select(tirx.isnan(v), zero, v)

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((m, k), "float32"))
            q = T.arg("q", T.buffer((m, k), "uint8"))
            p = T.arg("p", T.buffer((m, 3), "float32"))
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})

            def row(r, buf):
                lo, hi, stat = (T.decl_buffer((width,), "float32", data=buf.data, elem_offset=o)
                                for o in (0, width, 2 * width))

                def update(idx, v):
                    T.buffer_store(lo, tirx.min(lo[idx], v), [idx])
                    T.buffer_store(hi, tirx.max(hi[idx], v), [idx])

                zero = T.broadcast(f32(0.0), width)
                T.buffer_store(lo, zero, [T.ramp(0, 1, width)])
                T.buffer_store(hi, zero, [T.ramp(0, 1, width)])
                if k >= width:
                    with T.serial(0, k // width) as kv:
                        for a in range(accumulators):
                            v = x[r, T.ramp(kv * width + a * lanes, 1, lanes)]
                            update(T.ramp(a * lanes, 1, lanes), finite(v, lanes))
                done = k // width * width
                for a in range((k - done) // lanes):
                    v = x[r, T.ramp(done + a * lanes, 1, lanes)]
                    update(T.ramp(a * lanes, 1, lanes), finite(v, lanes))
                done = k // lanes * lanes
                if done < k:
                    with T.serial(done, k) as j:
                        update(0, finite(x[r, j], 1))
                with T.serial(1, width) as j:
                    T.buffer_store(lo, tirx.min(lo[0], lo[j]), [0])
                    T.buffer_store(hi, tirx.max(hi[0], hi[j]), [0])
                low, high = lo[0], hi[0]
                T.buffer_store(stat, tirx.max(high / f32(255.0) - low / f32(255.0),
                                              f32(TOKEN_SCALE_MIN)), [SCALE])
                T.buffer_store(stat, f32(1.0) / stat[SCALE], [INVERSE])
                T.buffer_store(stat, tirx.min(tirx.max(tirx.round(-low * stat[INVERSE]),
                                                       f32(0.0)), f32(255.0)), [ZERO_POINT])
                for j in range(3):
                    T.buffer_store(p, stat[j], [r, j])

                def codes(v, n):
                    inv = stat[INVERSE] if n == 1 else T.broadcast(stat[INVERSE], n)
                    zp = stat[ZERO_POINT].astype("int32")
                    i = round_to_int32(finite(v, n) * inv, n, avx512) + (
                        zp if n == 1 else T.broadcast(zp, n))
                    lo_c, hi_c = (T.int32(0), T.int32(255)) if n == 1 else (
                        T.broadcast(T.int32(0), n), T.broadcast(T.int32(255), n))
                    return tirx.min(tirx.max(i, lo_c), hi_c).astype(
                        "uint8" if n == 1 else f"uint8x{n}")

                if k >= lanes:
                    with T.serial(0, k // lanes) as kv:
                        idx = T.ramp(kv * lanes, 1, lanes)
                        T.buffer_store(q, codes(x[r, idx], lanes), [r, idx])
                if done < k:
                    with T.serial(done, k) as j:
                        T.buffer_store(q, codes(x[r, j], 1), [r, j])

            def locals_():
                # One allocation per task for the min / max accumulators and the three
                # parameters: a local buffer is a TVMBackendAllocWorkspace call here, not a
                # stack slot (three per 8-row task had cost 9 of 24 us on [128, 384]).
                return T.alloc_buffer((3 * width,), "float32", scope="local")

            # A root block: Relax's RewriteDataflowReshape inspects every one-input call_tir
            # whose output has the input's size, and requires a block body.
            with T.sblock("root"):
                if parallel:
                    tasks = -(-m // ROWS_PER_TASK) if isinstance(m, int) else tirx.floordiv(
                        m + (ROWS_PER_TASK - 1), ROWS_PER_TASK)
                    with T.parallel(0, tasks) as t:
                        bufs = locals_()
                        with T.serial(0, ROWS_PER_TASK) as i:
                            r = t * ROWS_PER_TASK + i
                            with T.If(r < m):
                                with T.Then():
                                    row(r, bufs)
                else:
                    bufs = locals_()
                    with T.serial(0, m) as r:
                        row(r, bufs)
    return ib.get()


def emit(em, x, *, lanes: int, avx512: bool):
    """``(q, p)`` of float32 ``x [..., K]`` (static K): the codes ``[..., K]`` uint8 and row
    parameters ``[..., 3]`` of :func:`token_quantize_rows`, as one kernel call on the rows
    flattened."""
    shape = list(x.ty.shape.values)
    lead, k = shape[:-1], int(shape[-1])
    rows = 1
    for d in lead:
        rows = None if rows is None or not isinstance(d, tirx.IntImm) else rows * int(d)
    flat = x if len(lead) == 1 else em.bb.emit(relax.op.reshape(x, [-1, k]))
    m = flat.ty.shape.values[0]
    parallel = rows is None or rows * k >= PARALLEL_ELEMENTS
    func = token_quantize_rows(rows, k, lanes=lanes, avx512=avx512, parallel=parallel)
    func = func.with_attrs({"ptq.kernel": "token_quantize", "op_pattern": _OPAQUE})
    gv = em.bb.add_func(func, "token_quantize")
    out = em.bb.emit(relax.call_tir(gv, [flat], [relax.TensorType([m, k], "uint8"),
                                                 relax.TensorType([m, 3], "float32")]))
    q = em.bb.emit(relax.TupleGetItem(out, 0))
    p = em.bb.emit(relax.TupleGetItem(out, 1))
    if len(lead) != 1:
        q = em.bb.emit(relax.op.reshape(q, [*lead, k]))
        p = em.bb.emit(relax.op.reshape(p, [*lead, 3]))
    return q, p
