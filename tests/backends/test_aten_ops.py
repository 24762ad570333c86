"""ATen nodes around the integer ops: int8 pass-throughs (bit-exact) and float islands."""

from __future__ import annotations

import torch

from tests.backends.conftest import P, GraphBuilder, assert_exact
from tests.backends.strategies import int_tensor

aten = torch.ops.aten


def test_integer_passthroughs_are_exact(tvm_backend):
    b = GraphBuilder()
    x = b.input("x")  # int8 [B, 4, 6]
    outs = [
        b.call(aten.view.default, x, [-1, 24]),
        b.call(aten.reshape.default, x, [-1, 2, 12]),
        b.call(aten.flatten.using_ints, x, 1),
        b.call(aten.permute.default, x, [0, 2, 1]),
        b.call(aten.contiguous.default, b.call(aten.transpose.int, x, 1, 2)),
        b.call(aten.clone.default, x),
        b.call(aten.squeeze.dim, b.call(aten.unsqueeze.default, x, 1), 1),
        b.call(aten.dropout.default, x, 0.1, False),
        b.call(aten.slice.Tensor, x, 2, 1, 5, 2),
        b.call(aten.select.int, x, 1, 2),
        b.call(aten.expand.default, b.call(aten.unsqueeze.default, x, 1), [-1, 3, -1, -1]),
    ]
    outs = [b.call(P.requantize.default, o, 3, 0.5, -1, -128, 127, torch.int8) for o in outs]
    gm = b.build(tuple(outs))
    cm = tvm_backend.compile(gm, "host", example_inputs=[int_tensor(0, (2, 4, 6), torch.int8)])
    for n in (2, 5):
        xin = int_tensor(n, (n, 4, 6), torch.int8)
        assert_exact(cm(xin), gm(xin), f"pass-throughs batch {n}")


def test_float_islands(tvm_backend):
    """Float ops between dequantize and quantize; tolerance 1e-5 on floats, 1 LSB after the
    final quantize (TVM's float kernels are not ATen's)."""
    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 8]
    ids = b.input("ids")  # int64 [B, 3]
    f = b.call(P.dequantize.default, q, 0.05, 2)
    table = b.const(torch.randn(11, 8))
    wf = b.const(torch.randn(5, 8))
    outs = [
        b.call(aten.sigmoid.default, f),
        b.call(aten.hardswish.default, f),
        b.call(aten.div.Tensor, f, 3.0),
        b.call(aten.mul.Tensor, f, f),
        b.call(aten.add.Tensor, f, 1.5),
        b.call(aten.gelu.default, f),
        b.call(aten.softmax.int, f, -1),
        b.call(aten.linear.default, f, wf),
        b.call(aten.embedding.default, table, ids),
    ]
    qs = [b.call(P.quantize.default, o, 0.01, 0, -128, 127, torch.int8) for o in outs[:4]]
    gm = b.build(tuple(outs + qs))
    inputs = [int_tensor(1, (3, 8), torch.int8), torch.randint(0, 11, (3, 3))]
    got, want = tvm_backend.compile(gm, "host", example_inputs=inputs)(*inputs), gm(*inputs)
    for g, w in zip(got[:len(outs)], want[:len(outs)]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for g, w in zip(got[len(outs):], want[len(outs):]):
        assert (g.int() - w.int()).abs().max() <= 1
