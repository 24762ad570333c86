"""Whole small graphs through TVM on the host target.

Integer-only graphs are bit-exact. Graphs with float islands (softmax, layer_norm, gelu between
dequantize and quantize) are not guaranteed bit-exact: TVM's float kernels differ from ATen's in
the last ulp, which can move a value across a rounding boundary in the following quantize.
Tolerance there: every quantized result within 1 LSB (stated per test below).
"""

from __future__ import annotations

import pytest
import torch

from tests.backends.conftest import assert_exact
from tests.backends.models import EncoderBlock, SmallCNN, export_dynamic


@pytest.fixture(scope="module")
def cnn(tvm_backend):
    gm = torch.fx.symbolic_trace(SmallCNN())
    x = torch.rand(2, 3, 12, 12) * 4 - 2
    return gm, tvm_backend.compile(gm, "host", example_inputs=[x])


def test_cnn_bit_exact_any_batch(cnn):
    gm, cm = cnn
    for n in (1, 2, 5):
        x = torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(n)) * 4 - 2
        assert_exact(cm(x), gm(x), f"SmallCNN batch {n}")


def test_cnn_exported_with_dynamic_batch(tvm_backend):
    """torch.export graph (meta['val'] with a symbolic batch) needs no example inputs."""
    x = torch.rand(2, 3, 12, 12) * 4 - 2
    gm = export_dynamic(SmallCNN(), x)
    cm = tvm_backend.compile(gm, "host")
    assert cm.inputs[0].shape == ("batch", 3, 12, 12)
    x3 = torch.rand(3, 3, 12, 12) * 4 - 2
    assert_exact(cm(x3), gm(x3), "exported SmallCNN")


def test_encoder_block_within_one_lsb(tvm_backend):
    """Tolerance: 1 LSB of the output scale (float softmax/layer_norm/gelu islands); the
    attention-score output (integer path only, before the islands) is bit-exact."""
    x = torch.randn(2, 6, 16)
    gm = export_dynamic(EncoderBlock(), x)
    cm = tvm_backend.compile(gm, "host")
    for n in (1, 3):
        xb = torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(n))
        got, want = cm(xb), gm(xb)
        assert_exact(got[1], want[1], "attention scores (integer path)")
        lsb = 0.05
        assert (got[0] - want[0]).abs().max().item() <= lsb + 1e-6
        assert (got[0] != want[0]).float().mean().item() < 0.05


def test_graph_traced_for_one_batch_compiles_static(tvm_backend):
    """A literal reshape (batch baked in by tracing) falls back to a static module, with a
    warning, and other batch sizes are refused clearly instead of failing inside TVM."""
    from tests.backends.conftest import P, GraphBuilder
    from tests.backends.strategies import int_tensor

    b = GraphBuilder()
    x = b.input("x")
    v = b.call(torch.ops.aten.view.default, x, [2, 12])
    gm = b.build(b.call(P.requantize.default, v, 0, 0.5, 0, -128, 127, torch.int8))
    xin = int_tensor(0, (2, 3, 4), torch.int8)
    with pytest.warns(UserWarning, match="literal shape \\[2, 12\\]"):
        cm = tvm_backend.compile(gm, "host", example_inputs=[xin])
    assert_exact(cm(xin), gm(xin))
    with pytest.raises(ValueError, match="expected int8\\[2, 3, 4\\]"):
        cm(int_tensor(0, (3, 3, 4), torch.int8))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_models_bit_exact(tvm_backend, name):
    """Full ResNet-18 / MobileNetV2 architectures (random int8 weights), bit-exact at 32x32
    (maps down to 1x1) and 224x224 (the real shapes: 112 .. 7)."""
    from tests.backends import zoo

    gm = getattr(zoo, name)()
    for s in (32, 224):
        x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(s)) * 4 - 2
        cm = tvm_backend.compile(gm, "host", example_inputs=[x])
        want = gm(x)
        assert want[0].std() > 0  # activations did not collapse
        assert_exact(cm(x), want, f"{name} {s}x{s}")


class _SeqLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from tests.backends.strategies import multipliers, weight

        self.register_buffer("w", weight(0, (8, 12)))
        self.register_buffer("m", multipliers(1, 8, 0.004))

    def forward(self, x):
        from tests.backends.conftest import P

        q = P.quantize.default(x, 0.05, 0, -128, 127, torch.int8)
        y = P.linear.default(q, 0, self.w, None, self.m, 0, -128, 127, torch.int8)
        return P.dequantize.default(y, 0.1, 0)


def test_exported_dynamic_sequence_dim(tvm_backend):
    """torch.export symbols other than the batch stay symbolic (shared by name)."""
    x = torch.randn(2, 5, 12)
    dims = ({0: torch.export.Dim("b", max=64), 1: torch.export.Dim("t", max=512)},)
    gm = torch.export.export(_SeqLinear(), (x,), dynamic_shapes=dims).module()
    cm = tvm_backend.compile(gm, "host")
    assert cm.inputs[0].shape[0] == "batch" and isinstance(cm.inputs[0].shape[1], str)
    for n, t in ((1, 3), (4, 9)):
        xb = torch.randn(n, t, 12)
        assert_exact(cm(xb), gm(xb), f"batch {n} seq {t}")
