"""tools/fuzz.py: a short fuzz run is clean and checks real graphs on several targets, and the
fuzzer reports (and shrinks) a mismatch, an unclear exception and a refusal as it should."""

from __future__ import annotations

import pytest
import torch

import ptqpasses
from ptqpasses_backends.tvm.runtime import CompiledModule
from ptqpasses_tools import fuzz
from ptqpasses_tools.fuzz import Fuzzer, ModelSpec, layer


def test_short_fuzz_run_is_clean():
    """~60 s of graphs, cycling over every target that runs here; a new seed each run (it is
    in the failure message), so CI explores new graphs every time."""
    import random

    seed = random.randrange(1 << 30)
    f = Fuzzer(graphs=200, budget=60, seed=seed, progress=False, shrink_budget=60)
    stats = f.run()
    assert not stats.failures, f"seed {seed}: {stats.summary()}"
    checked = {t: n for t, n in stats.checked.items() if n}
    # On one Emerald Rapids core: ~25 graphs a minute; the floor is far below that but
    # cannot be met by a run that checks nothing.
    assert sum(checked.values()) >= 8 and len(checked) >= min(2, len(f.targets)), stats.summary()


def test_dead_channel_with_tiny_weights():
    """Shrunk by the fuzzer: lowering saturated the int32 bias of a dead channel (weights
    ~1e-9), compile then overflowed; the weight scale is now raised until the bias fits."""
    spec = ModelSpec(shape=(1, 1, 1), layers=(layer(
        "conv", act=None, bias=True, bn=False, cout=1, dead=(0,), dead_mode="tiny", groups=1,
        k=1, pad=0, stride=1, wexp=0),), example_batch=1, test_batch=2)
    q, x = fuzz.quantize_spec(spec)
    fuzz.check_on_target(q, x, fuzz.reference(q, x), fuzz.runnable_targets()[0])


def test_tiny_scales_saturate_the_bias():
    """Shrunk by the long fuzz run (seed 0): tiny input and weight scales saturated the int32
    bias, every target gave 0.0 where the reference gave -0.0683 (TVM's int32 sum wrapped)."""
    spec = ModelSpec(shape=(1, 3), layers=(layer("linear", act=None, bias=True, dout=1,
                                                 wexp=-2),),
                     example_batch=1, test_batch=2, input_scale=1e-4)
    q, x = fuzz.quantize_spec(spec)
    fuzz.check_on_target(q, x, fuzz.reference(q, x), fuzz.runnable_targets()[0])


def test_tanh_of_a_tiny_linear_output():
    """Shrunk by CI's fuzz run (seed 544511068): a float-output linear on inputs ~1e-4, then
    tanh; TVM's own tanh gave -2^-21 for -4.66e-7 (2% off, beyond the island tolerance)."""
    spec = ModelSpec(shape=(1,), layers=(layer("linear", act="tanh", bias=False, dout=1,
                                                 wexp=0),),
                     example_batch=1, test_batch=2, input_scale=1e-4)
    q, x = fuzz.quantize_spec(spec)
    want = fuzz.reference(q, x)
    for t in fuzz.runnable_targets():
        fuzz.check_on_target(q, x, want, t)


def test_float_output_that_cancels_is_judged_by_its_inputs():
    """Shrunk by a fuzz run (seed 33): the mean of a layer_norm's 5 outputs is ~1e-8 (it
    cancels), TVM gave -2.4e-8 where torch gave -1.2e-8: a float32 rounding of values ~1,
    an island mismatch, not a failure. A float output off by more than ``ISLAND_FLOAT_RTOL``
    of the float values it was computed from still fails."""
    spec = ModelSpec(shape=(1, 1), layers=(
        layer("linear", act=None, bias=False, dout=5, wexp=0), layer("layernorm", affine=False),
        layer("transpose"), layer("mean")), example_batch=1, test_batch=2, seed=2)
    q, x = fuzz.quantize_spec(spec)
    want = fuzz.reference(q, x)
    mag = fuzz.float_magnitude(q, x)
    assert 0.1 < mag < 10 and want.abs().max().item() < 1e-6
    noise = want + 2.0**-24 * torch.sign(want)
    assert fuzz.compare(noise, want, [None], True, mag).startswith("island: ")
    assert not fuzz.compare(want + 1e-3 * mag, want, [None], True, mag).startswith("island: ")
    for t in fuzz.runnable_targets():
        fuzz.check_on_target(q, x, want, t)


def test_fuzzer_reports_and_shrinks_a_mismatch(monkeypatch):
    """A compiled module whose outputs are off by one output step must be a failure, shrunk
    to a one-layer model."""
    call = CompiledModule.__call__

    def off_by_one(self, *args):
        y = call(self, *args)
        return y + 1.0 if isinstance(y, torch.Tensor) else tuple(t + 1.0 for t in y)

    monkeypatch.setattr(CompiledModule, "__call__", off_by_one)
    logged = []
    f = Fuzzer(graphs=5, budget=60, seed=1, targets=[fuzz.runnable_targets()[0]],
               progress=False, shrink_budget=40, log=logged.append, exclude=["dead-tiny"])
    stats = f.run()
    mismatches = [e for e in stats.failures if e["stage"] == "mismatch"]
    assert mismatches and mismatches[0]["shrunk"], stats.summary()
    assert "minimal model" in "".join(logged)
    assert mismatches[0]["spec_json"]["layers"] and len(mismatches[0]["spec_json"]["layers"]) <= 2


def test_refusals_and_unclear_errors(monkeypatch):
    """A documented error from quantize is a refusal counted by its first line; an
    AttributeError is a failure."""
    spec = ModelSpec(shape=(3,), layers=(layer("linear", act=None, bias=True, dout=2, wexp=0),))

    def refuse(*a, **k):
        raise ptqpasses.CaptureError("could not capture FuzzModel\nmore")

    monkeypatch.setattr(ptqpasses, "quantize", refuse)
    f = Fuzzer(graphs=1, budget=10, targets=["x86-avx2"], progress=False)
    f._check(spec, ["x86-avx2"], count=True)
    assert f.stats.refused == {"CaptureError: could not capture FuzzModel": 1}

    def crash(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'meta'")

    monkeypatch.setattr(ptqpasses, "quantize", crash)
    with pytest.raises(fuzz.FuzzFailure, match="quantize.*AttributeError"):
        f._check(spec, ["x86-avx2"], count=True)


def test_spec_rebuilds_and_describes():
    spec = ModelSpec(shape=(2, 5, 5), layers=(
        layer("conv", act="relu", bias=True, bn=True, cout=4, groups=2, k=3, pad=1, stride=2,
              wexp=0), layer("to_seq"), layer("attention", dk=3, dv=2, scale=0.5,
                                                   softmax=True)))
    y = spec.build()(torch.randn(3, 2, 5, 5))
    assert y.shape == (3, 9, 2)
    text = spec.describe()
    assert "attention(dk=3" in text and "-> (9, 2)" in text
    assert torch.equal(spec.build()(torch.ones(1, 2, 5, 5)), spec.build()(torch.ones(1, 2, 5, 5)))
