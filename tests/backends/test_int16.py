"""int16 activations through TVM, bit-exact against the reference (int64 sums where needed).

Op level: one graph per Hypothesis example holds every int16-capable op (conv of each kind,
linear, matmul, add, mul, pools, mean, requantize, cat, quantize/dequantize, clamp, an int16
table), with int16 inputs, int16 outputs and mixed int8/int16 operands. Inputs are often pinned
to the int16 extremes so sums leave int32 (the tests check that they do). Graph level: models
through ``ptqpasses.quantize`` with int16 nodes (a small CNN, a 1-layer BERT encoder).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import ptqpasses
from ptqpasses_backends.tvm import ptq_ops
from ptqpasses_backends.tvm.kernels import wide
from tests.backends.conftest import P, GraphBuilder, assert_exact
from tests.backends.strategies import multipliers

# drawn afresh on every run, as tests/backends/test_ops_exact.py
_DEEP = int(os.environ.get("PTQ_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 3, deadline=None, derandomize=False,
                    database=None, print_blob=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))
RANGES = {torch.int16: (-32768, 32767), torch.int8: (-128, 127), torch.uint8: (0, 255)}


def qtensor(seed: int, shape, dtype: torch.dtype, extreme: bool = False) -> torch.Tensor:
    """Uniform over ``dtype``; ``extreme``: only the two ends of the range (big sums)."""
    lo, hi = RANGES[dtype]
    g = torch.Generator().manual_seed(seed)
    if extreme:
        v = torch.where(torch.rand(shape, generator=g) < 0.5, lo, hi)
        return v.to(dtype)
    return torch.randint(lo, hi + 1, tuple(shape), generator=g, dtype=torch.int32).to(dtype)


@st.composite
def qparams(draw, dtypes=(torch.int16, torch.int8, torch.uint8)):
    """(dtype, zero point) with int16 twice as likely; int16 zero points are mostly 0
    (symmetric, as the int16 Scheme) and sometimes anywhere in range."""
    dtype = draw(st.sampled_from([torch.int16, *dtypes]))
    lo, hi = RANGES[dtype]
    zp = 0 if dtype == torch.int16 and draw(st.booleans()) else draw(st.integers(lo, hi))
    return dtype, zp


@st.composite
def out_qparams(draw):
    """(dtype, zero point, qmin, qmax), sometimes with a fused ReLU."""
    dtype, zp = draw(qparams())
    lo, hi = RANGES[dtype]
    return dtype, zp, (zp if draw(st.booleans()) else lo), hi


@st.composite
def int16_case(draw):
    """One op-level graph's parameters (input 0 is always int16)."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = {"dense": 1, "grouped": 2, "depthwise": 3}[kind]
    cg = 1 if kind == "depthwise" else draw(st.integers(1, 5))
    return dict(
        zp=draw(st.sampled_from([0, 0, -32768, 32767, draw(st.integers(-32768, 32767))])),
        groups=groups, cin=cg * groups, cout=groups * draw(st.integers(1, 4)),
        k=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), pad=draw(st.integers(0, 1)),
        dil=draw(st.integers(1, 2)), hw=(draw(st.integers(5, 7)), draw(st.integers(5, 7))),
        bias=draw(st.booleans()), k_in=draw(st.integers(1, 300)), n_out=draw(st.integers(1, 9)),
        other=draw(qparams()), outs=[draw(out_qparams()) for _ in range(9)],
        am=draw(st.integers(1, 2**14)), bm=draw(st.integers(1, 2**14)),
        extreme=draw(st.booleans()), seed=draw(st.integers(0, 999)))


def _op_graph(c):
    """Every int16-capable op on an int16 NCHW tensor ``x`` and an int16 ``[M, K]`` tensor ``v``
    (plus ``u``, a second operand of ``c["other"]`` dtype)."""
    b, s = GraphBuilder(), c["seed"]
    x, v, u = b.input("x"), b.input("v"), b.input("u")
    zp, (odt, ozp) = c["zp"], c["other"]
    outs = c["outs"]
    w = b.const(qtensor(s, (c["cout"], c["cin"] // c["groups"], c["k"], c["k"]), torch.int8))
    bias = b.const(torch.randint(-2**20, 2**20, (c["cout"],), dtype=torch.int32)) \
        if c["bias"] else None
    dt, oz, lo, hi = outs[0]
    conv = b.call(P.conv2d.default, x, zp, w, bias, [c["stride"]] * 2, [c["pad"]] * 2,
                  [c["dil"], 1], c["groups"], b.const(multipliers(s + 1, c["cout"], 1e-6)),
                  oz, lo, hi, dt)
    wl = b.const(qtensor(s + 2, (c["n_out"], c["k_in"]), torch.int8, extreme=c["extreme"]))
    dt, oz, lo, hi = outs[1]
    lin = b.call(P.linear.default, v, zp, wl, None,
                 b.const(multipliers(s + 3, c["n_out"], 1e-8)), oz, lo, hi, dt)
    dt, oz, lo, hi = outs[2]
    mm = b.call(P.matmul.default, v, zp, b.call(torch.ops.aten.permute.default, u, [1, 0]), ozp,
                2.0**-36, oz, lo, hi, dt)
    mm2 = b.call(P.matmul.default, u, ozp, b.call(torch.ops.aten.permute.default, v, [1, 0]),
                 zp, 2.0**-30, oz, lo, hi, dt)
    dt, oz, lo, hi = outs[3]
    add = b.call(P.add.default, v, zp, c["am"], u, ozp, c["bm"], 2.0**-22, oz, lo, hi, dt)
    mul = b.call(P.mul.default, v, zp, u, ozp, 2.0**-24, oz, lo, hi, dt)
    dt, oz, lo, hi = outs[4]
    avg = b.call(P.avg_pool2d.default, x, zp, [3, 2], [2, 1], [1, 1], 2.0**-8 / 6, oz, lo, hi,
                 dt)
    mean = b.call(P.mean.default, x, zp, [2, 3], True, 2.0**-12, oz, lo, hi, dt)
    mean1 = b.call(P.mean.default, x, zp, [1], False, 2.0**-12, oz, lo, hi, dt)
    mx = b.call(P.max_pool2d.default, x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    dt, oz, lo, hi = outs[5]
    rq = b.call(P.requantize.default, x, zp, 0.0078125, oz, lo, hi, dt)
    cat = b.call(P.cat.default, [v, u, v], [zp, ozp, 3], [0.5, 2.0, 0.001], 1, oz, lo, hi, dt)
    dt, oz, lo, hi = outs[6]
    deq = b.call(P.dequantize.default, x, 0.0007, zp)
    q = b.call(P.quantize.default, deq, 0.0011, oz, lo, hi, dt)
    clamp = b.call(P.clamp.default, x, -1000, 20000)
    # a table with an int16 output, on an 8-bit input (the lowering's GELU into an int16 node)
    dt8 = torch.int8 if odt == torch.int16 else odt
    lo8, hi8 = RANGES[dt8]
    table = b.const(qtensor(s + 4, (hi8 - lo8 + 1,), torch.int16))
    u8 = u if odt != torch.int16 else b.call(P.requantize.default, u, ozp, 0.01, 0, -128, 127,
                                             torch.int8)
    lut = b.call(P.lut.default, u8, table, lo8)
    gm = b.build((conv, lin, mm, mm2, add, mul, avg, mean, mean1, mx, rq, cat, q, clamp, lut))
    m = 3
    inputs = [qtensor(s + 5, (2, c["cin"], *c["hw"]), torch.int16, c["extreme"]),
              qtensor(s + 6, (m, c["k_in"]), torch.int16, c["extreme"]),
              qtensor(s + 7, (m, c["k_in"]), odt, c["extreme"])]
    return gm, inputs


@SETTINGS
@given(int16_case())
def test_int16_ops_bit_exact(tvm_backend, case):
    gm, inputs = _op_graph(case)
    want = gm(*inputs)
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), want, "int16 ops")


def _near(seed: int, shape, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, tuple(shape), generator=g, dtype=torch.int32).to(dtype)


@pytest.mark.filterwarnings("error:.*schedule of ptq_(dense|conv2d)_wide")
def test_int16_sums_past_int32_are_exact(tvm_backend):
    """Same-sign operands at the int16 extremes: the conv, linear, matmul and mul sums exceed
    int32 (checked), multipliers keep the results inside the output range (no saturation
    hiding a wrapped sum); symbolic batch; the int16 kernels' CPU schedule applies (its
    failure warning is an error here)."""
    b = GraphBuilder()
    x, v, u = b.input("x"), b.input("v"), b.input("u")
    w = _near(1, (6, 40, 3, 3), 110, 127, torch.int8)
    wl = _near(2, (7, 300), -128, -100, torch.int8)
    bias = torch.arange(7, dtype=torch.int32) * 100000
    m16 = (0, -32768, 32767, torch.int16)  # out_zp, qmin, qmax, out_dtype
    conv = b.call(P.conv2d.default, x, -32768, b.const(w), None, [1, 1], [1, 1], [1, 1], 1,
                  b.const(torch.full((6,), 2.0**-20)), *m16)
    lin = b.call(P.linear.default, v, -32768, b.const(wl), b.const(bias),
                 b.const(torch.full((7,), 2.0**-20)), *m16)
    mm = b.call(P.matmul.default, v, -32768, b.call(torch.ops.aten.permute.default, u, [0, 2, 1]),
                32767, 2.0**-30, *m16)
    mul = b.call(P.mul.default, v, -32768, u, 32767, 2.0**-18, *m16)
    gm = b.build((conv, lin, mm, mul))
    xs = [_near(3, (2, 40, 5, 5), 32000, 32767, torch.int16),
          _near(4, (2, 3, 300), 32000, 32767, torch.int16),
          _near(5, (2, 3, 300), -32768, -32000, torch.int16)]
    xc, vc, uc = xs[0].double() + 32768, xs[1].double() + 32768, xs[2].double() - 32767
    conv_acc = torch.nn.functional.conv2d(xc, w.double(), padding=1)
    assert conv_acc.abs().max() > 2**31
    assert (vc @ wl.double().T).abs().max() > 2**31
    assert (vc @ uc.transpose(1, 2)).abs().max() > 2**31
    assert (vc * uc).abs().max() > 2**31
    cm = tvm_backend.compile(gm, "host", example_inputs=xs)
    want = gm(*xs)
    for out in want:  # results inside the range: a wrapped int32 sum would show
        assert 0 < out.abs().max() < 32767
    assert_exact(cm(*xs), want, "int16 sums past int32")
    one = [t[:1] for t in xs]
    assert_exact(cm(*one), gm(*one), "batch 1")


def test_int16_on_the_int32_kernels_at_the_proof_edge(tvm_backend):
    """An int16-activation linear / conv runs on the 8-bit kernels' int32 code (on AVX2 the
    packed ``vpmaddwd`` template, on AVX-512 VNNI and AMX the same template as their
    ``int16`` variant; depthwise convs on any target) when ``max|x| * sum|w| +
    max|correction|`` fits int32, else on the ``*_wide`` computes: 516 weights of 127 on
    inputs at -32768 sum to -2147352576 (fits), 517 do not. Bit-exact either way; the choice
    and its reason are in ``meta["variants"]``."""

    b = GraphBuilder()
    v, u, x = b.input("v"), b.input("u"), b.input("x")
    out16 = (0, -32768, 32767, torch.int16)

    def linear(t, k):
        return b.call(P.linear.default, t, 0, b.const(torch.full((9, k), 127, dtype=torch.int8)),
                      None, b.const(torch.full((9,), 2.0**-17)), *out16)

    def conv(w, groups, stride):
        return b.call(P.conv2d.default, x, 5, b.const(w), None, [stride] * 2, [1, 1], [1, 1],
                      groups, b.const(torch.full((w.shape[0],), 2.0**-14)), *out16)

    gm = b.build((linear(v, 516), linear(u, 517),
                  conv(qtensor(8, (4, 1, 3, 3), torch.int8), 4, 2),
                  conv(qtensor(9, (20, 4, 3, 3), torch.int8), 1, 1)))
    inputs = [torch.full((3, 516), -32768, dtype=torch.int16),
              torch.full((3, 517), -32768, dtype=torch.int16),
              qtensor(7, (2, 4, 7, 9), torch.int16, extreme=True)]
    want = gm(*inputs)
    assert want[0].abs().max() > 0 and want[0].abs().max() < 32767  # no saturation hiding
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), want, "int16 on int32 kernels")
    got = {name: v[0] for name, v in cm.meta["variants"].items()}
    strategy = tvm_backend.strategy_for(tvm_backend.resolve("host"))
    # AVX2's main variant takes int16; the VNNI / AMX strategies have an ``int16`` variant
    # (the same vpmaddwd template); others run int16 on the wide computes
    int16 = [v.name for v in strategy.variants if v.layout.act_dtype == "int16"]
    packed = ("x86-packed-int16" if strategy.name == "x86-avx2" else "int16" if int16
              else "wide")
    assert got == {"linear_default": packed, "linear_default_1": "wide",
                   "conv2d_default": "depthwise-int32", "conv2d_default_1": packed}, got


def test_accumulator_dtype_choice():
    """int32 exactly when the bound provably fits, int64 otherwise (and for unknown lengths)."""
    assert wide.max_centered("int16", 0) == 32768
    assert wide.max_centered("int16", -32768) == 65535
    assert wide.max_centered("uint8", 3) == 252
    w = np.full((2, 100), -128, np.int8)
    assert wide.weighted_bound(32768, w, None) == 32768 * 12800
    assert wide.accumulator_dtype(wide.weighted_bound(32768, w, None)) == "int32"
    assert wide.accumulator_dtype(wide.weighted_bound(32768, np.tile(w, 6), None)) == "int64"
    assert wide.accumulator_dtype(2**31 - 1) == "int32"
    assert wide.accumulator_dtype(2**31) == "int64"
    assert ptq_ops._sum_dtype(None, "int8", "uint8") == "int32"
    assert ptq_ops._sum_dtype(None, "int16", "int8") == "int64"
    with pytest.raises(TypeError, match="int4"):
        wide.max_centered("int4", 0)


INT16 = ptqpasses.Scheme(activation=ptqpasses.QSpec(dtype="int16", symmetric=True,
                                                    observer="minmax"))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1,
                                                                          groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_quantized_model_with_int16_nodes_is_bit_exact(tvm_backend):
    """ptqpasses.quantize with int16 for conv2 (depthwise) and the fc: int8 -> int16 -> int8
    boundaries, int16 add and mean, through TVM with a dynamic batch."""
    torch.manual_seed(0)
    calib = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    cfg = ptqpasses.QuantConfig(by_module_name={"conv2": INT16, "fc": INT16})
    q = ptqpasses.quantize(_Net().eval(), calib[0], calib, cfg, progress=False)
    dtypes = {n.name: getattr(ptqpasses.meta.get_qparams(n), "dtype", None)
              for n in q.graph.nodes if n.op == "call_function"}
    assert "int16" in dtypes.values() and "uint8" in dtypes.values()
    ops = {n.target for n in q.graph.nodes}
    assert {P.conv2d.default, P.linear.default} <= ops
    cm = tvm_backend.compile(q, "host", example_inputs=list(calib[0]))
    for n in (1, 4):
        x = torch.randn(n, 3, 8, 8) * 2
        assert torch.equal(cm(x), q(x))


@pytest.mark.slow
def test_encoder_with_int16_nodes_dynamic_sequence(tvm_backend):
    """A 1-layer BERT encoder, MiniLM-recipe style (int16 linears into the residual adds) plus
    int16 value projection and FFN (so matmul, linear and add get int16 operands), dynamic
    sequence length: every integer op is exact, so TVM matches the integer graph up to the
    float LayerNorm/softmax/GELU ulps (as tests/backends/test_end_to_end.py)."""
    from ptqpasses_tools.models import bert_encoder

    torch.manual_seed(0)
    model = bert_encoder(hidden=32, heads=2, ffn=64, layers=1, take_embeddings=True).eval()
    calib = [(torch.randn(2, 12, 32),) for _ in range(2)]
    wide16 = ("value", "attn_out", "ffn_in", "act", "ffn_out")
    cfg = ptqpasses.QuantConfig(by_module_name={f"layers.0.{m}": INT16 for m in wide16},
                                policy="all")  # (integer residual adds, as the recipe had)
    q = ptqpasses.quantize(model, calib[0], calib, cfg, progress=False,
                           dynamic_dims={0: {1: "seq"}})

    def in_dtypes(op, *positions):
        return {ptqpasses.meta.get_qparams(n.args[i]).dtype for n in q.graph.nodes
                if n.target is op for i in positions}

    assert "int16" in in_dtypes(P.linear.default, 0)
    assert "int16" in in_dtypes(P.matmul.default, 0, 2)
    assert "int16" in in_dtypes(P.add.default, 0, 3)
    cm = tvm_backend.compile(q, "host")
    for shape in ((2, 12, 32), (3, 7, 32)):
        x = torch.randn(*shape)
        torch.testing.assert_close(cm(x), q(x), rtol=0, atol=1e-5)
