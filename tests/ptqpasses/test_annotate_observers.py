"""Annotate (config resolution, roles), observers, calibration errors."""

import math

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import (Annotate, CalibrationError, ConfigError, InsertObservers, QSpec,
                       QuantConfig, Scheme, meta)
from ptqpasses.report import sqnr
from ptqpasses.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                                 qparams_from_range)

aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.features(x).mean([2, 3])
        return self.head(y)


def _annotated(cfg):
    gm = ptqpasses.capture(Net().eval(), (torch.randn(2, 3, 10, 10),))
    Annotate(cfg)(gm)
    return gm, {n.name: meta.get_qspec(n) for n in gm.graph.nodes}


def test_default_roles():
    _, q = _annotated(QuantConfig())
    assert q["conv2d"].role == "compute" and q["conv2d"].output is None  # relu fused
    assert q["conv2d"].weight.per_channel and q["conv2d"].weight.dtype == "int8"
    assert q["relu"].role == "fused" and q["relu"].fused_into == "conv2d"
    assert q["x"].role == "input" and q["x"].output.dtype == "uint8"
    # the head's only consumer is the graph output: integer inputs, float output
    assert q["linear"].role == "compute" and q["linear"].output is None
    assert q["linear"].float_output and "cost policy" in q["linear"].reason
    _, q = _annotated(QuantConfig(policy="all"))
    assert q["linear"].role == "compute" and q["linear"].output is not None
    assert not q["linear"].float_output


class Block(nn.Module):
    """A transformer-like block: linear -> residual add -> LayerNorm -> GELU MLP -> add."""

    def __init__(self):
        super().__init__()
        self.attn, self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.ln1, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)

    def forward(self, h):
        h = self.ln1(h + self.attn(h))
        return self.ln2(h + self.down(nn.functional.gelu(self.up(h))))


#: The default with static linears (``QSpec()``: no per-token quantization): what the cost
#: policy's rules are written against below.
STATIC_LINEARS = QuantConfig(activation=QSpec())


def test_cost_policy_keeps_float_only_consumers_inputs_float():
    gm = ptqpasses.capture(Block().eval(), (torch.randn(2, 5, 16),))
    Annotate(STATIC_LINEARS)(gm)
    q = {n.name: meta.get_qspec(n) for n in gm.graph.nodes}
    # the residual adds feed LayerNorm only: float, and they no longer ask for their inputs
    assert q["add"].role == q["add_1"].role == "float"
    assert "cost policy" in q["add"].reason
    # so the linears before them hand their accumulators to float consumers
    assert q["linear"].float_output and q["linear_2"].float_output
    # GELU feeds an integer linear: a table on integers, its producer's output quantized
    assert q["gelu"].role == "compute" and q["linear_1"].output is not None
    assert not q["linear_1"].float_output
    # tensors only float ops read are not observed; linear inputs are
    assert q["layer_norm"].output is not None and q["h"].output is not None
    assert q["layer_norm_1"].output is None
    # the same block with policy "all": every add integer
    gm = ptqpasses.capture(Block().eval(), (torch.randn(2, 5, 16),))
    Annotate(QuantConfig(policy="all"))(gm)
    assert meta.get_qspec(next(n for n in gm.graph.nodes if n.name == "add")).role == "compute"


def test_default_linears_over_tokens_read_float_and_free_their_producers():
    """The default (per-token linears): no linear asks for its input, so GELU, which only a
    linear read, is float, its producer a float output, and nothing before a linear is
    observed; a linear over ``[batch, features]`` stays static (``Net``'s head)."""
    gm = ptqpasses.capture(Block().eval(), (torch.randn(2, 5, 16),))
    Annotate(QuantConfig())(gm)
    q = {n.name: meta.get_qspec(n) for n in gm.graph.nodes}
    assert all(q[n].role == "compute" and q[n].dynamic for n in ("linear", "linear_1",
                                                                  "linear_2"))
    assert q["gelu"].role == "float" and q["linear"].float_output
    assert q["layer_norm"].output is None and q["h"].output is None
    _, q = _annotated(QuantConfig())
    assert q["linear"].role == "compute" and not q["linear"].dynamic
    assert q["mean"].role == "compute"  # the pool in front of the head stays integer


def test_cost_policy_float_outputs_lower_to_integer_ops_with_float32_results():
    torch.manual_seed(0)
    m = Block().eval()
    data = [(torch.randn(2, 5, 16),) for _ in range(3)]
    q = ptqpasses.quantize(m, data[0], data, STATIC_LINEARS, progress=False)
    lins = [n for n in q.graph.nodes if n.target is torch.ops.ptq.linear.default]
    assert [n.args[-1] for n in lins] == [torch.float32, torch.uint8, torch.float32]
    assert all(c.integer for c in ptqpasses.coverage(q) if "linear" in c.op)
    rules = [c.reason for c in ptqpasses.coverage(q) if c.op == "ptq.linear"]
    assert rules[0].startswith("float output") and rules[1] == ""  # the report says which rule
    # the float-output op is the dequantized accumulator: float32(acc) * s_x * s_w
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert sqnr(m(x), q(x)) > 25.0


def test_overrides_by_name_type_regex_and_keep_float():
    int8 = Scheme(activation=QSpec(dtype="int8", symmetric=True),
                  weight=QSpec(dtype="int8", symmetric=True, per_channel=False))
    _, q = _annotated(QuantConfig(by_module_name={"features.2": None},
                                  by_module_type={nn.Linear: int8}, policy="all"))
    assert q["conv2d_1"].role == "float" and "by_module_name 'features.2'" in q["conv2d_1"].reason
    assert q["linear"].weight.per_channel is False
    assert q["linear"].output.dtype == "int8"
    _, q = _annotated(QuantConfig(by_node_regex={"conv2d.*": None}))
    assert q["conv2d"].role == q["conv2d_1"].role == "float"
    _, q = _annotated(QuantConfig(by_module_type={"Linear": None}, keep_float=("mean",)))
    assert q["linear"].role == "float" and q["mean"].role == "float"


@pytest.mark.parametrize("cfg, message", [
    (QuantConfig(by_module_name={"features.7": None}), "no module named 'features.7'"),
    (QuantConfig(by_module_name={"head2": None}), "did you mean 'head'"),
    (QuantConfig(keep_float=("nope",)), "no module or node named 'nope'"),
    (QuantConfig(by_node_regex={"zzz.*": None}), "matches no node"),
])
def test_config_naming_missing_things_fails_clearly(cfg, message):
    gm = ptqpasses.capture(Net().eval(), (torch.randn(2, 3, 10, 10),))
    with pytest.raises(ptqpasses.PassError, match=message) as info:
        ptqpasses.Pipeline([Annotate(cfg)])(gm)
    assert isinstance(info.value.__cause__, ConfigError)


def test_config_rejects_impossible_specs():
    with pytest.raises(ConfigError, match="per tensor"):
        QuantConfig(activation=QSpec(per_channel=True))
    with pytest.raises(ValueError, match="QSpec.dtype"):
        QSpec(dtype="int4")


def test_config_dict_round_trip():
    cfg = QuantConfig(by_module_type={nn.Linear: None, "Conv2d": Scheme()},
                      by_node_regex={"a.*": Scheme()}, keep_float=("x",))
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.policy == "cost"
    # a dict from before the policy existed meant every op integer
    assert QuantConfig.from_dict({"keep_float": []}).policy == "all"
    with pytest.raises(ConfigError, match="policy"):
        QuantConfig(policy="some")


def test_observer_qparams():
    spec = QSpec(dtype="uint8")
    p = qparams_from_range(-1.0, 3.0, spec)
    assert p.zero_point == 64 and math.isclose(p.scale, 4 / 255, rel_tol=1e-6)
    s = qparams_from_range(-2.0, 1.0, QSpec(dtype="int8", symmetric=True))
    assert s.zero_point == 0 and math.isclose(s.scale, 2 / 127, rel_tol=1e-6)
    assert (s.qmin, s.qmax) == (-127, 127)


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_observers_merge(cls):
    xs = [torch.randn(1000) * (i + 1) for i in range(4)]
    whole, a, b = cls("n"), cls("n"), cls("n")
    for x in xs:
        whole(x)
    for x in xs[:2]:
        a(x)
    for x in xs[2:]:
        b(x)
    a.merge(b)
    assert a.batches == whole.batches == 4
    lo_w, hi_w = whole.range()
    lo_m, hi_m = a.range()
    if cls is MinMaxObserver:
        assert (lo_m, hi_m) == (lo_w, hi_w)
    elif cls is HistogramObserver:  # exact counts: the merge is the one-pass histogram
        assert (lo_m, hi_m) == (lo_w, hi_w) and torch.equal(a.counts, whole.counts)
    else:
        assert lo_m < 0 < hi_m


def test_histogram_percentile_clips_outliers():
    x = torch.randn(100_000)
    x[0] = 1000.0
    h, mm = HistogramObserver("n", percentile=99.9), MinMaxObserver("n")
    h(x), mm(x)
    assert mm.range()[1] == 1000.0
    assert h.range()[1] < 10.0


def test_calibration_errors_name_the_node():
    gm = ptqpasses.prepare(Net().eval(), (torch.randn(2, 3, 10, 10),))
    with pytest.raises(CalibrationError, match="zero batches"):
        ptqpasses.calibrate(gm, [], progress=False)
    bad = torch.randn(2, 3, 10, 10)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="node 'x' produced NaN"):
        ptqpasses.calibrate(gm, [(bad,)], progress=False)
    with pytest.raises(CalibrationError, match="no observers"):
        ptqpasses.calibrate(ptqpasses.capture(Net().eval(), (torch.randn(2, 3, 10, 10),)),
                            [(bad,)], progress=False)


class LogBucket(nn.Module):
    """MPNet's relative-position buckets: ``log(0)`` is -inf, scaled, clamped by the model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        n = torch.arange(x.shape[1]).float()
        bucket = (torch.log(n) / 2.0 * 3.0).clamp(min=0.0)
        return self.fc(x) + bucket[:, None]


def test_calibration_inf_leaves_its_users_float_and_says_why(caplog):
    m = LogBucket().eval()
    x = torch.randn(2, 5, 8)
    # (policy "all": integer div / add ask for the value; under the default cost policy no
    # integer op reads it here, so it is never observed)
    with caplog.at_level("WARNING", logger="ptqpasses.calibrate"):
        q = ptqpasses.quantize(m, (x,), [(x,)] * 2, QuantConfig(QSpec(), policy="all"),
                               progress=False)
    assert "node 'log' held Inf during calibration" in caplog.text
    cov = {c.node: c for c in ptqpasses.coverage(q)}
    assert cov["linear_default"].integer  # quantized tensors are finite: fc stays integer
    assert not cov["div"].integer and "input 'log' held Inf" in cov["div"].reason
    torch.testing.assert_close(q(x), m(x), atol=0.2, rtol=0.1)


def test_calibrate_accepts_a_dataloader_and_insert_observers_is_idempotent():
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3, 10, 10))
    gm = ptqpasses.prepare(Net().eval(), (torch.randn(2, 3, 10, 10),))
    n_obs = sum(n.op == "call_module" for n in gm.graph.nodes)
    assert InsertObservers()(gm).modified is False
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == n_obs
    ptqpasses.calibrate(gm, torch.utils.data.DataLoader(ds, batch_size=4), progress=False)
    assert all(meta.get_qparams(n) is not None for n in gm.graph.nodes if n.op == "call_module")


def test_calibration_split_across_graphs_merges_to_the_same_qparams():
    import copy

    from ptqpasses.calibrate import merge
    cfg = QuantConfig(activation=QSpec(observer="minmax"))
    base = ptqpasses.prepare(Net().eval(), (torch.randn(2, 3, 10, 10),), cfg)
    data = [(torch.randn(2, 3, 10, 10) * (i + 1),) for i in range(4)]
    whole, a, b = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    ptqpasses.calibrate(whole, data, progress=False)
    ptqpasses.calibrate(a, data[:2], progress=False)
    ptqpasses.calibrate(b, data[2:], progress=False)
    merge(a, b)
    qa = [meta.get_qparams(n) for n in a.graph.nodes if n.op == "call_module"]
    qw = [meta.get_qparams(n) for n in whole.graph.nodes if n.op == "call_module"]
    assert qa == qw and len(qa) == 4  # x, relu, conv2d_1, mean (the head: float output)
