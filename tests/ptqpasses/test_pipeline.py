"""Pass contract, pipeline text round-trip, instruments, PassManager interop."""

import io

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

import ptqpasses
from ptqpasses import (Annotate, ConvertToQDQ, DumpToFolder, FoldBatchNorm, InsertObservers,
                       LowerToIntegerOps, Pipeline, PrintAfter, QSpec, QuantConfig, Timing)
from ptqpasses.pipeline import PassError, PipelineParseError, graph_pass


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean([2, 3]))


def _captured():
    return ptqpasses.capture(Small().eval(), (torch.randn(2, 3, 8, 8),))


def test_pipeline_text_round_trips():
    cfg = QuantConfig(activation=QSpec(dtype="int8", symmetric=True, observer="minmax"),
                      by_module_name={"fc": None}, keep_float=("conv",))
    p = Pipeline([FoldBatchNorm(), Annotate(cfg), InsertObservers()])
    text = str(p)
    assert text.startswith("fold-batchnorm,annotate{config=")
    again = Pipeline.parse(text)
    assert str(again) == text
    assert again.passes[1].config.config == cfg
    assert str(Pipeline.parse("fold-batchnorm,annotate")) == "fold-batchnorm,annotate"


@pytest.mark.parametrize("text, message", [
    ("fold-batchnorm,no-such-pass", "unknown pass 'no-such-pass'"),
    ("annotate{bogus=1}", "has no option 'bogus'"),
    ("annotate{config=notjson}", "bad value for annotate.config"),
    ("annotate{config={}", "unbalanced"),
])
def test_pipeline_parse_errors_are_precise(text, message):
    with pytest.raises(PipelineParseError, match=message):
        Pipeline.parse(text)


def test_failing_pass_is_named_with_the_passes_before_it():
    @graph_pass("explode")
    def explode(gm):
        raise ValueError("boom")

    p = Pipeline([FoldBatchNorm(), Pipeline([Annotate(), explode()])])
    with pytest.raises(PassError) as info:
        p(_captured())
    assert info.value.pass_name == "explode"
    assert "after: fold-batchnorm, annotate" in str(info.value) and "boom" in str(info.value)


def test_instruments_print_dump_and_time(tmp_path):
    out, timing = io.StringIO(), Timing()
    p = Pipeline([FoldBatchNorm(), Annotate(), InsertObservers()],
                 instruments=[PrintAfter(["insert-observers"], stream=out), DumpToFolder(tmp_path),
                              timing])
    p(_captured())
    assert "after insert-observers" in out.getvalue() and "ptq_observer_0" in out.getvalue()
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "000_fold-batchnorm.txt", "001_annotate.txt", "002_insert-observers.txt"]
    assert [name for name, _ in timing.seconds] == ["fold-batchnorm", "annotate", "insert-observers"]
    assert all(s >= 0 for _, s in timing.seconds)


def test_passes_run_inside_torch_pass_manager_with_a_user_pass():
    seen = []

    def user_pass(gm: fx.GraphModule):
        from torch.fx.passes.infra.pass_base import PassResult
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_module"))
        return PassResult(gm, False)

    gm = _captured()
    model_in = torch.randn(2, 3, 8, 8)
    pm = PassManager([FoldBatchNorm(), Annotate(), InsertObservers(), user_pass])
    res = pm(gm)
    assert seen == [3]  # the user pass saw our observers: x, relu, mean (fc: float output)
    ptqpasses.calibrate(res.graph_module, [(model_in,)], progress=False)
    q = PassManager([ConvertToQDQ(), LowerToIntegerOps()])(res.graph_module).graph_module
    q.graph.lint()
    assert any(n.target is torch.ops.ptq.conv2d.default for n in q.graph.nodes)


def test_pass_result_modified_flag():
    gm = _captured()
    assert FoldBatchNorm()(gm).modified is True
    assert FoldBatchNorm()(gm).modified is False
