import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses import CaptureError
from ptqpasses.capture import DIM_BOUNDS_KEY


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
    from ptqpasses_tools.models import bert_encoder
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


class PositionTable(nn.Module):
    """Absolute position embeddings (BERT's): the table size bounds the sequence."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 16, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x + self.pos[:, : x.shape[1]])


def test_a_sequence_the_model_bounds_gets_the_suggested_bound(caplog):
    m = PositionTable().eval()
    with caplog.at_level("WARNING", logger="ptqpasses.capture"):
        gm = ptqpasses.capture(m, (torch.randn(2, 6, 8),), dynamic_dims={0: {1: "seq"}})
    assert gm.meta[DIM_BOUNDS_KEY]["seq"][1] == 16
    assert "seq <= 16" in caplog.text  # the user is told which bound capture chose
    x = torch.randn(3, 11, 8)
    torch.testing.assert_close(gm(x), m(x))


def test_dynamic_dims_take_bounded_dims():
    from torch.export import Dim
    m = PositionTable().eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 6, 8),),
                           dynamic_dims={0: {1: Dim("seq", min=2, max=12)}})
    assert DIM_BOUNDS_KEY not in gm.meta  # the user's bound held
    x = torch.randn(3, 12, 8)
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(ValueError, match="two different bounds"):
        ptqpasses.capture(m, (torch.randn(2, 6, 8), torch.randn(2, 6, 8)),
                          dynamic_dims={0: {1: Dim("seq", max=12)}, 1: {1: Dim("seq", max=8)}})


class EmptyCache(nn.Module):
    """GPT-2's attention: ``cat`` of an empty key cache (a constant made in forward) and k."""

    def __init__(self):
        super().__init__()
        self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        past = torch.tensor([])  # torch.export lifts it: a get_attr with no elements
        return self.out(torch.cat([past, self.k(x)], dim=-2))


def test_empty_cat_inputs_are_dropped_and_never_calibrated():
    m = EmptyCache().eval()
    x = torch.randn(2, 5, 8)
    gm = ptqpasses.capture(m, (x,))
    assert not any(n.target is torch.ops.aten.cat.default for n in gm.graph.nodes)
    assert not any(n.op == "get_attr" and not n.users for n in gm.graph.nodes)
    q = ptqpasses.quantize(m, (x,), [(torch.randn(2, 5, 8),) for _ in range(2)], progress=False)
    cov = ptqpasses.coverage(q)
    assert [c.integer for c in cov if "linear" in c.op] == [True, True]
    assert all("float bias of per-token linear" in c.reason for c in cov if not c.integer)
    torch.testing.assert_close(q(x), m(x), atol=0.1, rtol=0.1)


class TransposeAndMask(nn.Module):
    """Falcon's ``x @ W.T`` (``aten.numpy_T``) and Bloom's ``where(mask, x, 0.0)``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        y = x @ self.w.T
        s = y[0] @ y[0].T  # x.T of an activation: stays a permute
        return torch.where(y > 0, y, 0.5), torch.where(y > 1, -1.0, y), s


def test_numpy_t_and_where_with_a_scalar_become_permute_and_where_self():
    m = TransposeAndMask().eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 3, 8),))
    targets = {n.target for n in gm.graph.nodes}
    aten = torch.ops.aten
    assert aten.numpy_T.default not in targets and aten.permute.default in targets
    assert aten.linear.default in targets  # x @ W.T on the constant W: a linear
    assert aten.where.ScalarOther not in targets and aten.where.ScalarSelf not in targets
    assert aten.where.self in targets
    x = torch.randn(3, 3, 8)
    for got, want in zip(gm(x), m(x)):
        torch.testing.assert_close(got, want)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return y.view(*x.shape[:-1], -1)


class ConstantProducts(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = Conv1D(8, 12)
        self.w_t = nn.Parameter(torch.randn(6, 12))   # used as x @ w_t.T (Falcon)
        self.w = nn.Parameter(torch.randn(6, 5))      # used as x @ w
        self.scale = nn.Parameter(torch.randn(8, 8))  # used as scale @ x: left, stays

    def forward(self, x):
        h = self.c(x).relu()
        return torch.mm(self.scale, x[0]), torch.matmul(h @ self.w_t.transpose(0, 1), self.w)


def test_products_with_a_constant_matrix_become_linears():
    m = ConstantProducts().eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 8, 8),))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert calls.count(aten.linear.default) == 3 and aten.addmm.default not in calls
    assert calls.count(aten.mm.default) == 1  # the constant on the left is not a weight
    # the transposed weights replace the originals (no tensor held twice); w_t is used as is
    names = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert "c.weight" not in names and "w" not in names and "w_t" in names
    x = torch.randn(3, 8, 8)
    for got, want in zip(gm(x), m(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    q = ptqpasses.quantize(m, (torch.randn(2, 8, 8),), [(torch.randn(2, 8, 8),)] * 4,
                           progress=False, guard=False)
    cov = [c for c in ptqpasses.coverage(q) if "linear" in c.op]
    assert len(cov) == 3 and all(c.integer for c in cov)



class Conv1dStack(nn.Module):
    """ConvBERT-like 1-D convs: depthwise (no bias), pointwise, "same" with dilation, strided."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv1d(8, 8, 9, padding=4, groups=8, bias=False)
        self.pw = nn.Conv1d(8, 16, 1)
        self.same = nn.Conv1d(16, 16, 4, padding="same", dilation=2)
        self.strided = nn.Conv1d(16, 8, 3, stride=2)

    def forward(self, x):
        return self.strided(self.same(torch.relu(self.pw(self.dw(x)))))


def test_conv1d_becomes_a_conv2d_of_height_one_or_a_linear():
    m = Conv1dStack().eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 8, 20),))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert calls.count(aten.conv2d.default) == 3  # the pointwise one is a linear
    assert calls.count(aten.linear.default) == 1
    assert not {aten.conv1d.default, aten.conv1d.padding} & set(calls)
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    assert "dw" in str(conv.meta.get("nn_module_stack"))  # the user's module, for reports
    x = torch.randn(3, 8, 20)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
    names = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert "dw.weight" not in names and names["dw_weight_2d"].shape == (8, 1, 1, 9)


def test_a_dense_conv1d_over_a_dynamic_length_gets_explicit_padding():
    """Over a dynamic length a kxk conv1d stays conv1d (float); "same" with an odd total
    pads the extra column last, as PyTorch."""
    m = nn.Sequential(nn.Conv1d(4, 6, 4, padding="same"), nn.Conv1d(6, 6, 5, padding="same",
                                                                      dilation=2)).eval()
    gm = ptqpasses.capture(m, (torch.randn(2, 4, 16),),
                           dynamic_dims={0: {2: torch.export.Dim("length", min=8, max=64)}})
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert calls.count(aten.conv1d.default) == 2 and aten.conv1d.padding not in calls
    assert calls.count(aten.constant_pad_nd.default) == 1  # total 3 (odd); 8 is even
    for length in (9, 23):
        x = torch.randn(3, 4, length)
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
