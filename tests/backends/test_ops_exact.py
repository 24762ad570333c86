"""Every integer operator through TVM on the host target, bit-exact against the reference.

Each Hypothesis example builds one graph holding several independent instances of the op (one
graph output each), so one compilation checks several parameter sets. Tolerance: none (bit-exact).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.backends.conftest import P, GraphBuilder, assert_exact, kernel_probe
from tests.backends.strategies import (int_tensor, multiplier, multipliers, out_qdtype,
                                       qdtype, weight)

# Every example compiles a module (~1-3 s here), so examples are few and shrinking is off:
# a failure is reported as drawn, which is already small. Examples are drawn afresh on every
# run (not derandomized: each CI run checks new parameter sets; a failure prints the
# @reproduce_failure blob). PTQ_HYPOTHESIS_EXAMPLES=N draws N per test instead of 10.
_DEEP = int(os.environ.get("PTQ_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 10, deadline=None, derandomize=False,
                    database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))
INSTANCES = 3


def _run(tvm_backend, gm, inputs, dynamic_batch=True):
    want = gm(*inputs)
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=dynamic_batch)
    assert_exact(cm(*inputs), want, "host")
    return cm


@st.composite
def conv_case(draw):
    dtype, zp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(out_qdtype())
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = {"dense": 1, "grouped": draw(st.integers(2, 3)),
              "depthwise": draw(st.integers(2, 5))}[kind]
    cg = 1 if kind == "depthwise" else draw(st.integers(1, 6))
    og = draw(st.integers(1, 2)) if kind == "depthwise" else draw(st.integers(1, 20))
    k = draw(st.integers(1, 3))
    pad = draw(st.integers(0, 2))
    dil = draw(st.integers(1, 2))
    size = draw(st.integers(dil * (k - 1) + 1 - 2 * pad if pad < 1 else 2, 7))
    return dict(dtype=dtype, zp=zp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax, groups=groups,
                cin=cg * groups, cout=og * groups, k=k, kw=draw(st.integers(1, 3)),
                stride=[draw(st.integers(1, 2)), draw(st.integers(1, 2))],
                pad=[pad, draw(st.integers(0, 1))], dil=[dil, 1],
                h=max(size, dil * (k - 1) + 1), w=draw(st.integers(3, 6)),
                bias=draw(st.booleans()), n=draw(st.integers(1, 2)), seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(conv_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_conv2d(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        # one symbolic batch dim is shared by all inputs
        outs += conv_nodes(b, f"conv{i}", dict(c, n=cases[0]["n"]), inputs)
    _run(tvm_backend, b.build(tuple(outs)), inputs)


def conv_nodes(b, name, c, inputs):
    """The graph nodes of one drawn case (``conv_case``), its inputs appended to ``inputs``;
    the ``*_nodes`` builders are shared with tests/backends/test_aarch64_device.py."""
    x = b.input(name)
    inputs.append(int_tensor(c["seed"], (c["n"], c["cin"], c["h"], c["w"]), c["dtype"]))
    w = b.const(weight(c["seed"] + 1, (c["cout"], c["cin"] // c["groups"], c["k"], c["kw"])))
    bias = b.const(torch.randint(-5000, 5000, (c["cout"],), dtype=torch.int32)) \
        if c["bias"] else None
    m = b.const(multipliers(c["seed"] + 2, c["cout"], 0.002))
    return [b.call(P.conv2d.default, x, c["zp"], w, bias, c["stride"], c["pad"], c["dil"],
                   c["groups"], m, c["ozp"], c["qmin"], c["qmax"], c["odt"])]


@st.composite
def linear_case(draw):
    dtype, zp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(out_qdtype())
    lead = draw(st.sampled_from([[2], [1], [2, 3]]))
    return dict(dtype=dtype, zp=zp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax, lead=lead,
                k=draw(st.integers(1, 40)), n=draw(st.integers(1, 40)),
                bias=draw(st.booleans()), per_channel=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(linear_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_linear(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        lead = [cases[0]["lead"][0], *c["lead"][1:]]  # one shared batch dim
        outs += linear_nodes(b, f"x{i}", dict(c, lead=lead), inputs)
    _run(tvm_backend, b.build(tuple(outs)), inputs)


def linear_nodes(b, name, c, inputs):
    x = b.input(name)
    inputs.append(int_tensor(c["seed"], (*c["lead"], c["k"]), c["dtype"]))
    w = b.const(weight(c["seed"] + 1, (c["n"], c["k"])))
    bias = b.const(torch.randint(-5000, 5000, (c["n"],), dtype=torch.int32)) \
        if c["bias"] else None
    m = multipliers(c["seed"] + 2, c["n"], 0.003)
    m = b.const(m if c["per_channel"] else m[:1])
    return [b.call(P.linear.default, x, c["zp"], w, bias, m, c["ozp"], c["qmin"], c["qmax"],
                   c["odt"])]


@st.composite
def matmul_case(draw):
    adt, azp, _, _ = draw(qdtype())
    bdt, bzp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(out_qdtype())
    m, k, n = (draw(st.integers(1, 9)) for _ in range(3))
    a_batch, b_batch = draw(st.sampled_from([([2], [2]), ([2, 3], [1, 3]), ([], [2]), ([3], []),
                                             ([2, 1], [1, 2])]))
    return dict(adt=adt, azp=azp, bdt=bdt, bzp=bzp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax,
                a=(*a_batch, m, k), b=(*b_batch, k, n), mult=multiplier(draw) / 64,
                seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(matmul_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_matmul(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        outs += matmul_nodes(b, f"mm{i}", c, inputs)
    # Inputs without a batch dim of their own must not get a dynamic one.
    gm = b.build(tuple(outs))
    want = gm(*inputs)
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), want, "matmul")


def matmul_nodes(b, name, c, inputs):
    xa, xb = b.input(f"{name}_a"), b.input(f"{name}_b")
    inputs += [int_tensor(c["seed"], c["a"], c["adt"]),
               int_tensor(c["seed"] + 1, c["b"], c["bdt"])]
    return [b.call(P.matmul.default, xa, c["azp"], xb, c["bzp"], c["mult"], c["ozp"],
                   c["qmin"], c["qmax"], c["odt"])]


def test_matmul_vector_operands(tvm_backend):
    b = GraphBuilder()
    a, v, u = b.input("a"), b.input("v"), b.input("u")
    mv = b.call(P.matmul.default, a, 3, v, -2, 0.01, 1, -128, 127, torch.int8)
    vm = b.call(P.matmul.default, u, 7, a, 3, 0.01, 1, 0, 255, torch.uint8)
    inputs = [int_tensor(0, (5, 6), torch.uint8), int_tensor(1, (6,), torch.int8),
              int_tensor(2, (5,), torch.uint8)]
    gm = b.build((mv, vm))
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), gm(*inputs), "matrix @ vector, vector @ matrix")


@st.composite
def binary_case(draw):
    adt, azp, _, _ = draw(qdtype())
    bdt, bzp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(qdtype())
    sa, sb = draw(st.sampled_from([((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1)),
                                   ((2, 1, 5), (2, 4, 5)), ((2, 6), (1, 6))]))
    return dict(adt=adt, azp=azp, bdt=bdt, bzp=bzp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax,
                sa=sa, sb=sb, am=draw(st.integers(1, 2**14)), bm=draw(st.integers(1, 2**14)),
                mult=multiplier(draw), seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(binary_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_add_mul(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        outs += add_mul_nodes(b, f"bin{i}", c, inputs)
    gm = b.build(tuple(outs))
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), gm(*inputs), "add/mul")


def add_mul_nodes(b, name, c, inputs):
    xa, xb = b.input(f"{name}_a"), b.input(f"{name}_b")
    inputs += [int_tensor(c["seed"], c["sa"], c["adt"]),
               int_tensor(c["seed"] + 1, c["sb"], c["bdt"])]
    return [b.call(P.add.default, xa, c["azp"], c["am"], xb, c["bzp"], c["bm"],
                   c["mult"] / 2**14, c["ozp"], c["qmin"], c["qmax"], c["odt"]),
            b.call(P.mul.default, xa, c["azp"], xb, c["bzp"], c["mult"] / 128, c["ozp"],
                   c["qmin"], c["qmax"], c["odt"])]


@st.composite
def elementwise_case(draw):
    idt, izp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(qdtype())
    return dict(idt=idt, izp=izp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax,
                shape=draw(st.sampled_from([(2, 5), (2, 3, 4, 4), (1, 7)])),
                mult=multiplier(draw) * 4, scale=float(np.float32(draw(st.floats(1e-3, 0.5)))),
                lo=draw(st.integers(-128, 0)), seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(elementwise_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_quantize_dequantize_requantize_clamp(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        outs += elementwise_nodes(b, f"ew{i}", c, inputs)
    _run(tvm_backend, b.build(tuple(outs)), inputs, dynamic_batch=False)


def elementwise_nodes(b, name, c, inputs):
    xf, xq = b.input(f"{name}_f"), b.input(f"{name}_q")
    g = torch.Generator().manual_seed(c["seed"])
    f = torch.randn(c["shape"], generator=g) * 40 * c["scale"]
    # Exact halves of the scale: the ties that a reciprocal multiply would break.
    f.view(-1)[::3] = (torch.randint(-90, 90, f.view(-1)[::3].shape, generator=g)
                       + 0.5) * c["scale"]
    inputs += [f, int_tensor(c["seed"], c["shape"], c["idt"])]
    return [b.call(P.quantize.default, xf, c["scale"], c["ozp"], c["qmin"], c["qmax"],
                   c["odt"]),
            b.call(P.dequantize.default, xq, c["scale"], c["izp"]),
            b.call(P.requantize.default, xq, c["izp"], c["mult"], c["ozp"], c["qmin"],
                   c["qmax"], c["odt"]),
            b.call(P.clamp.default, xq, max(c["lo"], 0) if c["idt"] == torch.uint8
                   else c["lo"], 100)]


def test_dequantize_per_channel(tvm_backend):
    b = GraphBuilder()
    x = b.input("x")
    s = b.const(torch.rand(4) * 0.1)
    z = b.const(torch.tensor([0, 3, -2, 5]))
    out = b.call(P.dequantize_per_channel.default, x, s, z, 1)
    gm = b.build((out,))
    inputs = [int_tensor(3, (2, 4, 3), torch.int8)]
    assert_exact(tvm_backend.compile(gm, "host", example_inputs=inputs)(*inputs), gm(*inputs))


@st.composite
def cat_case(draw):
    odt, ozp, qmin, qmax = draw(qdtype())
    n = draw(st.integers(2, 3))
    parts = [draw(qdtype())[:2] for _ in range(n)]
    dim = draw(st.integers(0, 2))
    sizes = [draw(st.integers(1, 4)) for _ in range(n)]
    return dict(odt=odt, ozp=ozp, qmin=qmin, qmax=qmax, parts=parts, dim=dim, sizes=sizes,
                mults=[multiplier(draw) * 2 for _ in range(n)], seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(cat_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_cat(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        outs += cat_nodes(b, f"cat{i}", c, inputs)
    gm = b.build(tuple(outs))
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), gm(*inputs), "cat")


def cat_nodes(b, name, c, inputs):
    xs = []
    for j, ((dt, _), size) in enumerate(zip(c["parts"], c["sizes"])):
        shape = [2, 3, 4]
        shape[c["dim"]] = size
        xs.append(b.input(f"{name}_{j}"))
        inputs.append(int_tensor(c["seed"] + j, shape, dt))
    return [b.call(P.cat.default, xs, [z for _, z in c["parts"]], c["mults"], c["dim"],
                   c["ozp"], c["qmin"], c["qmax"], c["odt"])]


@st.composite
def pool_case(draw):
    idt, izp, _, _ = draw(qdtype())
    odt, ozp, qmin, qmax = draw(qdtype())
    k = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    return dict(idt=idt, izp=izp, odt=odt, ozp=ozp, qmin=qmin, qmax=qmax, k=k,
                stride=[draw(st.integers(1, 3)), draw(st.integers(1, 2))],
                pad=[draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2))],
                dil=[draw(st.integers(1, 2)), 1], ceil=draw(st.booleans()),
                hw=(draw(st.integers(5, 8)), draw(st.integers(3, 7))),  # >= dilated window
                mult=multiplier(draw), dims=draw(st.sampled_from([[2, 3], [-1], [1], [1, 2]])),
                keep=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@SETTINGS
@given(st.lists(pool_case(), min_size=INSTANCES, max_size=INSTANCES))
def test_pools_and_mean(tvm_backend, cases):
    b, outs, inputs = GraphBuilder(), [], []
    for i, c in enumerate(cases):
        outs += pool_nodes(b, f"pool{i}", c, inputs)
    _run(tvm_backend, b.build(tuple(outs)), inputs)


def pool_nodes(b, name, c, inputs):
    x = b.input(name)
    inputs.append(int_tensor(c["seed"], (2, 3, *c["hw"]), c["idt"]))
    return [b.call(P.max_pool2d.default, x, c["k"], c["stride"], c["pad"], c["dil"], c["ceil"]),
            b.call(P.avg_pool2d.default, x, c["izp"], c["k"], c["stride"], c["pad"],
                   c["mult"] / (c["k"][0] * c["k"][1]), c["ozp"], c["qmin"], c["qmax"],
                   c["odt"]),
            b.call(P.mean.default, x, c["izp"], c["dims"], c["keep"], c["mult"] / 16, c["ozp"],
                   c["qmin"], c["qmax"], c["odt"])]


def test_any_batch_size_one_module(tvm_backend):
    """One compiled module (symbolic batch) serves batch sizes it was not traced with."""
    b = GraphBuilder()
    x = b.input("x")
    w = b.const(weight(0, (20, 3, 3, 3)))
    m = b.const(multipliers(1, 20, 0.002))
    y = b.call(P.conv2d.default, x, 5, w, None, [2, 2], [1, 1], [1, 1], 1, m, 0, 0, 255,
               torch.uint8)
    gm = b.build(y)
    cm = tvm_backend.compile(gm, "host", example_inputs=[int_tensor(0, (1, 3, 9, 9),
                                                                     torch.uint8)])
    assert cm.inputs[0].shape == ("batch", 3, 9, 9)
    for n in (1, 3, 8):
        xin = int_tensor(n, (n, 3, 9, 9), torch.uint8)
        assert_exact(cm(xin), gm(xin), f"batch {n}")
    with pytest.raises(ValueError, match="expected uint8\\['batch', 3, 9, 9\\]"):
        cm(int_tensor(0, (1, 3, 8, 9), torch.uint8))
    # Non-contiguous input (a strided view) is accepted.
    big = int_tensor(9, (2, 3, 9, 18), torch.uint8)
    assert_exact(cm(big[..., ::2]), gm(big[..., ::2].contiguous()), "strided input")


def _not_an_aten_op(x):
    return x


def test_unsupported_node_names_node_and_op(tvm_backend):
    b = GraphBuilder()
    x = b.input("x")
    y = b.call(_not_an_aten_op, x)
    with pytest.raises(tvm_backend.EmitError,
                       match="node '_not_an_aten_op'.*no TVM converter for op _not_an_aten_op"):
        tvm_backend.compile(b.build(y), "host", example_inputs=[torch.randn(2, 3)])
    b = GraphBuilder()
    x = b.input("x")
    y = b.call(torch.ops.aten.bucketize.Tensor, x, x)  # a converter exists but rejects it
    with pytest.raises(tvm_backend.EmitError,
                       match="node 'bucketize_tensor' \\(aten.bucketize.Tensor\\) could not be"):
        tvm_backend.compile(b.build(y), "host", example_inputs=[torch.randn(2, 3)])


def test_max_pool2d_separable_kernel(tvm_backend):
    """The padded / row-max / column-max kernel, scheduled per channel on CPU, on the corners
    of its index arithmetic: ceil mode whose last window reads past the right padding, dilation,
    unequal kernel / stride / padding per axis, the dtypes' extremes at the borders (padding
    must never win), a symbolic batch."""
    cases = [  # kernel, stride, padding, dilation, ceil_mode, dtype, (h, w)
        ([3, 3], [2, 2], [1, 1], [1, 1], False, torch.uint8, (11, 10)),
        ([3, 3], [2, 2], [1, 1], [1, 1], True, torch.int8, (10, 9)),
        ([2, 2], [1, 1], [0, 0], [2, 2], True, torch.int8, (7, 8)),
        ([3, 3], [3, 3], [1, 1], [2, 2], True, torch.uint8, (8, 7)),
        ([3, 2], [2, 1], [1, 1], [1, 2], False, torch.int8, (9, 6)),
        ([2, 3], [2, 3], [0, 1], [1, 1], True, torch.uint8, (5, 11)),
    ]
    b, outs = GraphBuilder(), []
    for i, (k, s, p, d, ceil, _, _) in enumerate(cases):
        outs.append(b.call(P.max_pool2d.default, b.input(f"x{i}"), k, s, p, d, ceil))
    gm = b.build(tuple(outs))

    def inputs(n, seed):
        xs = [int_tensor(seed + i, (n, 3, *hw), dt) for i, (*_, dt, hw) in enumerate(cases)]
        for x, (*_, dt, _) in zip(xs, cases):  # borders at the dtype's minimum and maximum
            lo, hi = (-128, 127) if dt == torch.int8 else (0, 255)
            x[:, 0, 0, :], x[:, 0, :, -1], x[:, 1, -1, :], x[:, 2] = lo, lo, hi, lo
        return xs

    funcs = {}
    capture = kernel_probe("max_pool2d", funcs)

    cm = tvm_backend.compile(gm, "host", example_inputs=inputs(1, 0),
                             relax_passes={"after_lowering": capture})
    assert len(funcs) == len(cases)
    assert all("tir.is_scheduled" in f.attrs and "T.parallel" in f.script()
               for f in funcs.values())
    for n, seed in ((1, 10), (3, 20)):
        xs = inputs(n, seed)
        assert_exact(cm(*xs), gm(*xs), f"max_pool2d batch {n}")
