"""``ApplyGlueSchedules``: the PrimFuncs that are not ptq kernels (integer glue, float islands)
are scheduled on CPU by ``cpu/glue.py``, without changing a bit of the integer results; a
schedule that fails leaves its function as it was, with a warning."""

from __future__ import annotations

import re
import numpy as np
import pytest
import torch
import tvm
from tvm import te

from ptqpasses_backends.tvm import targets
from ptqpasses_backends.tvm.cpu import glue as glue_schedule
from tests.backends.conftest import P, GraphBuilder, assert_exact
from tests.backends.strategies import int_tensor

U8, I8 = torch.uint8, torch.int8


def _glue_graph():
    """Residual add, requantize, dequantize -> quantize, mean over the last axis, a LUT: rows
    of 48 (vectorized) and of 7 (no lane count divides it: left scalar), dynamic batch."""
    b = GraphBuilder()
    x, y, z = b.input("x"), b.input("y"), b.input("z")  # u8 [B,5,48], s8 [B,5,48], u8 [B,3,7]
    r = b.call(P.add.default, x, 3, 4096, y, -4, 2048, 1.0 / 8192, 5, 5, 255, U8)
    rq = b.call(P.requantize.default, r, 5, 0.75, -3, -128, 127, I8)
    dq = b.call(P.quantize.default, b.call(P.dequantize.default, r, 0.05, 5), 0.07, -2, -128,
                127, I8)
    m = b.call(P.mean.default, x, 3, [2], True, 0.5 / 48, 1, 0, 255, U8)
    table = b.const((torch.arange(256) - 128).mul(3).div(4, rounding_mode="floor")
                    .to(torch.int8))
    t = b.call(P.lut.default, y, table, -128)
    s = b.call(P.add.default, z, 1, 1024, z, 2, 512, 1.0 / 4096, 0, 0, 255, U8)
    gm = b.build((rq, dq, m, t, s))

    def inputs(n):
        return [int_tensor(n, (n, 5, 48), U8), int_tensor(n + 1, (n, 5, 48), I8),
                int_tensor(n + 2, (n, 3, 7), U8)]

    return gm, inputs


def _capture(into: dict):
    """A user pass for stage ``after_lowering`` recording the module's PrimFuncs."""

    @tvm.transform.module_pass(opt_level=0, name="capture_primfuncs")
    def _capture(mod, _ctx):
        into.update({gv.name_hint: f for gv, f in mod.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc)})
        return mod

    return _capture


def _glue(funcs: dict) -> dict:
    return {n: f for n, f in funcs.items() if not (f.attrs and "ptq.kernel" in f.attrs)}


def test_glue_is_scheduled_vectorized_and_exact(tvm_backend):
    gm, inputs = _glue_graph()
    funcs: dict = {}
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs(2),
                             relax_passes={"after_lowering": _capture(funcs)})
    glue = _glue(funcs)
    assert len(glue) >= 4, sorted(funcs)
    unscheduled = [n for n, f in glue.items() if "tir.is_scheduled" not in f.attrs]
    assert not unscheduled, unscheduled
    vectorized = [n for n, f in glue.items() if "T.vectorized" in f.script()]
    assert len(vectorized) >= 3, sorted(glue)
    for n in (2, 5):  # symbolic batch
        assert_exact(cm(*inputs(n)), gm(*inputs(n)), f"glue batch {n}")
    # schedule=False: TVM's default lowering, nothing marked scheduled.
    funcs.clear()
    tvm_backend.compile(gm, "host", example_inputs=inputs(2), schedule=False,
                        relax_passes={"after_lowering": _capture(funcs)})
    assert not [n for n, f in _glue(funcs).items() if "tir.is_scheduled" in f.attrs]


def test_failed_or_user_schedules_leave_the_function_alone(tvm_backend, monkeypatch):
    """A schedule that raises: a warning naming the function, which keeps its default lowering,
    and the module still compiles and is exact. A function marked scheduled (by a user pass at
    ``after_legalize``, say) is not touched."""
    gm, inputs = _glue_graph()
    calls = []

    def broken(func, target):
        calls.append(func)
        raise RuntimeError("boom")

    monkeypatch.setattr(glue_schedule, "schedule_glue", broken)
    funcs: dict = {}
    with pytest.warns(UserWarning, match=r"glue schedule of \w+ failed.*RuntimeError: boom"):
        cm = tvm_backend.compile(gm, "host", example_inputs=inputs(2),
                                 relax_passes={"after_lowering": _capture(funcs)})
    assert calls and not [n for n, f in _glue(funcs).items() if "tir.is_scheduled" in f.attrs]
    assert_exact(cm(*inputs(3)), gm(*inputs(3)), "unscheduled glue")
    monkeypatch.undo()
    marked = next(iter(_glue(funcs).values())).with_attr("tir.is_scheduled", True)
    assert not glue_schedule.is_glue(marked)  # e.g. scheduled by a user pass: left alone


def _run_both(func, shapes_dtypes, n_out):
    """``func`` unscheduled and scheduled, on the same random inputs: their outputs."""
    tgt = targets.resolve("host").target()
    sched = glue_schedule.schedule_glue(func, tgt)
    assert sched is not None and "tir.is_scheduled" in sched.attrs
    rng = np.random.default_rng(0)
    args = [rng.integers(-100, 100, s).astype(d) for s, d in shapes_dtypes]
    outs = []
    for f in (func, sched):
        ex = tvm.compile(tvm.IRModule({"main": f}), target=tgt)
        arrays = [tvm.runtime.tensor(a) for a in args]
        ex["main"](*arrays)
        outs.append([a.numpy() for a in arrays[-n_out:]])
    return sched, outs


def test_schedule_rules_on_hand_written_functions():
    # Two outputs, the first also feeding the second: its block cannot be inlined and is
    # vectorized on its own.
    x = te.placeholder((4, 32), "int32", name="x")
    a = te.compute((4, 32), lambda i, j: x[i, j] * 3, name="a")
    b = te.compute((4, 32), lambda i, j: (a[i, j] + 1).astype("float32") * 0.5, name="b")
    sched, (want, got) = _run_both(te.create_prim_func([x, a, b]),
                                   [((4, 32), "int32"), ((4, 32), "int32"),
                                    ((4, 32), "float32")], 2)
    assert sched.script().count("T.vectorized") == 2
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    # An injective chain into a sum over the rows (ResNet's mean): inlined into the sum.
    c = te.compute((4, 32), lambda i, j: (x[i, j] - 7) * 2, name="c")
    k = te.reduce_axis((0, 4), name="k")
    s = te.compute((32,), lambda j: te.sum(c[k, j], axis=k), name="s")
    sched, (want, got) = _run_both(te.create_prim_func([x, s]),
                                   [((4, 32), "int32"), ((32,), "int32")], 1)
    assert 'T.sblock("c")' not in sched.script()
    np.testing.assert_array_equal(got[0], want[0])
    # A lone reduction: no rule applies.
    k2 = te.reduce_axis((0, 32), name="k2")
    r = te.compute((4,), lambda i: te.max(x[i, k2], axis=k2), name="r")
    assert glue_schedule.schedule_glue(te.create_prim_func([x, r]),
                                       targets.resolve("host").target()) is None


def test_softmax_lane_partials_are_vectorized():
    """The softmax kernel's ``*_lanes`` partial max / sum become vector accumulators (4
    vectorized loops: two partials, exp, divide), same result as unscheduled, bit for bit."""
    from ptqpasses_backends.tvm.kernels.softmax import softmax_last_axis

    x = te.placeholder((6, 64), "float32", name="x")
    func = te.create_prim_func([x, softmax_last_axis(x)])
    assert func.script().count(glue_schedule.LANE_PARTIALS) >= 2
    rng = np.random.default_rng(1)
    tgt = targets.resolve("host").target()
    sched = glue_schedule.schedule_glue(func, tgt)
    assert sched.script().count("T.vectorized") == 4
    xs = (rng.standard_normal((6, 64)) * 5).astype("float32")
    outs = []
    for f in (func, sched):
        ex = tvm.compile(tvm.IRModule({"main": f}), target=tgt)
        y = tvm.runtime.tensor(np.zeros((6, 64), "float32"))
        ex["main"](tvm.runtime.tensor(xs), y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])


def test_column_reduction_rule_tiles_outputs_inside_the_reduction():
    """A float ``linear`` with its weight stored ``[K, N]`` (MobileNetV2's float classifier):
    the reduction loop runs outside a tile of rows x vectorized outputs (3 rows: a partial
    tile of ``ROWS``), each output still summed serially in ``k`` (integer-valued floats
    here, so equality is exact either way)."""
    a = te.placeholder((3, 40), "float32", name="a")
    w = te.placeholder((40, 24), "float32", name="w")
    bias = te.placeholder((24,), "float32", name="bias")
    k = te.reduce_axis((0, 40), name="k")
    mm = te.compute((3, 24), lambda i, n: te.sum(a[i, k] * w[k, n], axis=k), name="mm")
    out = te.compute((3, 24), lambda i, n: mm[i, n] + bias[n], name="out")
    func = te.create_prim_func([a, w, bias, out])
    assert glue_schedule._column_reduction(func) is not None
    sched, (want, got) = _run_both(func, [((3, 40), "float32"), ((40, 24), "float32"),
                                          ((24,), "float32"), ((3, 24), "float32")], 1)
    text = sched.script()
    assert "T.parallel" in text and text.count("T.vectorized") >= 2, text
    loops = re.findall(r"for (\w+) in (?:T\.)?(\w+)\(", text)
    order = [kind for _, kind in loops]
    # the update: k, then the tile's rows and vectors (unrolled), then the lanes
    assert ("range", "unroll", "unroll", "vectorized") in zip(
        order, order[1:], order[2:], order[3:]), order
    np.testing.assert_array_equal(got[0], want[0])



def test_large_injective_glue_runs_in_parallel():
    """The inline rule's blocks of at least ``PARALLEL_MIN`` elements get one parallel loop
    over all but the vectorized axis (MiniLM's GELU and per-token epilogues ran on one thread
    of two); smaller ones stay serial (a launch would cost more than it saves). Exact."""
    def chain(rows, cols):
        x = te.placeholder((rows, cols), "int32", name="x")
        a = te.compute((rows, cols), lambda i, j: x[i, j] * 3 - 7, name="a")
        b = te.compute((rows, cols), lambda i, j: a[i, j].astype("float32") * 0.25, name="b")
        return te.create_prim_func([x, b])

    rows = glue_schedule.PARALLEL_MIN // 64
    sched, (want, got) = _run_both(chain(rows, 64), [((rows, 64), "int32"),
                                                     ((rows, 64), "float32")], 1)
    text = sched.script()
    assert "T.parallel" in text and "T.vectorized" in text, text
    np.testing.assert_array_equal(got[0], want[0])
    small = glue_schedule.schedule_glue(chain(4, 64), targets.resolve("host").target())
    assert "T.parallel" not in small.script() and "T.vectorized" in small.script()
