"""ConvertToQDQ + LowerToIntegerOps: structure, 1-LSB agreement, coverage of float nodes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import ptqpasses
from ptqpasses import QSpec, QuantConfig, Scheme, meta
from ptqpasses.passes import LowerToIntegerOps, NotCalibratedError

aten, ptq = torch.ops.aten, torch.ops.ptq


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.c1(x)), 2)
        y = F.relu(y + F.relu6(self.c2(y)))
        z = torch.cat([y, self.c3(y)], 1)
        z = F.avg_pool2d(z, 2)
        return self.fc(z.mean([2, 3]))


def _quantize(model, shape, cfg=None, batches=3):
    """The op-by-op lowering under test: every integer-set op integer (policy "all")."""
    data = [(torch.randn(*shape),) for _ in range(batches)]
    cfg = cfg or QuantConfig(policy="all")
    gm = ptqpasses.prepare(model.eval(), data[0], cfg)
    ptqpasses.calibrate(gm, data, progress=False)
    qdq = ptqpasses.convert(gm, lower=False)
    import copy
    lowered = LowerToIntegerOps()(copy.deepcopy(qdq)).graph_module
    return qdq, lowered


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_block_lowers_fully_to_integer_ops():
    m = Block()
    qdq, q = _quantize(m, (4, 3, 16, 16))
    q.graph.lint()
    targets = _targets(q)
    for op in ("conv2d", "max_pool2d", "add", "cat", "avg_pool2d", "mean", "linear"):
        assert getattr(ptq, op).default in targets, op
    assert not any(t in targets for t in (aten.conv2d.default, aten.linear.default, aten.relu.default,
                                          ptq.dequantize_per_channel.default))
    assert targets.count(ptq.quantize.default) == 1  # only the model input
    assert targets.count(ptq.dequantize.default) == 1  # only the model output
    assert all(c.integer for c in ptqpasses.coverage(q))
    # relu6 was fused into c2's clamp: qmax is below the uint8 maximum or equal to it
    c2 = [n for n in q.graph.nodes if n.target is ptq.conv2d.default][1]
    assert c2.args[7] == 8  # depthwise groups survived
    x = torch.randn(3, 3, 16, 16)  # batch differs from calibration
    out_scale = meta.get_qparams(next(n for n in q.graph.nodes if n.target is ptq.linear.default)).scale
    # one-LSB differences inside the network may compound: allow 2 LSB at the output
    assert (q(x) - qdq(x)).abs().max() <= out_scale * 1.0001 * 2


def test_unsupported_op_is_reported_not_crashing():
    class WithSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), dim=1))

    qdq, q = _quantize(WithSoftmax(), (2, 3, 6, 6))
    cov = {c.node: c for c in ptqpasses.coverage(q)}
    assert not cov["softmax"].integer
    assert "softmax" in cov["softmax"].reason and "not in the integer operator set" in cov["softmax"].reason
    assert sum(c.integer for c in cov.values()) == 2
    # softmax runs in float between a dequantize and a quantize
    sig = next(n for n in q.graph.nodes if n.target is aten.softmax.int)
    assert sig.args[0].target is ptq.dequantize.default
    assert next(iter(sig.users)).target is ptq.quantize.default
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(q(x), qdq(x), atol=0.05, rtol=0)


def test_elementwise_functions_become_exact_table_lookups():
    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.sigmoid(self.a(x)) + F.hardswish(self.a(x))
            return F.gelu(self.b(F.silu(y)))

    qdq, q = _quantize(Acts(), (2, 3, 6, 6))
    targets = _targets(q)
    assert targets.count(ptq.lut.default) == 4
    assert not any(t in targets for t in (aten.sigmoid.default, aten.gelu.default,
                                          aten.hardswish.default, aten.silu.default))
    x = torch.randn(3, 3, 6, 6)
    # a table lookup reproduces the QDQ simulation of an elementwise op exactly
    lut = next(n for n in q.graph.nodes if n.target is ptq.lut.default)
    assert lut.args[2] == 0 and tuple(q.get_buffer(lut.args[1].target).shape) == (256,)
    scale = meta.get_qparams(q.graph.find_nodes(op="call_function", target=ptq.dequantize.default)[-1].args[0]).scale
    assert (q(x) - qdq(x)).abs().max() <= 2 * scale * 1.0001


def test_keep_float_and_asymmetric_weights_are_reported():
    m = Block()
    cfg = QuantConfig(policy="all", keep_float=("c3",),
                      by_module_name={"fc": Scheme(weight=QSpec(dtype="int8", symmetric=False,
                                                                per_channel=True))})
    _, q = _quantize(m, (2, 3, 16, 16), cfg)
    floats = {c.node: c.reason for c in ptqpasses.coverage(q) if not c.integer}
    assert "keep_float names module 'c3'" in floats["conv2d_2"]
    assert "asymmetric weights" in floats["linear"]


def test_int8_activations():
    cfg = QuantConfig(policy="all", activation=QSpec(dtype="int8", symmetric=False))
    qdq, q = _quantize(Block(), (2, 3, 16, 16), cfg)
    conv = next(n for n in q.graph.nodes if n.target is ptq.conv2d.default)
    assert conv.args[-1] == torch.int8 and conv.args[1] != 0  # asymmetric int8 input
    quant = next(n for n in q.graph.nodes if n.target is ptq.quantize.default)
    assert quant.args[3:] == (-128, 127, torch.int8)
    x = torch.randn(2, 3, 16, 16)
    assert (q(x) - qdq(x)).abs().max() < 0.1


@pytest.mark.parametrize("dtype,lo,hi", [("uint8", 0, 127), ("int8", -64, 63)])
def test_reduce_range_activations_clamp_every_integer_output(dtype, lo, hi):
    """``QSpec(reduce_range=True)``: every op writing an activation clamps to the 7-bit range
    (backends rely on it to prove ``vpmaddubsw`` exact), and the lowered graph still agrees
    with its QDQ simulation; the setting survives the config's dict round trip."""
    act = QSpec(dtype=dtype, reduce_range=True)
    cfg = QuantConfig(policy="all", activation=act)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    qdq, q = _quantize(Block(), (2, 3, 16, 16), cfg)
    clamped = [n for n in q.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
               and n.target.namespace == "ptq"
               and any(a.name == "qmax" for a in n.target._schema.arguments)]
    assert len(clamped) >= 8
    for n in clamped:
        names = [a.name for a in n.target._schema.arguments]
        qmin, qmax = n.args[names.index("qmin")], n.args[names.index("qmax")]
        assert lo <= qmin and qmax == hi, (n.name, qmin, qmax)
    x = torch.randn(2, 3, 16, 16)
    out_scale = meta.get_qparams(next(n for n in q.graph.nodes
                                      if n.target is ptq.linear.default)).scale
    assert (q(x) - qdq(x)).abs().max() <= out_scale * 1.0001 * 2


class _Scores(nn.Module):
    """Attention scores scaled by ``1 / sqrt(d)``: the scale's observer absorbs the constant,
    leaving a requantize whose multiplier is 1 up to float32 rounding."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0, -1)


def test_identity_requantize_is_dropped(monkeypatch):
    """A requantize that maps every value of its input to itself is removed; the integer graph
    computes the same outputs as with it (checked by lowering once with the cleanup off)."""
    from ptqpasses.passes import lower_to_integer_ops as lowering

    torch.manual_seed(0)
    calib = [(torch.randn(2, 8, 16),) for _ in range(4)]
    model = _Scores().eval()
    cfg = QuantConfig(policy="all")  # (the cost policy keeps the scores' scaling float)
    q = ptqpasses.quantize(model, calib[0], calib, cfg, progress=False)
    monkeypatch.setattr(lowering, "_drop_identity_requantize", lambda gm: False)
    kept = ptqpasses.quantize(model, calib[0], calib, cfg, progress=False)
    requant = [n for n in kept.graph.nodes if n.target is torch.ops.ptq.requantize.default]
    assert requant and all(abs(n.args[2] - 1.0) < 1e-6 for n in requant), requant
    assert not [n for n in q.graph.nodes if n.target is torch.ops.ptq.requantize.default]
    x = torch.randn(3, 8, 16) * 3
    assert torch.equal(q(x), kept(x))


def test_convert_before_calibrate_fails_clearly():
    gm = ptqpasses.prepare(Block().eval(), (torch.randn(2, 3, 16, 16),))
    with pytest.raises(ptqpasses.PassError, match="run ptqpasses.calibrate") as info:
        ptqpasses.convert(gm)
    assert isinstance(info.value.__cause__, NotCalibratedError)


class OneConv(nn.Module):
    def __init__(self, cin, cout, k, stride, pad, groups, relu):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) if self.relu else y


@settings(max_examples=25, deadline=None)
@given(cpg=st.integers(1, 3), opg=st.integers(1, 3), groups=st.integers(1, 3),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 2), pad=st.integers(0, 1),
       relu=st.booleans(), shift=st.floats(-2, 2), per_channel=st.booleans(),
       act=st.sampled_from(["uint8", "int8"]))
def test_lowered_conv_matches_qdq_within_one_lsb(cpg, opg, groups, k, stride, pad, relu, shift,
                                                  per_channel, act):
    m = OneConv(cpg * groups, opg * groups, k, stride, pad, groups, relu)
    cfg = QuantConfig(policy="all", activation=QSpec(dtype=act, observer="minmax"),
                      weight=QSpec(dtype="int8", symmetric=True, per_channel=per_channel))
    data = [(torch.randn(2, cpg * groups, 7, 7) + shift,) for _ in range(2)]
    gm = ptqpasses.prepare(m.eval(), data[0], cfg)
    ptqpasses.calibrate(gm, data, progress=False)
    qdq = ptqpasses.convert(gm, lower=False)
    import copy
    q = LowerToIntegerOps()(copy.deepcopy(qdq)).graph_module
    assert ptq.conv2d.default in _targets(q)
    scale = meta.get_qparams(next(n for n in q.graph.nodes if n.target is ptq.conv2d.default)).scale
    x = torch.randn(3, cpg * groups, 7, 7) + shift
    assert (q(x) - qdq(x)).abs().max() <= scale * 1.0001


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 48), n=st.integers(1, 12), seq=st.booleans(), shift=st.floats(-2, 2))
def test_lowered_linear_matches_qdq_within_one_lsb(k, n, seq, shift):
    m = nn.Linear(k, n)
    shape = (2, 5, k) if seq else (2, k)
    cfg = QuantConfig(policy="all", activation=QSpec(observer="minmax"))
    data = [(torch.randn(*shape) + shift,) for _ in range(2)]
    gm = ptqpasses.prepare(m.eval(), data[0], cfg)
    ptqpasses.calibrate(gm, data, progress=False)
    qdq = ptqpasses.convert(gm, lower=False)
    import copy
    q = LowerToIntegerOps()(copy.deepcopy(qdq)).graph_module
    scale = meta.get_qparams(next(n for n in q.graph.nodes if n.target is ptq.linear.default)).scale
    x = torch.randn(*shape) + shift
    assert (q(x) - qdq(x)).abs().max() <= scale * 1.0001


def test_accumulation_that_may_overflow_int32_is_refused_naming_the_node():
    """``|bias| + 255 * sum|w_q|`` past 2^31 (K = 70,000 equal weights: 255 * 127 * 70,000):
    convert refuses the node, not a backend later."""
    model = torch.nn.Linear(70_000, 2).eval()
    with torch.no_grad():
        model.weight.fill_(0.01)
    data = [(torch.rand(2, 70_000),)]
    with pytest.raises(Exception, match=r"node 'linear': channel 0's int32 accumulation may "
                                        r"overflow .* >= 2\^31"):
        ptqpasses.quantize(model, data[0], data, progress=False)
    small = torch.nn.Linear(60_000, 2).eval()  # 255 * 127 * 60,000 < 2^31: accepted
    with torch.no_grad():
        small.weight.fill_(0.01)
    data = [(torch.rand(2, 60_000),)]
    ptqpasses.quantize(small, data[0], data, progress=False)


class WindowMerge(nn.Module):
    """Swin's window merge: ``permute -> contiguous -> view`` between two linears."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(32, 4)

    def forward(self, x):  # x: (n, 4, 2, 8)
        y = self.a(x).permute(0, 2, 1, 3).contiguous()
        return self.b(y.view(y.shape[0], 2, 32))


def test_views_of_a_permuted_integer_tensor_keep_their_layout():
    m = WindowMerge().eval()
    x = torch.randn(2, 4, 2, 8)
    # (static linears: the views run on the integer tensor between them)
    q = ptqpasses.quantize(m, (x,), [(x,)], QuantConfig(activation=QSpec()), progress=False)
    targets = [n.target for n in q.graph.nodes]
    assert aten.contiguous.default in targets and aten.view.default not in targets
    assert sum(str(t).startswith("ptq.linear") for t in targets) == 2
    torch.testing.assert_close(q(torch.randn(3, 4, 2, 8)).shape, torch.Size([3, 2, 4]))
    torch.testing.assert_close(q(x), m(x), atol=0.1, rtol=0.1)
