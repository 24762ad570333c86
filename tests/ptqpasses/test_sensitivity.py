"""Sensitivity ranking and AutoMixedPrecision: the search meets its target on a small model."""

import copy

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses.report import sqnr
from ptqpasses.sensitivity import AutoMixedPrecision, node_sensitivity, output_sqnr

#: Every op of the integer set integer: the model below breaks that on purpose. (The default
#: cost policy keeps its masked add float by itself: it feeds a softmax.)
ALL = ptqpasses.QuantConfig(policy="all")


class MaskedScores(nn.Module):
    """A BERT-like additive -1e4 mask: int8 on the masked sum destroys the scores."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x, mask):
        h = torch.relu(self.fc1(x))
        scores = self.fc2(h) + (1.0 - mask) * -10000.0
        return self.fc3(torch.softmax(scores, dim=-1) * 4.0)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = (torch.rand(8, 16, generator=g) > 0.3).float()
        out.append((torch.randn(8, 16, generator=g), mask))
    return out


def test_sensitivity_ranks_the_masked_add_first():
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib = _data(3, 0)
    gm = ptqpasses.capture(m, calib[0])
    ranking = node_sensitivity(gm, calib, calib, ALL)
    assert ranking[0].node == "add" and ranking[0].op == "add.Tensor"
    assert ranking[0].score < ranking[-1].score - 10
    # the scalar scalings (mask * -1e4, softmax * 4) are integer requantizes too
    assert {r.node for r in ranking} == {"linear", "linear_1", "linear_2", "add", "mul", "mul_1"}


def test_the_cost_policy_keeps_the_masked_add_float():
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib, held = _data(3, 0), _data(2, 1)
    q = ptqpasses.quantize(m, calib[0], calib, progress=False)
    assert not [n for n in q.graph.nodes if n.target is torch.ops.ptq.add.default]
    assert all(c.integer for c in ptqpasses.coverage(q) if c.op.startswith("ptq.linear"))
    with torch.no_grad():  # (policy "all": below 25 dB, see the next test)
        assert output_sqnr([m(*b) for b in held], [q(*b) for b in held]) >= 25.0


def test_auto_mixed_precision_meets_its_target_and_reports_changes():
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib, held = _data(3, 0), _data(2, 1)
    gm = ptqpasses.capture(m, calib[0])
    result = AutoMixedPrecision(target=25.0).search(gm, calib, calib, ALL)
    assert result.score_int8 < 25.0 <= result.score and result.met
    assert [r.node for r in result.raised] == ["add"]
    assert result.config.keep_float == ("add",)
    text = result.to_markdown()
    assert "1/6 compute nodes in float" in text and "| add | add.Tensor |" in text
    # the real integer graph with that config meets the target on held-out data too
    q = ptqpasses.quantize(gm, calib[0], calib, result.config, progress=False)
    with torch.no_grad():
        ref, out = [m(*b) for b in held], [q(*b) for b in held]
    assert output_sqnr(ref, out) >= 25.0
    assert all(c.integer for c in ptqpasses.coverage(q) if c.op.startswith("ptq.linear"))


def test_auto_mixed_precision_with_a_metric_drop():
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib = _data(3, 0)
    gm = ptqpasses.capture(m, calib[0])

    def agreement(ref, out):  # argmax agreement, 1.0 for the float model
        r, o = torch.cat(ref).argmax(-1), torch.cat(out).argmax(-1)
        return float((r == o).float().mean())

    result = AutoMixedPrecision(metric=agreement, max_drop=0.02).search(gm, calib, calib, ALL)
    assert result.target == 0.98 and result.met
    assert "add" in result.config.keep_float


def test_report_ranked_markdown_and_png(tmp_path):
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib = _data(2, 0)
    gm = ptqpasses.capture(m, calib[0])
    result = AutoMixedPrecision(target=25.0).search(gm, calib, calib, ALL)
    q = ptqpasses.quantize(copy.deepcopy(gm), calib[0], calib, result.config, progress=False)
    rep = ptqpasses.report(q, gm, calib)
    text = rep.ranked_markdown(result, title="masked")
    assert "ranked by damage" in text and "| 1 |" in text and "alone-quantized score" in text
    assert "raised by mixed precision" in text and "| add | aten.add.Tensor | float32 |" in text
    assert all(r.precision in ("uint8", "int8") for r in rep.nodes)
    pytest.importorskip("matplotlib")
    paths = rep.save(tmp_path, sensitivity=result, title="masked")
    assert [p.name for p in paths] == ["report.md", "report.png"]
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


def test_auto_mixed_precision_raising_to_int16_keeps_integer_ops():
    torch.manual_seed(0)
    m = MaskedScores().eval()
    calib, held = _data(3, 0), _data(2, 1)
    gm = ptqpasses.capture(m, calib[0])
    result = AutoMixedPrecision(target=20.0, raise_to="int16").search(gm, calib, calib, ALL)
    assert result.met and result.score_int8 < 20.0 and "add" in [r.node for r in result.raised]
    assert result.config.keep_float == ()
    q = ptqpasses.quantize(copy.deepcopy(gm), calib[0], calib, result.config, progress=False)
    adds = [n for n in q.graph.nodes if n.target is torch.ops.ptq.add.default]
    assert len(adds) == 1 and ptqpasses.meta.get_qparams(adds[0]).dtype == "int16"
    with torch.no_grad():  # the real integer graph: target met on the search data, ~met held out
        assert output_sqnr([m(*b) for b in calib], [q(*b) for b in calib]) >= 20.0
        assert output_sqnr([m(*b) for b in held], [q(*b) for b in held]) >= 18.0


def test_report_captures_the_float_model_with_the_same_dynamic_dims():
    from ptqpasses_tools.models import bert_encoder

    m = bert_encoder(take_embeddings=True).eval()
    calib = [(torch.randn(2, 8, 64),), (torch.randn(2, 8, 64),)]
    q = ptqpasses.quantize(m, calib[0], calib, progress=False, dynamic_dims={0: {1: "seq"}})
    data = [(torch.randn(2, 8, 64),), (torch.randn(3, 13, 64),)]  # another sequence length
    rep = ptqpasses.report(q, m, data, dynamic_dims={0: {1: "seq"}})
    assert rep.nodes and rep.batches == 2 and rep.output_sqnr_db > 10
