"""Small realistic integer-operator models (weights as buffers -> get_attr)."""

from __future__ import annotations

import torch

from tests.backends.strategies import multipliers, weight

P = torch.ops.ptq
aten = torch.ops.aten
I8, U8 = torch.int8, torch.uint8


def _bias(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3000, 3000, (n,), generator=g, dtype=torch.int32)


class SmallCNN(torch.nn.Module):
    """quantize -> conv+relu -> depthwise conv -> conv -> residual add -> max pool ->
    avg pool -> mean -> flatten -> linear -> dequantize (uint8 activations, zp != 0)."""

    def __init__(self):
        super().__init__()
        bufs = {"w1": weight(1, (16, 3, 3, 3)), "b1": _bias(16, 2),
                "m1": multipliers(3, 16, 0.004),
                "w2": weight(4, (16, 1, 3, 3)), "b2": _bias(16, 5),
                "m2": multipliers(6, 16, 0.01),
                "w3": weight(7, (16, 16, 1, 1)), "b3": _bias(16, 8),
                "m3": multipliers(9, 16, 0.004),
                "w4": weight(10, (10, 16)), "b4": _bias(10, 11), "m4": multipliers(12, 10, 0.01)}
        for k, v in bufs.items():
            self.register_buffer(k, v)

    def forward(self, x):
        q = P.quantize.default(x, 0.02, 128, 0, 255, U8)
        a = P.conv2d.default(q, 128, self.w1, self.b1, [1, 1], [1, 1], [1, 1], 1, self.m1,
                             3, 3, 255, U8)  # fused ReLU: qmin = zp
        d = P.conv2d.default(a, 3, self.w2, self.b2, [1, 1], [1, 1], [1, 1], 16, self.m2,
                             0, -128, 127, I8)
        c = P.conv2d.default(d, 0, self.w3, self.b3, [1, 1], [0, 0], [1, 1], 1, self.m3,
                             -4, -128, 127, I8)
        r = P.add.default(a, 3, 4096, c, -4, 2048, 1.0 / 8192, 5, 5, 255, U8)
        p = P.max_pool2d.default(r, [3, 3], [2, 2], [1, 1], [1, 1], False)
        p = P.avg_pool2d.default(p, 5, [2, 2], [1, 1], [0, 0], 0.25, 2, 0, 255, U8)
        m = P.mean.default(p, 2, [2, 3], True, 1.0 / 4, 1, 0, 255, U8)
        f = aten.flatten.using_ints(m, 1)
        y = P.linear.default(f, 1, self.w4, self.b4, self.m4, 0, -128, 127, I8)
        return (P.dequantize.default(y, 0.05, 0),)


class EncoderBlock(torch.nn.Module):
    """A BERT-style block: int8 linears (q/k/v/out/ffn), view/permute/transpose on int8,
    int8 matmuls, float softmax / layer_norm / gelu islands, requantize, residual add."""

    def __init__(self, t: int = 6, d: int = 16, h: int = 2):
        super().__init__()
        self.t, self.d, self.h = t, d, h
        for i, name in enumerate(["q", "k", "v", "o", "f1", "f2"]):
            n_out = 32 if name == "f1" else d
            n_in = 32 if name == "f2" else d
            self.register_buffer(f"w{name}", weight(20 + i, (n_out, n_in)))
            self.register_buffer(f"b{name}", _bias(n_out, 30 + i))
            self.register_buffer(f"m{name}", multipliers(40 + i, n_out, 0.002))
        self.register_buffer("gamma", torch.rand(d) + 0.5)
        self.register_buffer("beta", torch.rand(d) - 0.5)

    def _heads(self, x):
        b = aten.sym_size.int(x, 0)
        x = aten.view.default(x, [b, self.t, self.h, self.d // self.h])
        return aten.permute.default(x, [0, 2, 1, 3])

    def forward(self, x):
        q = P.quantize.default(x, 0.03, 0, -128, 127, I8)
        qq = P.linear.default(q, 0, self.wq, self.bq, self.mq, 2, -128, 127, I8)
        kk = P.linear.default(q, 0, self.wk, self.bk, self.mk, -1, -128, 127, I8)
        vv = P.linear.default(q, 0, self.wv, self.bv, self.mv, 0, -128, 127, I8)
        qh, kh, vh = self._heads(qq), self._heads(kk), self._heads(vv)
        kt = aten.transpose.int(kh, -1, -2)
        s = P.matmul.default(qh, 2, kt, -1, 0.002, 0, -128, 127, I8)
        sf = aten.softmax.int(P.dequantize.default(s, 0.1, 0), -1)
        a = P.quantize.default(sf, 1.0 / 255, 0, 0, 255, U8)
        ctx = P.matmul.default(a, 0, vh, 0, 0.01, 0, -128, 127, I8)
        ctx = aten.contiguous.default(aten.transpose.int(ctx, 1, 2))
        ctx = aten.reshape.default(ctx, [-1, self.t, self.d])
        o = P.linear.default(ctx, 0, self.wo, self.bo, self.mo, 0, -128, 127, I8)
        o = P.requantize.default(o, 0, 0.5, 0, -128, 127, I8)
        r = P.add.default(o, 0, 1024, q, 0, 1024, 1.0 / 1024, 0, -128, 127, I8)
        hf = aten.layer_norm.default(P.dequantize.default(r, 0.03, 0), [self.d], self.gamma,
                                     self.beta, 1e-5)
        hq = P.quantize.default(hf, 0.02, 0, -128, 127, I8)
        f = P.linear.default(hq, 0, self.wf1, self.bf1, self.mf1, 0, -128, 127, I8)
        g = aten.gelu.default(P.dequantize.default(f, 0.05, 0))
        gq = P.quantize.default(g, 0.02, -10, -128, 127, I8)
        y = P.linear.default(gq, -10, self.wf2, self.bf2, self.mf2, 0, -128, 127, I8)
        return (P.dequantize.default(y, 0.05, 0), P.dequantize.default(s, 0.1, 0))


def export_dynamic(module: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export with a dynamic batch -> GraphModule (the real flow's graph form)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    return ep.module()


class Tables(torch.nn.Module):
    """sigmoid and GELU between two 1x1 convs: lowered to table lookups (``ptq.lut``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(torch.sigmoid(self.a(x))))
