"""MSE and entropy range setting: better clipping than min/max, mergeable statistics."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqpasses.meta import QSpec
from ptqpasses.observers import OBSERVERS, make_observer, weight_qparams
from ptqpasses.report import sqnr


def _fake_quant(x, p):
    return ((torch.round(x / p.scale) + p.zero_point).clamp(p.qmin, p.qmax) - p.zero_point) * p.scale


def _heavy_tailed(n=200000, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.Laplace(0.0, 1.0).sample((n,))


def test_registered_and_selectable_by_qspec():
    assert {"mse", "entropy"} <= set(OBSERVERS)
    assert make_observer(QSpec(observer="mse"), "a").kind == "mse"
    assert make_observer(QSpec(observer="entropy"), "a").kind == "entropy"


def test_mse_minimizes_error_and_entropy_clips_tails():
    x = _heavy_tailed()
    db, scale = {}, {}
    for k in ("minmax", "histogram", "mse", "entropy"):
        s = QSpec(dtype="int8", symmetric=True, observer=k)
        ob = make_observer(s, "x")
        ob(x[:100000]), ob(x[100000:])
        p = ob.qparams(s)
        db[k], scale[k] = sqnr(x, _fake_quant(x, p)), p.scale
    # MSE minimizes the squared error: no other range does better on the same data
    assert db["mse"] >= max(db.values()) - 1e-9 and db["mse"] > db["minmax"]
    assert scale["entropy"] <= scale["minmax"] and db["entropy"] > db["minmax"] - 0.5


def test_entropy_clips_laplace_tails_on_most_samples():
    """The KL minimum is noisy: on this seed-0 sample one pass over the data keeps the full
    range (the histogram before the exact one did too; it clipped only when re-binning
    between two batches blurred it). On most samples it clips, at about min/max's error."""
    clipped = []
    for seed in range(4):
        x = _heavy_tailed(seed=seed)
        s = QSpec(dtype="int8", symmetric=True, observer="entropy")
        ob = make_observer(s, "x")
        ob(x[:100000]), ob(x[100000:])
        p, mm = ob.qparams(s), _minmax(x, QSpec(dtype="int8", symmetric=True, observer="minmax"))
        assert p.scale <= mm.scale
        assert sqnr(x, _fake_quant(x, p)) > sqnr(x, _fake_quant(x, mm)) - 0.5
        clipped.append(p.scale < mm.scale)
    assert sum(clipped) >= 3


def test_one_sided_relu_output_uint8():
    x = _heavy_tailed().abs()
    s = QSpec(observer="mse")
    ob = make_observer(s, "x")
    ob(x)
    p = ob.qparams(s)
    assert p.zero_point == 0 and p.scale * 255 < float(x.max())
    assert sqnr(x, _fake_quant(x, p)) > sqnr(x, _fake_quant(x, _minmax(x)))


def test_entropy_on_a_relu_output_with_many_exact_zeros_does_not_collapse():
    """~69% exact zeros (a ReLU's): the zero bin's spike made every range wider than one bin
    per level look lossy, so KL took the narrowest candidate (clipped at 2.0 where the 99.9th
    percentile is 5.2; MobileNetV2's ReLU6 outputs at 1.44, 48% top-1 agreement)."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(200000, generator=g) - 0.5) * 2
    s = QSpec(dtype="uint8", symmetric=False, observer="entropy")
    ob = make_observer(s, "relu")
    ob(x)
    p = ob.qparams(s)
    assert p.zero_point == 0
    assert p.scale * 255 > float(torch.quantile(x[:100000], 0.999))
    assert sqnr(x, _fake_quant(x, p)) > 40  # (measured 44.9 dB; clipped at 2.0: 9.6 dB)


def _minmax(x, spec=QSpec(observer="minmax")):
    ob = make_observer(spec, "m")
    ob(x)
    return ob.qparams(spec)


def test_merged_statistics_give_the_same_range():
    x = _heavy_tailed()
    for kind in ("mse", "entropy"):
        s = QSpec(dtype="int8", symmetric=True, observer=kind)
        whole, a, b = (make_observer(s, "x") for _ in range(3))
        whole(x[:100000]), whole(x[100000:])
        a(x[:100000]), b(x[100000:])
        a.merge(b)
        assert (a.lo, a.hi) == (whole.lo, whole.hi) and a.batches == 2
        # exact counts on a grid fixed by the range: the merge is the one-pass histogram
        assert torch.equal(a.counts, whole.counts) and torch.equal(a.hist, whole.hist)
        assert a.qparams(s) == whole.qparams(s)


def test_mse_weight_qparams_per_channel_lower_error():
    w = torch.distributions.StudentT(2.0).sample((16, 64, 3, 3)) * 0.05
    errs = {}
    for kind in ("minmax", "mse"):
        spec = QSpec(dtype="int8", symmetric=True, per_channel=True, observer=kind)
        scales, zps = weight_qparams(w, spec)
        assert scales.shape == (16,) and scales.dtype == torch.float32
        q = (torch.round(w / scales[:, None, None, None])).clamp(-127, 127) * scales[:, None, None, None]
        errs[kind] = float(((q - w) ** 2).sum())
    assert errs["mse"] < errs["minmax"]  # heavy tails: clipping pays a little at 8 bits


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(["normal", "relu", "outlier", "shifted"]),
       spec=st.sampled_from([QSpec(dtype="uint8", symmetric=False, observer="mse"),
                             QSpec(dtype="int8", symmetric=True, observer="mse"),
                             QSpec(dtype="int16", symmetric=True, observer="mse")]))
def test_mse_prefix_sum_search_equals_the_bin_by_bin_definition(seed, shape, spec):
    g = torch.Generator().manual_seed(seed)
    ob = make_observer(spec, "x")
    for _ in range(2):
        x = torch.randn(3000, generator=g) * (1 + seed % 7)
        x = {"relu": x.relu(), "outlier": torch.cat([x, x.abs().max()[None] * 40]),
             "shifted": x + 3.0}.get(shape, x)
        ob(x)
    assert ob._search(spec) == ob._search_dense(spec)
