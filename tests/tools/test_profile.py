"""``ptq profile`` (tools.profile): every kernel call of a compiled model, timed alone."""

import json

from ptqpasses_tools.cli import main
from ptqpasses_tools.profile import kind_of, macs


def test_profile_digits_lists_every_kernel_call(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--model", "digits", "--runs", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    kinds = [r["kind"] for r in rows]
    # DigitsCNN: three convs and a linear, plus the glue between them
    assert kinds.count("conv2d") == 3 and kinds.count("dense") == 1, kinds
    assert all(r["us"] > 0 for r in rows)
    assert abs(result["kernel_ms"] - sum(r["us"] for r in rows) / 1e3) < 1e-9
    convs = [r for r in rows if r["kind"] == "conv2d"]
    assert all(r["macs"] > 0 for r in convs)
    text = capsys.readouterr().out
    assert "DigitsCNN 8x8 b1, defaults, 1 thread(s)" in text
    assert "conv2d" in text and "GMAC/s" in text


def test_profile_bad_model_or_configuration_exits_2(capsys):
    assert main(["profile", "--model", "resnet99"]) == 2
    assert "unknown model 'resnet99'" in capsys.readouterr().err
    assert main(["profile", "--model", "digits", "--config", "recipe"]) == 2
    assert "no recipe for this model" in capsys.readouterr().err


def test_kinds_and_macs_from_names_and_shapes():
    assert kind_of("ptq_conv2d13", ["uint8", "int8", "int32", "float32", "uint8"]) == "conv2d"
    assert kind_of("ptq_conv2d_depthwise2", []) == "conv2d_depthwise"
    assert kind_of("fused_softmax_divide_round", ["float32", "uint8"]) == "softmax"
    assert kind_of("fused_lut_requantize", ["uint8", "uint8", "uint8"]) == "table lookup"
    assert kind_of("fused_divide_tir_round_add_clip_cast", ["float32", "uint8"]) == "quantize"
    assert kind_of("fused_cast_subtract_add", ["uint8", "int8", "uint8"]) == "integer glue"
    # packed conv [O/l, R, S, C/d, l, d]: 64 outputs of 56x56, 64 channels x 3 x 3
    assert macs("conv2d", [(1, 64, 56, 56), (4, 3, 3, 16, 16, 4), (1, 64, 56, 56)]) == \
        64 * 56 * 56 * 64 * 9
    assert macs("dense", [(1, 128, 384), (24, 96, 16, 4), (1, 128, 384)]) == 128 * 384 * 384
    # depthwise 3x3: OIHW [O, 1, R, S] and the NHWC kernel's [R, S, O] alike
    assert macs("conv2d_depthwise", [(1, 32, 28, 28), (32, 1, 3, 3), (1, 32, 28, 28)]) == \
        32 * 28 * 28 * 9
    assert macs("conv2d_depthwise", [(1, 28, 28, 32), (3, 3, 32), (1, 28, 28, 32)]) == \
        32 * 28 * 28 * 9
