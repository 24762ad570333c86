"""CrossLayerEqualization, BiasCorrection, SmoothQuant: structure, float equivalence, and a
small model on which each measurably improves the quantized output."""

import copy

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import Pipeline, QSpec, QuantConfig
from ptqpasses.passes import (BiasCorrection, CrossLayerEqualization, FoldBatchNorm, SmoothQuant,
                              bias_correction, smooth_quant)
from ptqpasses.passes.bias_correction import record_bias_shift
from ptqpasses.passes.smooth_quant import record_input_absmax
from ptqpasses.report import sqnr

aten = torch.ops.aten


def _quantized_sqnr(gm, calib, x, ref, config=None, bias_corr=False):
    g = ptqpasses.prepare(copy.deepcopy(gm), calib[0], config)
    ptqpasses.calibrate(g, calib, progress=False)
    if bias_corr:
        bias_correction(g, calib)
    q = ptqpasses.convert(g)
    with torch.no_grad():
        return sqnr(ref, q(x))


# --- CrossLayerEqualization ---------------------------------------------------------------


class BadlyScaled(nn.Module):
    """conv -> ReLU -> conv whose channel ranges differ by 10**3, plus a depthwise chain."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = act()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a2 = act()
        self.c2 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # same function, badly scaled weights (positive factors)
            k = torch.logspace(-1.5, 1.5, 8)
            self.c1.weight.mul_(k[:, None, None, None])
            self.c1.bias.mul_(k)
            self.dw.weight.div_(k[:, None, None, None])

    def forward(self, x):
        return self.c2(self.a2(self.dw(self.a1(self.c1(x)))))


def _captured(model, x):
    gm = ptqpasses.capture(model.eval(), (x,))
    FoldBatchNorm()(gm)
    return gm


def test_cle_equalizes_ranges_keeps_function_and_improves_int8():
    torch.manual_seed(0)
    m = BadlyScaled()
    x, calib = torch.randn(4, 3, 12, 12), [(torch.randn(4, 3, 12, 12),) for _ in range(2)]
    gm = _captured(m, x)
    before = _quantized_sqnr(gm, calib, x, m(x))
    eq = copy.deepcopy(gm)
    assert CrossLayerEqualization()(eq).modified
    eq.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(eq(x), m(x), rtol=1e-4, atol=1e-4)
    convs = [n for n in eq.graph.nodes if n.target is aten.conv2d.default]
    w1 = getattr(eq, convs[0].args[1].target).abs().flatten(1).amax(1)
    wdw = getattr(eq, convs[1].args[1].target).abs().flatten(1).amax(1)
    assert float((w1.max() / w1.min())) < 10  # was ~1000
    assert float(wdw.max() / wdw.min()) < 100
    after = _quantized_sqnr(eq, calib, x, m(x))
    assert after > before + 6.0, (before, after)


def test_cle_relu6_replace_or_skip():
    m = BadlyScaled(act=nn.ReLU6)
    x = torch.randn(2, 3, 8, 8)
    gm = _captured(m, x)
    skip = copy.deepcopy(gm)
    assert not CrossLayerEqualization(relu6="skip")(skip).modified
    rep = copy.deepcopy(gm)
    assert CrossLayerEqualization(relu6="replace")(rep).modified
    targets = {n.target for n in rep.graph.nodes}
    assert aten.hardtanh.default not in targets and aten.relu6.default not in targets
    assert aten.relu.default in targets
    with pytest.raises(ValueError, match="relu6"):
        CrossLayerEqualization(relu6="clip")


def test_cle_text_round_trip():
    p = Pipeline([FoldBatchNorm(), CrossLayerEqualization(relu6="skip", iterations=5)])
    assert str(Pipeline.parse(str(p))) == str(p) == \
        'fold-batchnorm,cross-layer-equalization{relu6="skip",iterations=5}'


# --- BiasCorrection -------------------------------------------------------------------------


class Biased(nn.Module):
    """A conv whose small channel rounds to zero under per-tensor int8 weights."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.c2.weight[:4] = 0.0025  # about half a step of the per-tensor scale: rounds off
            self.c2.weight[4:].uniform_(-0.6, 0.6)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_bias_correction_records_shifts_and_improves_sqnr():
    torch.manual_seed(0)
    m = Biased().eval()
    calib = [(torch.randn(8, 3, 10, 10) + 1,) for _ in range(3)]
    x = torch.randn(8, 3, 10, 10) + 1
    cfg = QuantConfig(weight=QSpec(dtype="int8", symmetric=True, per_channel=False,
                                   observer="minmax"))
    gm = ptqpasses.capture(m, calib[0])
    observed = ptqpasses.prepare(copy.deepcopy(gm), calib[0], cfg)
    ptqpasses.calibrate(observed, calib, progress=False)
    assert record_bias_shift(observed, calib) == 2
    conv2 = [n for n in observed.graph.nodes if n.target is aten.conv2d.default][1]
    shift = ptqpasses.meta.bias_shift(conv2)
    assert shift.shape == (8,) and float(shift[:4].abs().min()) > 3 * float(shift[4:].abs().mean())
    assert BiasCorrection()(observed).modified
    assert ptqpasses.meta.bias_shift(conv2) is None
    before = _quantized_sqnr(gm, calib, x, m(x), cfg)
    after = _quantized_sqnr(gm, calib, x, m(x), cfg, bias_corr=True)
    assert after > before + 1.5, (before, after)
    with pytest.raises(ValueError, match="mode"):
        record_bias_shift(observed, calib, mode="everything")


def test_bias_correction_output_mode_matches_layer_means():
    torch.manual_seed(0)
    m = Biased().eval()
    calib = [(torch.randn(8, 3, 10, 10) + 1,) for _ in range(2)]
    observed = ptqpasses.prepare(m, calib[0])
    ptqpasses.calibrate(observed, calib, progress=False)
    from ptqpasses.passes.bias_correction import layer_output_means
    reference = layer_output_means(observed, calib)
    bias_correction(observed, calib, mode="output")
    qdq = ptqpasses.convert(copy.deepcopy(observed), lower=False)
    from ptqpasses.passes.bias_correction import _channel_means, _wanted
    quant = _channel_means(qdq, _wanted(observed), calib)
    assert quant.keys() == reference.keys()
    for name, ref in reference.items():  # the quantized layer means now match float
        torch.testing.assert_close(quant[name], ref, rtol=0, atol=2e-3)


# --- SmoothQuant ------------------------------------------------------------------------------


class LNLinear(nn.Module):
    """LayerNorm with outlier channels feeding two linears (and, optionally, a residual)."""

    def __init__(self, residual=False):
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.q, self.k = nn.Linear(64, 64), nn.Linear(64, 64)
        self.residual = residual
        with torch.no_grad():
            self.ln.weight.fill_(1.0)
            self.ln.weight[:3] = 40.0  # activation outliers in three channels ...
            self.q.weight[:, :3] /= 40.0  # ... that the next layer does not amplify
            self.k.weight[:, :3] /= 40.0

    def forward(self, x):
        h = self.ln(x)
        y = self.q(h) + self.k(h)
        return y + h if self.residual else y


@pytest.mark.parametrize("residual", [False, True])
def test_smooth_quant_keeps_function_and_improves_int8(residual):
    torch.manual_seed(0)
    m = LNLinear(residual).eval()
    calib = [(torch.randn(4, 16, 64),) for _ in range(3)]
    x = torch.randn(4, 16, 64)
    gm = ptqpasses.capture(m, calib[0])
    # (static linears: the gain measured is SmoothQuant's against one per-tensor scale)
    cfg = QuantConfig(QSpec(), keep_float=("add_1",) if residual else ())
    before = _quantized_sqnr(gm, calib, x, m(x), cfg)
    sm = copy.deepcopy(gm)
    assert record_input_absmax(sm, calib) == 2
    assert SmoothQuant(alpha=0.5)(sm).modified
    sm.graph.lint()
    targets = [n.target for n in sm.graph.nodes]
    assert (aten.div.Tensor in targets) == residual  # LayerNorm folded unless shared
    with torch.no_grad():
        torch.testing.assert_close(sm(x), m(x), rtol=1e-4, atol=1e-3)
    after = _quantized_sqnr(sm, calib, x, m(x), cfg)
    assert after > before + 3.0, (before, after)


def test_smooth_quant_alpha_one_flattens_activation_ranges():
    m = LNLinear().eval()
    calib = [(torch.randn(2, 8, 64),)]
    gm = smooth_quant(ptqpasses.capture(m, calib[0]), calib, alpha=1.0)
    record_input_absmax(gm, calib)
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    absmax = ptqpasses.meta.input_absmax(lin)
    # alpha=1: s = max|x|, every input channel of the linears now peaks at 1
    torch.testing.assert_close(absmax, torch.ones(64), rtol=1e-4, atol=1e-4)
