"""Per-token (dynamic) activations for linear layers: ``QSpec(dynamic=True)``.

The pipeline side: nothing observes a per-token linear's input, the QDQ graph reads
``ptq.fake_quantize_per_token``, the lowering writes ``ptq.linear_dynamic`` (plus a float bias
add, plus a ``quantize`` where an integer op reads the result), and the result tracks rows
whose magnitudes differ widely, which one per-tensor scale cannot.
"""

import copy

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import QSpec, QuantConfig, meta
from ptqpasses.report import sqnr

P = torch.ops.ptq
DYNAMIC = QSpec(dynamic=True)
STATIC = QSpec(observer="minmax")


class Block(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, the second also read by a residual add."""

    def __init__(self, d=32, h=64):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.ln(x)))) + x


def _rows(seed, n=4):
    """Tokens whose magnitudes span four decades (one per-tensor scale loses the small ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 32, generator=g)
    return [(x * 10.0 ** (torch.rand(2, 16, 1, generator=g) * 4 - 2),) for _ in range(n)]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _quantize(model, act, policy="cost"):
    torch.manual_seed(0)
    cfg = QuantConfig(activation=act, policy=policy)
    calib = _rows(0)
    return ptqpasses.quantize(model, calib[0], calib, cfg, guard=False, progress=False)


def test_spec_is_checked():
    with pytest.raises(ValueError, match="dynamic=True"):
        QSpec(dtype="int8", dynamic=True)
    with pytest.raises(ValueError, match="dynamic=True"):  # (a weight spec: int8)
        QSpec(dtype="int8", symmetric=True, per_channel=True, dynamic=True)
    assert DYNAMIC.static() == QSpec() and STATIC.static() is STATIC


def test_per_token_linears_lower_and_track_every_row():
    torch.manual_seed(0)
    model = Block().eval()
    q = _quantize(model, DYNAMIC)
    targets = _targets(q)
    assert targets.count(P.linear_dynamic.default) == 2
    assert P.linear.default not in targets and P.fake_quantize_per_token.default not in targets
    assert P.quantize.default not in targets  # nothing reads an integer tensor: all float out
    cov = {c.node: c for c in ptqpasses.coverage(q)}
    bias = [c for c in cov.values() if "float bias of per-token linear" in c.reason]
    assert len(bias) == 2 and not any(c.integer for c in bias)
    # nothing observed the linears' inputs: the recorded plan says so
    static = _quantize(model, STATIC)
    x = _rows(9, 1)[0][0]
    ref = model(x).detach()
    assert sqnr(ref, q(x).detach()) > sqnr(ref, static(x).detach()) + 10  # rows of 1e-2 .. 1e2


def test_lowered_matches_the_qdq_simulation():
    torch.manual_seed(1)
    model = Block().eval()
    calib = _rows(1)
    observed = ptqpasses.prepare(model, calib[0], QuantConfig(activation=DYNAMIC))
    assert not [n for n in observed.graph.nodes
                if meta.observed_node(n) in ("layer_norm", "relu")]
    qdq = ptqpasses.convert(copy.deepcopy(observed), lower=False)
    assert _targets(qdq).count(P.fake_quantize_per_token.default) == 2
    q = ptqpasses.convert(observed)
    x = _rows(5, 1)[0][0]
    want, got = qdq(x), q(x)
    assert sqnr(want.detach(), got) > 60  # the same rounding up to float32 sums


def test_an_integer_reader_gets_a_quantized_output():
    """Policy "all": the residual add is integer, so the per-token ``down`` projection's
    float result is quantized (a static scale, observed) for it."""
    torch.manual_seed(2)
    model = Block().eval()
    q = _quantize(model, DYNAMIC, policy="all")
    nodes = [n for n in q.graph.nodes if n.target is P.linear_dynamic.default]
    assert len(nodes) == 2
    add = next(n for n in q.graph.nodes if n.target is P.add.default)
    readers = {u.target for n in nodes for u in n.users}
    assert torch.ops.aten.add.Tensor in readers  # the float bias
    src = add.args[0] if add.args[0].op == "call_function" else add.args[3]
    assert src.target in (P.quantize.default, P.requantize.default)
    x = _rows(3, 1)[0][0]
    assert sqnr(model(x).detach(), q(x).detach()) > 25


def test_the_default_quantize_works_when_nothing_is_observed():
    """Only per-token linears: no observer at all; calibrate is skipped, the guard too has
    nothing to calibrate, and both give the same graph."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    calib = _rows(4)
    cfg = QuantConfig(activation=DYNAMIC)
    for guard in (False, True):
        q = ptqpasses.quantize(model, calib[0], calib, cfg, guard=guard, progress=False)
        assert P.linear_dynamic.default in _targets(q)
        x = calib[0][0]
        assert sqnr(model(x).detach(), q(x).detach()) > 35
