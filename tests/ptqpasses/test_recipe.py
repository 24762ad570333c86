"""Recipes: quantize -> save -> fresh process -> apply -> identical integer graph and outputs."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import ptqpasses
from ptqpasses import QuantConfig, RecipeError
from tools.digits import DigitsCNN


def _calibrated(model, config=QuantConfig()):
    data = [(torch.randn(4, 1, 8, 8),) for _ in range(3)]
    observed = ptqpasses.prepare(model, data[0], config)
    ptqpasses.calibrate(observed, data, progress=False)
    return observed


def test_recipe_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(3)
    model = DigitsCNN(width=8).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    observed = _calibrated(model)
    ptqpasses.save_recipe(observed, tmp_path / "r", pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
    q = ptqpasses.convert(observed)
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    torch.save(q(x), tmp_path / "expected.pt")
    (tmp_path / "code.txt").write_text(q.code)
    script = textwrap.dedent(f"""
        import torch, ptqpasses
        from tools.digits import DigitsCNN
        m = DigitsCNN(width=8).eval()
        m.load_state_dict(torch.load({str(tmp_path / 'w.pt')!r}))
        x = torch.load({str(tmp_path / 'x.pt')!r})
        q = ptqpasses.apply_recipe(m, (x,), {str(tmp_path / 'r')!r})
        assert q.code == open({str(tmp_path / 'code.txt')!r}).read(), "graph differs"
        assert torch.equal(q(x), torch.load({str(tmp_path / 'expected.pt')!r})), "outputs differ"
        print("same")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "same"
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["pipeline"].startswith("fold-batchnorm,annotate")
    assert body["qparams"]["x"]["dtype"] == "uint8" and body["nodes"]["relu"]["role"] == "fused"


def test_recipe_for_another_model_or_tampered_fails(tmp_path):
    model = DigitsCNN(width=8).eval()
    ptqpasses.save_recipe(_calibrated(model), tmp_path / "r",
                          pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
    with pytest.raises(RecipeError, match="different model"):
        ptqpasses.apply_recipe(DigitsCNN(width=16).eval(), (torch.randn(2, 1, 8, 8),), tmp_path / "r")
    body = json.loads((tmp_path / "r.json").read_text())
    body["qparams"]["x"]["scale"] *= 2
    (tmp_path / "r.json").write_text(json.dumps(body))
    with pytest.raises(RecipeError, match="modified"):
        ptqpasses.apply_recipe(model, (torch.randn(2, 1, 8, 8),), tmp_path / "r")
    (tmp_path / "r.json").unlink()
    with pytest.raises(RecipeError, match="missing"):
        ptqpasses.load_recipe(tmp_path / "r")


def test_recipe_needs_calibration(tmp_path):
    observed = ptqpasses.prepare(DigitsCNN(width=8).eval(), (torch.randn(2, 1, 8, 8),))
    with pytest.raises(RecipeError, match="calibrated"):
        ptqpasses.save_recipe(observed, tmp_path / "r", pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
