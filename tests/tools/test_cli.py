"""The ``ptq`` command end to end, in a temporary folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.backends.conftest import host_has
from ptqpasses_tools.cli import main
from ptqpasses_tools.inputs import UsageError, calibration_batches, load_model, parse_input_spec


def test_input_spec_parsing():
    assert parse_input_spec("1x3x224x224:float32") == ((1, 3, 224, 224), torch.float32)
    assert parse_input_spec("2x16:int64") == ((2, 16), torch.int64)
    with pytest.raises(UsageError, match="not like"):
        parse_input_spec("1,3,224")
    with pytest.raises(UsageError, match="unknown dtype"):
        parse_input_spec("1x3:float7")


def test_model_spec_errors():
    with pytest.raises(UsageError, match="package.module:attr"):
        load_model("tools.digits.DigitsCNN")
    with pytest.raises(UsageError, match="no attribute"):
        load_model("tools.digits:Nope")
    with pytest.raises(UsageError, match="cannot import"):
        load_model("no_such_pkg.mod:X")
    assert isinstance(load_model("tools.digits:DigitsCNN"), torch.nn.Module)


def test_calibration_sources(tmp_path):
    np.save(tmp_path / "x.npy", np.random.randn(10, 1, 8, 8).astype("float32"))
    batches = calibration_batches(str(tmp_path / "x.npy"), (1, 1, 8, 8), batch=4)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    from PIL import Image
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(3):
        Image.fromarray((np.random.rand(20, 30, 3) * 255).astype("uint8")).save(img_dir / f"{i}.png")
    batches = calibration_batches(str(img_dir), (1, 3, 16, 16), batch=2)
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    with pytest.raises(UsageError, match=r"does not exist: give a .npy / .pt file of samples "
                                         r"shaped like the model input, \[N, 1, 8, 8\]"):
        calibration_batches(str(tmp_path / "missing.npy"), (1, 1, 8, 8))
    with pytest.raises(UsageError, match=r"holds samples of shape \[10, 1, 8, 8\]; the model "
                                         r"input is \[1, 3, 8, 8\]"):
        calibration_batches(str(tmp_path / "x.npy"), (1, 3, 8, 8))


def test_quantize_and_report_commands(tmp_path, capsys):
    np.save(tmp_path / "calib.npy", np.random.randn(16, 1, 8, 8).astype("float32"))
    args = ["tools.digits:DigitsCNN", "--input", "1x1x8x8:float32", "--calib", str(tmp_path / "calib.npy")]
    assert main(["quantize", *args, "--out", str(tmp_path / "recipe")]) == 0
    out = capsys.readouterr().out
    assert "wrote recipe" in out and "5/5 compute nodes are integer ops" in out
    body = json.loads((tmp_path / "recipe.json").read_text())
    assert body["format"] == "ptqpasses-recipe/2"
    assert main(["report", *args, "--batches", "1"]) == 0
    assert "| node | op | float source | SQNR (dB) |" in capsys.readouterr().out


def test_bad_input_exits_nonzero_with_a_message(tmp_path):
    cmd = [sys.executable, "-m", "tools.cli", "quantize", "tools.digits:DigitsCNN", "--input",
           "1x1x8x8:float32", "--calib", str(tmp_path / "nothing.npy"), "--out", str(tmp_path / "r")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert "ptq quantize: error: calibration source" in out.stderr
    assert "Traceback" not in out.stderr
    cmd = [sys.executable, "-m", "tools.cli", "report", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "example:" in out.stdout


def test_compile_command_writes_a_loadable_module(tmp_path, capsys):
    np.save(tmp_path / "calib.npy", np.random.randn(16, 1, 8, 8).astype("float32"))
    model = ["tools.digits:DigitsCNN", "--input", "1x1x8x8:float32"]
    assert main(["quantize", *model, "--calib", str(tmp_path / "calib.npy"),
                 "--out", str(tmp_path / "recipe")]) == 0
    assert main(["compile", *model, "--recipe", str(tmp_path / "recipe"), "--target", "host",
                 "--out", str(tmp_path / "m.so")]) == 0
    printed = capsys.readouterr().out
    assert "compiled for host" in printed
    if host_has("avx2") and not host_has("avx512vnni"):  # full-range u8 activations
        assert "packed kernels:" in printed and "overflow int16" in printed
    from ptqpasses_backends import tvm as ptq_tvm
    compiled = ptq_tvm.load(tmp_path / "m.so")
    assert compiled(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert main(["compile", *model, "--recipe", str(tmp_path / "recipe"), "--target", "sparc",
                 "--out", str(tmp_path / "m2.so")]) == 2
    assert "unknown TVM target 'sparc'" in capsys.readouterr().err


def test_demo_runs_and_is_bit_exact():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "demo", "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TVM int8 output equals the torch reference bit for bit: True" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ptqpasses int8, TVM")]
    accuracy = float(rows[0].split("|")[2].strip().rstrip("%"))
    assert accuracy > 90.0


def test_readme_tables_are_generated_from_the_registries():
    from ptqpasses_tools.gen_readme import main as gen_main
    assert gen_main(["--check"]) == 0


def test_peak_microbenchmark_reports_fma_and_int8_rates():
    from ptqpasses_tools.peak import measure
    peaks = measure(iterations=2_000_000)
    assert {"fp32_fma_avx2", "int8_vpmaddwd_avx2", "int8_vpmaddubsw_avx2"} <= set(peaks)
    assert all(0.5 < v < 10_000 for v in peaks.values())  # GMAC/s on any real CPU


def test_tune_then_compile_with_the_database(tmp_path, capsys):
    np.save(tmp_path / "calib.npy", np.random.randn(16, 1, 8, 8).astype("float32"))
    model = ["tools.digits:DigitsCNN", "--input", "2x1x8x8:float32"]
    assert main(["quantize", *model, "--calib", str(tmp_path / "calib.npy"),
                 "--out", str(tmp_path / "recipe")]) == 0
    tune = ["tune", *model, "--recipe", str(tmp_path / "recipe"), "--trials", "2",
            "--kinds", "dense", "--database", str(tmp_path / "db")]
    assert main(tune) == 0
    first = capsys.readouterr().out
    assert "| dense |" in first
    assert main(tune) == 0
    assert "0 new trials" in capsys.readouterr().out  # the database is reused
    assert main(["compile", *model, "--recipe", str(tmp_path / "recipe"), "--database",
                 str(tmp_path / "db"), "--out", str(tmp_path / "m.so")]) == 0
    from ptqpasses_backends import tvm as ptq_tvm
    assert ptq_tvm.load(tmp_path / "m.so")(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_readme_command_lines_run_as_written(tmp_path):
    """The README's ``ptq quantize`` / ``report`` / ``compile`` lines, run as written (``ptq`` is
    ``python -m tools.cli``) in a folder holding the ``x.npy`` they name, made as the
    ``--calib`` help says: samples shaped like the model input."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    # (optional arguments in [brackets] left out)
    lines = [re.sub(r"\[.*?\]", "", ln.split("#")[0]).strip() for ln in block.splitlines()]
    run = [ln for ln in lines if re.match(r"ptq (quantize|report|compile) ", ln)]
    assert [ln.split()[1] for ln in run] == ["quantize", "report", "compile"], run
    np.save(tmp_path / "x.npy", np.random.randn(16, 1, 8, 8).astype("float32"))
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    for line in run:
        args = line.split()[1:]
        out = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (line, out.stderr[-2000:])
    assert (tmp_path / "recipe.json").exists() and (tmp_path / "m.so").exists()
