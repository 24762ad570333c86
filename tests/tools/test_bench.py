"""``ptq bench`` (tools.bench): the MAC counter, a tiny end-to-end run, bad input."""

import json

import torch

import ptqpasses
from ptqpasses_tools.bench import count_macs
from ptqpasses_tools.cli import main


class _Macs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)        # 8x6x6 out, 3*3*3 per output
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)  # 9 per output
        self.fc = torch.nn.Linear(8 * 36, 10)

    def forward(self, x):
        y = self.dw(self.conv(x))
        z = y.flatten(2)                                      # [2, 8, 36]
        a = torch.matmul(z, z.transpose(1, 2))                # [2, 8, 8], K = 36
        return self.fc(y.flatten(1)) + a.sum()


def test_count_macs_conv_depthwise_linear_matmul():
    x = torch.randn(2, 3, 6, 6)
    gm = ptqpasses.capture(_Macs().eval(), (x,), dynamic_batch=False)
    expected = (2 * 8 * 36 * 27) + (2 * 8 * 36 * 9) + (2 * 10 * 288) + (2 * 8 * 8 * 36)
    assert count_macs(gm) == expected


def test_bench_tiny_run_writes_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--models", "digits", "--peers", "eager", "tvm-int8", "--runs", "3",
               "--warmup", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    rows = {r["peer"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "tvm-int8"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["runs"] == 3 and r["threads"] == 1
        assert r["macs"] > 0 and r["gmacs"] > 0
    assert rows["eager"]["exact"] and rows["eager"]["vs_eager"] == 1.0
    # int8 against fp32 on held-out digits: a finite, sensible SQNR
    assert not rows["tvm-int8"]["exact"] and 10 < rows["tvm-int8"]["accuracy"] < 80
    assert rows["tvm-int8"]["pct_peak"] is None or rows["tvm-int8"]["pct_peak"] > 0
    assert result["machine"]["versions"]["tvm"]
    md = (out / "bench.md").read_text()
    assert "ptqpasses TVM int8 (host strategy)" in md and "| model | thr | peer |" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| DigitsCNN 8x8 b1 | 1 | torch eager |" in capsys.readouterr().out


def test_bench_unknown_model_or_peer_exits_2_naming_it(tmp_path, capsys):
    for flag, bad in (("--models", "resnet99"), ("--peers", "tensorrt")):
        assert main(["bench", flag, bad, "--out", str(tmp_path)]) == 2  # sys.exit's code
        err = capsys.readouterr().err
        assert f"ptq bench: error: unknown {flag[2:-1]} {bad!r}; choose from" in err
    assert not any(tmp_path.iterdir())  # refused before measuring anything


def test_int8_graph_configurations_differ_in_the_linears():
    """``defaults``: linears over tokens per token; ``static_linears`` (the ``tvm-int8-static``
    peer): the same with one static scale each."""
    from ptqpasses_tools.bench_models import Case
    from ptqpasses_tools.bench_peers import int8_graph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()
    data = [(torch.randn(1, 12, 16),) for _ in range(4)]
    case = Case("tiny", 1, model, data[0], data, data, "sqnr_db")
    ops = {cfg: {str(n.target) for n in int8_graph(case, cfg)[0].graph.nodes}
           for cfg in ("defaults", "static_linears")}
    assert "ptq.linear_dynamic.default" in ops["defaults"]
    assert "ptq.linear.default" in ops["static_linears"]
    assert "ptq.linear_dynamic.default" not in ops["static_linears"]
