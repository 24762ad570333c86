"""ptqpasses_backends.tvm.dynamo_backend: torch.compile -> per-graph quantization -> TVM,
against the direct path (ptqpasses.quantize, whose torch reference the TVM module equals bit for bit: see
test_end_to_end), across graph breaks, and falling back with a logged reason."""

import logging

import pytest
import torch
from torch import nn

import ptqpasses
from ptqpasses_backends import tvm as tvm_backend
from ptqpasses.observers import CalibrationError
from ptqpasses_tools.models import bert_encoder, randomize_bn_stats, resnet18
from tests.backends.conftest import assert_island_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _calib(shape, n=2):
    return [(torch.randn(*shape),) for _ in range(n)]


def _compile(model, data, **kw):
    backend = tvm_backend.dynamo_backend(data, target="host", **kw)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        backend.calibrate(compiled, progress=False)
    return backend, compiled


def _integer_ops(gm):
    # compute ops only: a dynamic-shape capture also dequantizes an input to read its size
    return [c.op for c in ptqpasses.coverage(gm) if c.integer]


def _served(backend):
    return [s.served_by for s in backend.report()]


class _Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _Branchy(nn.Module):
    """Two conv blocks with data-dependent Python control flow between them (a graph break:
    neither dynamo nor torch.export can put both blocks in one graph)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Block(3, 8), _Block(8, 8)

    def forward(self, x):
        y = self.a(x)
        if y.mean() > 10:  # never true here, but only known at run time
            y = -y
        return self.b(y)


@pytest.mark.slow
def test_resnet18_matches_direct_path():
    model = randomize_bn_stats(resnet18(num_classes=10), seed=2).eval()
    data = _calib((2, 3, 32, 32))
    direct = ptqpasses.quantize(model, data[0], data, progress=False)
    backend, compiled = _compile(model, data)
    assert _served(backend) == ["tvm"]
    assert backend.report()[0].float_ops == 0
    assert _integer_ops(backend.report()[0].qgraph) == _integer_ops(direct)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(compiled(x), direct(x))


@pytest.mark.slow
def test_bert_encoder_matches_direct_path():
    model = bert_encoder(take_embeddings=True).eval()
    data = _calib((2, 16, 64))
    direct = ptqpasses.quantize(model, data[0], data, progress=False, dynamic_dims={0: {1: "seq"}})
    backend, compiled = _compile(model, data)
    assert _served(backend) == ["tvm"]
    assert _integer_ops(backend.report()[0].qgraph) == _integer_ops(direct)
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        # integer ops exact; softmax / layer norm run in float in both (as in test_end_to_end)
        assert_island_close(compiled(x), direct(x), "dynamo path")


def test_graph_break_gives_two_served_graphs_equal_to_quantizing_each_part():
    model = _Branchy().eval()
    data = _calib((2, 3, 8, 8), n=3)
    backend, compiled = _compile(model, data, fallback="eager")
    assert _served(backend) == ["tvm", "tvm"]
    assert [s.inputs for s in backend.report()] == [("L['x']",), ("L['y']",)]
    # the graph after the break is calibrated on what the float first block produced
    qa = ptqpasses.quantize(model.a, data[0], data, progress=False)
    with torch.no_grad():
        mid = [(model.a(*b),) for b in data]
    qb = ptqpasses.quantize(model.b, mid[0], mid, progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got = compiled(x)
        assert torch.equal(got, qb(qa(x)))
        torch.testing.assert_close(got, model(x), rtol=0, atol=0.1)


def test_unservable_graph_falls_back_with_logged_reason(caplog):
    class CumsumAfterBreak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _Block(3, 4)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return torch.cumsum(y, dim=1)  # no integer kernel: nothing to quantize

    model = CumsumAfterBreak().eval()
    data = _calib((2, 3, 8, 8))
    with caplog.at_level(logging.WARNING, logger="ptqpasses_backends.tvm.dynamo"):
        backend, compiled = _compile(model, data)
    fell = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(fell) == 1 and "graph_1" in fell[0] and "inductor" in fell[0]
    assert "nothing in it can be quantized" in fell[0] and "cumsum" in fell[0]
    status = backend.report()
    assert [s.served_by for s in status] == ["tvm", "inductor"]
    assert "cumsum" in status[1].reason
    qa = ptqpasses.quantize(model.a, data[0], data, progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.cumsum(qa(x), dim=1), rtol=1e-5, atol=1e-5)


def test_config_module_paths_apply_per_graph():
    model = _Branchy().eval()
    data = _calib((2, 3, 8, 8))
    config = ptqpasses.QuantConfig(keep_float=("b",))  # all of the graph after the break
    backend, compiled = _compile(model, data, config=config, fallback="eager")
    status = backend.report()
    assert [s.served_by for s in status] == ["tvm", "eager"]
    assert "nothing in it can be quantized" in status[1].reason
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        qa = ptqpasses.quantize(model.a, data[0], data, progress=False)
        assert torch.equal(compiled(x), model.b(qa(x)))

    torch._dynamo.reset()
    bad = ptqpasses.QuantConfig(keep_float=("a.conv", "b.cnov"))
    with pytest.raises(ptqpasses.ConfigError, match=r"keep_float 'b.cnov'") as e:
        _compile(model, data, config=bad, fallback="eager")
    assert "a.conv" not in str(e.value)


def test_calibrating_on_the_first_calls_needs_no_extra_step():
    model = _Block(3, 4).eval()
    backend = tvm_backend.dynamo_backend(None, target="host", calibration_calls=2)
    compiled = torch.compile(model, backend=backend)
    data = _calib((2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(compiled(*batch), model(*batch))  # recorded, in float
        assert _served(backend) == ["tvm"]
        direct = ptqpasses.quantize(model, data[0], data, progress=False)
        assert torch.equal(compiled(x), direct(x))
        # a new batch size makes dynamo recompile with a dynamic batch; the new graph is
        # quantized on the inputs recorded by the graph at the same place: same qparams
        x5 = torch.randn(5, 3, 8, 8)
        assert torch.equal(compiled(x5), direct(x5))
    assert _served(backend) == ["tvm", "tvm"]
    assert backend.report()[1].calibration_batches == 2


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="calibration_data is empty"):
        tvm_backend.dynamo_backend([], target="host")
    with pytest.raises(ValueError, match="unknown TVM target 'no-such-cpu'"):
        tvm_backend.dynamo_backend(_calib((1, 3, 8, 8)), target="no-such-cpu")
    with pytest.raises(TypeError, match="iterable of batches"):
        tvm_backend.dynamo_backend(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="fallback"):
        tvm_backend.dynamo_backend(_calib((1, 3, 8, 8)), fallback="onnx")

    model = _Block(3, 4).eval()
    backend = tvm_backend.dynamo_backend(_calib((2, 3, 8, 8)), target="host")
    compiled = torch.compile(model, backend=backend)
    with pytest.raises(RuntimeError, match=r"call backend.calibrate\(compiled_model\)"):
        compiled(torch.randn(2, 3, 8, 8))
    with pytest.raises(CalibrationError, match="no graph reached this backend"):
        backend.calibrate(model, progress=False)  # the plain model never reaches the backend
    empty = tvm_backend.dynamo_backend(iter(()), target="host")
    with pytest.raises(CalibrationError, match="zero batches"):
        empty.calibrate(torch.compile(model, backend=empty), progress=False)
