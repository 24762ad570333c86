import torch
import torch.nn.functional as F
from torch import nn

import ptqpasses
from ptqpasses import FoldBatchNorm

aten = torch.ops.aten


def _randomize(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


class PaddedConvBN(nn.Module):
    """EfficientNet-style: explicit pad, functional conv with a module's weight, BN module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.bn = _randomize(nn.BatchNorm2d(6))

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))
        return self.bn(F.conv2d(x, self.conv.weight, None, 2))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3)
        self.b1 = _randomize(nn.BatchNorm1d(5))
        self.c2 = nn.Conv2d(3, 4, 3, groups=1)
        self.b2 = _randomize(nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 7)
        self.b3 = _randomize(nn.BatchNorm1d(7))
        self.pw = nn.Conv1d(5, 6, 1)  # pointwise: captured as permute -> linear -> permute
        self.b4 = _randomize(nn.BatchNorm1d(6))

    def forward(self, x1, x2):
        y1 = self.b1(self.c1(x1))  # captured as unsqueeze -> conv2d -> squeeze
        y2 = self.b2(self.c2(x2)).mean([2, 3])
        return self.b4(self.pw(y1)), self.b3(self.fc(y2))


def _max_rel(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach())


def _has_bn(gm):
    return any(n.target in (aten.batch_norm.default,
                            aten._native_batch_norm_legit_no_training.default)
               for n in gm.graph.nodes)


def test_folds_conv1d_conv2d_linear():
    m = Mixed().eval()
    args = (torch.randn(2, 3, 10), torch.randn(2, 3, 8, 8))
    gm = ptqpasses.capture(m, args)
    assert _has_bn(gm)
    res = FoldBatchNorm()(gm)
    assert res.modified and not _has_bn(gm)
    gm.graph.lint()
    test_args = (torch.randn(5, 3, 10), torch.randn(5, 3, 8, 8))
    for got, want in zip(gm(*test_args), m(*test_args)):
        assert _max_rel(got, want) <= 1e-5


def test_folds_functional_conv_after_pad():
    m = PaddedConvBN().eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 4, 9, 9),))
    FoldBatchNorm()(gm)
    assert not _has_bn(gm)
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    assert conv.args[2] is not None  # the folded bias was added
    x = torch.randn(3, 4, 9, 9)
    assert _max_rel(gm(x), m(x)) <= 1e-5


def test_bn_without_conv_is_left_alone():
    m = nn.Sequential(nn.ReLU(), _randomize(nn.BatchNorm2d(3))).eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 3, 4, 4),))
    assert FoldBatchNorm()(gm).modified is False
    assert _has_bn(gm)
