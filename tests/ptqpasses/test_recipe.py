"""Recipes: quantize -> save -> fresh process -> apply -> identical integer graph and outputs."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import ptqpasses
from ptqpasses import QuantConfig, RecipeError
from ptqpasses_tools.digits import DigitsCNN


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
        from ptqpasses_tools.digits import DigitsCNN
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


def test_recipe_for_other_weights_of_the_same_architecture_fails(tmp_path):
    torch.manual_seed(0)
    model_a, model_b = DigitsCNN(width=8).eval(), DigitsCNN(width=8).eval()
    assert any(not torch.equal(a, b) for a, b in zip(model_a.state_dict().values(),
                                                     model_b.state_dict().values()))
    ptqpasses.save_recipe(_calibrated(model_a), tmp_path / "r",
                          pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
    with pytest.raises(RecipeError, match="other weights than this DigitsCNN's"):
        ptqpasses.apply_recipe(model_b, (torch.randn(2, 1, 8, 8),), tmp_path / "r")
    model_b.load_state_dict(model_a.state_dict())  # the same weights again: accepted
    ptqpasses.apply_recipe(model_b, (torch.randn(2, 1, 8, 8),), tmp_path / "r")


def _saved(tmp_path):
    model = DigitsCNN(width=8).eval()
    ptqpasses.save_recipe(_calibrated(model), tmp_path / "r",
                          pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
    return model


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_damaged_tensor_file_fails_before_anything_is_applied(tmp_path, damage):
    _saved(tmp_path)
    st = tmp_path / "r.safetensors"
    data = st.read_bytes()
    if damage == "truncate":
        st.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        st.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:  # a well-formed tensor file of another recipe
        other = tmp_path / "other"
        other.mkdir()
        ptqpasses.save_recipe(_calibrated(DigitsCNN(width=16).eval()), other / "r",
                              pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
        shutil.copy(other / "r.safetensors", st)
    with pytest.raises(RecipeError, match="does not belong to r.json or was modified"):
        ptqpasses.load_recipe(tmp_path / "r")


def test_damaged_or_old_json_fails(tmp_path):
    _saved(tmp_path)
    js = tmp_path / "r.json"
    text = js.read_text()
    js.write_text(text[: len(text) // 2])
    with pytest.raises(RecipeError, match="not valid JSON"):
        ptqpasses.load_recipe(tmp_path / "r")
    body = json.loads(text)
    body["format"] = "ptqpasses-recipe/1"
    js.write_text(json.dumps(body))
    with pytest.raises(RecipeError, match="ptqpasses-recipe/1 file; .* save the recipe again"):
        ptqpasses.load_recipe(tmp_path / "r")


def test_killed_save_leaves_the_old_recipe(tmp_path):
    """A save killed between writing its new files and renaming them over the old ones (the
    process SIGKILLs itself at the first rename) leaves the old recipe loadable as it was."""
    _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("r.*")}
    script = textwrap.dedent(f"""
        import os, signal, torch, ptqpasses
        from ptqpasses import QuantConfig
        from ptqpasses_tools.digits import DigitsCNN
        torch.manual_seed(7)
        m = DigitsCNN(width=8).eval()
        data = [(torch.randn(4, 1, 8, 8),)]
        obs = ptqpasses.prepare(m, data[0])
        ptqpasses.calibrate(obs, data, progress=False)
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        ptqpasses.save_recipe(obs, {str(tmp_path / 'r')!r},
                              pipeline=ptqpasses.prepare_pipeline(QuantConfig()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == -9, out.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.glob("r.*")} == before
    ptqpasses.load_recipe(tmp_path / "r")
