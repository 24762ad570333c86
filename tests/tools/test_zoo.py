"""``ptq zoo`` (tools.zoo): a fast subset passes every stage; a failing stage is named."""

import json

import pytest
import torch
from torch import nn

from ptqpasses_tools import zoo
from ptqpasses_tools.cli import main

#: Architectures that pass every stage today and take a few seconds each (issue 14); bert:
#: a dynamic sequence its position table bounds (capture applies the bound).
FAST = ("resnet", "vit", "own-bert_encoder", "bert")


def test_fast_subset_passes_every_stage(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "zoo"
    assert main(["zoo", "--models", ",".join(FAST), "--out", str(out)]) == 0
    result = json.loads((out / "zoo.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == set(FAST)
    for r in rows.values():
        assert r["failure"] is None and r["passed"], r
        assert set(r["stages"].values()) == {"ok"}
        integer, total = r["conv_linear"]
        assert 0 < integer <= total
        assert r["match"]["ok"] and r["sqnr_db"] > 5
    assert result["summary"]["all"] == len(FAST)
    md = (out / "zoo.md").read_text()
    assert f"{len(FAST)} of {len(FAST)} pass every stage" in md
    assert md in capsys.readouterr().out


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def _images(batch, seq, seed):
    return (torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed)),)


def test_failing_stage_is_recorded_with_its_name():
    arch = zoo.Arch("data-dependent", "own", _DataDependent, _images)
    row = zoo.run_arch(arch)
    assert not row["passed"]
    assert row["failure"]["stage"] == "quantize"
    assert row["failure"]["type"] == "CaptureError"
    assert row["failure"]["message"] and "\n" not in row["failure"]["message"]
    assert row["stages"]["build"] == "ok" and row["stages"]["quantize"] == "fail"
    assert all(row["stages"][s] == "skip" for s in zoo.STAGES[2:])
    table = zoo.to_markdown([row], ())
    assert "quantize: CaptureError: " in table
    assert zoo.failure_classes([row]) == {
        f"quantize: CaptureError: {row['failure']['message']}": ["data-dependent"]}


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def _hang(batch, seq, seed):
    import time
    time.sleep(60)


def test_crash_and_budget_are_failures_of_the_stage_they_hit():
    import os
    slow = zoo.Arch("slow", "own", _Tiny, _hang)
    row = zoo.run_isolated(slow, budget=3)
    assert row["failure"]["stage"] == "build" and row["failure"]["type"] == "Timeout"
    crash = zoo.Arch("crash", "own", lambda: os._exit(3), _images)
    row = zoo.run_isolated(crash)
    assert row["failure"] == {"stage": "build", "type": "Crash",
                              "message": "the process died (exit code 3)"}


def test_match_tolerance_in_output_steps():
    from ptqpasses_tools.islands import ISLAND_FLOAT_RTOL, ISLAND_TOKEN_RTOL

    want = torch.tensor([0.0, 0.5, 1.0])
    rtol = ISLAND_FLOAT_RTOL
    assert zoo.compare(want.clone(), want, 0.5, rtol)["exact"]
    m = zoo.compare(want + torch.tensor([0.0, 0.0, 1.0]), want, 0.5, rtol)
    assert not m["exact"] and m["ok"] and m["rel"] == 2.0 and m["differ"] == 1
    assert not zoo.compare(want + 1.5, want, 0.5, rtol)["ok"]
    assert not zoo.compare(want + 1e-3, want, None, rtol)["ok"]  # float: 1e-5 of max |ref|
    # a graph with per-token linears: two 8-bit steps of the largest value
    assert zoo.compare(want + 1e-3, want, None, ISLAND_TOKEN_RTOL)["ok"]
    assert not zoo.compare(want + 1e-2, want, None, ISLAND_TOKEN_RTOL)["ok"]


def test_list_and_unknown_names(capsys):
    assert main(["zoo", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert len(zoo.architectures()) >= 30 and "bert" in names and "own-resnet18" in names
    assert main(["zoo", "--models", "bert,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_library_never_imports_transformers():
    import subprocess
    import sys
    code = ("import sys, ptqpasses, ptqpasses_backends.tvm; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
