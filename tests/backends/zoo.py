"""Integer-operator versions of ResNet-18 and MobileNetV2 with random int8 weights.

The architectures are the real ones (torchvision layer shapes); weights, biases and
multipliers are random but scaled (``~0.01 / sqrt(fan_in)``) so activations neither vanish
nor saturate. Built with ``GraphBuilder``: what the lowering produces, without a trained model.
"""

from __future__ import annotations

import math

import torch

from tests.backends.conftest import P, GraphBuilder
from tests.backends.strategies import weight

U8, I8 = torch.uint8, torch.int8


class _Net:
    def __init__(self):
        self.b = GraphBuilder()
        self.seed = 0

    def conv(self, x, zp, c_in, c_out, k, stride=1, groups=1, relu=True, out_zp=None):
        self.seed += 1
        fan_in = c_in // groups * k * k
        w = self.b.const(weight(self.seed, (c_out, c_in // groups, k, k)))
        bias = self.b.const(torch.randint(-2000, 2000, (c_out,), dtype=torch.int32))
        g = torch.Generator().manual_seed(self.seed)
        # ~2 / (std(w) * sqrt(fan_in)) keeps the activation spread through ReLUs.
        m = self.b.const(((torch.rand(c_out, generator=g) + 0.5) * 2.0
                          / (74 * math.sqrt(fan_in))).float())
        ozp = (5 if relu else 128) if out_zp is None else out_zp
        y = self.b.call(P.conv2d.default, x, zp, w, bias, [stride, stride], [k // 2, k // 2],
                        [1, 1], groups, m, ozp, ozp if relu else 0, 255, U8)
        return y, ozp

    def add(self, a, azp, b, bzp, relu=True):
        y = self.b.call(P.add.default, a, azp, 8192, b, bzp, 8192, 1.0 / 16384, 5,
                        5 if relu else 0, 255, U8)
        return y, 5

    def head(self, x, zp, c, classes):
        m = self.b.call(P.mean.default, x, zp, [2, 3], True, 1.0 / 4, 7, 0, 255, U8)
        f = self.b.call(torch.ops.aten.flatten.using_ints, m, 1)
        self.seed += 1
        w = self.b.const(weight(self.seed, (classes, c)))
        mult = self.b.const(torch.full((classes,), 4.0 / (74 * math.sqrt(c))))
        y = self.b.call(P.linear.default, f, 7, w, None, mult, 0, -128, 127, I8)
        return self.b.call(P.dequantize.default, y, 0.1, 0)


def resnet18(classes: int = 10) -> torch.fx.GraphModule:
    """ResNet-18: 7x7/2 stem, max pool, 4 stages of 2 BasicBlocks, mean, fc."""
    n = _Net()
    x = n.b.input("x")
    q = n.b.call(P.quantize.default, x, 0.02, 128, 0, 255, U8)
    y, zp = n.conv(q, 128, 3, 64, 7, stride=2)
    y = n.b.call(P.max_pool2d.default, y, [3, 3], [2, 2], [1, 1], [1, 1], False)
    c = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h, hzp = n.conv(y, zp, c, width, 3, stride)
            h, hzp = n.conv(h, hzp, width, width, 3, relu=False)
            sc, sczp = (y, zp) if stride == 1 and c == width else n.conv(
                y, zp, c, width, 1, stride, relu=False)
            y, zp = n.add(h, hzp, sc, sczp)
            c = width
    return n.b.build((n.head(y, zp, c, classes),))


def mobilenet_v2(classes: int = 10) -> torch.fx.GraphModule:
    """MobileNetV2: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project, residual)."""
    n = _Net()
    x = n.b.input("x")
    q = n.b.call(P.quantize.default, x, 0.02, 128, 0, 255, U8)
    y, zp = n.conv(q, 128, 3, 32, 3, stride=2)
    c = 32
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
    for t, width, reps, first_stride in setting:
        for i in range(reps):
            stride = first_stride if i == 0 else 1
            h, hzp = (y, zp) if t == 1 else n.conv(y, zp, c, c * t, 1)
            h, hzp = n.conv(h, hzp, c * t, c * t, 3, stride, groups=c * t)
            h, hzp = n.conv(h, hzp, c * t, width, 1, relu=False)
            if stride == 1 and c == width:
                h, hzp = n.add(h, hzp, y, zp, relu=False)
            y, zp, c = h, hzp, width
    y, zp = n.conv(y, zp, c, 1280, 1)
    return n.b.build((n.head(y, zp, 1280, classes),))
