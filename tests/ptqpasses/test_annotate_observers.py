"""Annotate (config resolution, roles), observers, calibration errors."""

import math

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import (Annotate, CalibrationError, ConfigError, InsertObservers, QSpec,
                       QuantConfig, Scheme, meta)
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
    assert q["linear"].role == "compute" and q["linear"].output is not None


def test_overrides_by_name_type_regex_and_keep_float():
    int8 = Scheme(activation=QSpec(dtype="int8", symmetric=True),
                  weight=QSpec(dtype="int8", symmetric=True, per_channel=False))
    _, q = _annotated(QuantConfig(by_module_name={"features.2": None},
                                  by_module_type={nn.Linear: int8}))
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
    assert again.to_dict() == cfg.to_dict()


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
    elif cls is HistogramObserver:
        assert math.isclose(hi_m, hi_w, rel_tol=0.02) and math.isclose(lo_m, lo_w, rel_tol=0.02)
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
    with caplog.at_level("WARNING", logger="ptqpasses.calibrate"):
        q = ptqpasses.quantize(m, (x,), [(x,)] * 2, progress=False)
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
    assert qa == qw and len(qa) == 5
