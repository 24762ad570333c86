import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import CaptureError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_batch_is_dynamic_even_from_a_batch_of_one():
    gm = ptqpasses.capture(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), (torch.randn(1, 3),))
    assert gm(torch.randn(7, 3)).shape == (7, 4)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def test_declared_sequence_dimension_is_dynamic():
    from tools.models import bert_encoder
    m = bert_encoder(take_embeddings=True).eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 8, 64),), dynamic_dims={0: {1: "seq"}})
    x = torch.randn(3, 13, 64)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-4, atol=1e-4)


def test_accepts_exported_program_and_graph_module():
    m = nn.Linear(3, 2).eval()
    ep = torch.export.export(m, (torch.randn(2, 3),))
    gm = ptqpasses.capture(ep)
    again = ptqpasses.capture(gm)
    assert again is not gm and again.code == gm.code  # a copy, used as is (no re-export)


def test_unexportable_model_names_construct_and_line():
    with pytest.raises(CaptureError) as info:
        ptqpasses.capture(DataDependent(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert "DataDependent" in msg and "data-dependent" in msg.lower()
    assert "test_capture.py" in msg  # the user's source line torch reported
    assert "What you can do" in msg


def test_bad_dynamic_dims_input_index():
    with pytest.raises(ValueError, match="dynamic_dims names input 3"):
        ptqpasses.capture(nn.Linear(3, 2), (torch.randn(2, 3),), dynamic_dims={3: {1: "s"}})


def test_quantizing_a_captured_graph_leaves_it_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    gm = ptqpasses.capture(model, (x,))
    code, nodes = gm.code, len(gm.graph.nodes)
    q = ptqpasses.quantize(gm, (x,), [(x,)], progress=False)
    assert any(str(n.target).startswith("ptq.") for n in q.graph.nodes)
    assert gm.code == code and len(gm.graph.nodes) == nodes  # batch norm not folded in gm
    torch.testing.assert_close(gm(x), model(x))
