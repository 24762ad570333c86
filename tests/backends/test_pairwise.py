"""The AVX2 pairwise (``vpmaddubsw``) variant: taken only where the activation range and the
weights prove that every pair of u8 x s8 products fits int16, and then bit-exact.

Inputs here are chosen to hit the worst case the proof allows (activations at the top of
their range on every weight of one sign), so a variant that saturated would show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqpasses_backends.tvm.fxgraph import value_range
from ptqpasses_backends.tvm.x86 import avx2
from tests.backends.conftest import P, GraphBuilder, assert_exact
from tests.backends.test_codegen import _kernel_asm
from tests.backends.strategies import multipliers

PACKED = ("ptq_conv2d", "ptq_dense")


def _extreme_weight(seed: int, shape, lo: int, hi: int) -> torch.Tensor:
    """Weights at the two ends of ``[lo, hi]``, mostly in runs of one sign (the pairs the
    ``vpmaddubsw`` proof is about), a few in between."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.rand(shape[0], 1, generator=g) < 0.5  # one sign per output channel ...
    w = torch.where(sign, hi, lo).expand(shape[0], int(np.prod(shape[1:]))).clone()
    mixed = torch.rand(w.shape, generator=g) < 0.2  # ... with some values anywhere
    w[mixed] = torch.randint(lo, hi + 1, (int(mixed.sum()),), generator=g)
    return w.reshape(shape).to(torch.int8)


def _graph(in_dtype, x_range, w_range, zp):
    """range clamp -> conv 3x3 (16 -> 32, output in [0, 127]) -> flatten -> linear."""
    b = GraphBuilder()
    x = b.input("x")
    if x_range is not None:
        x = b.call(P.clamp.default, x, *x_range)
    w = b.const(_extreme_weight(0, (32, 16, 3, 3), *w_range))
    c = b.call(P.conv2d.default, x, zp, w, None, [1, 1], [1, 1], [1, 1], 1,
               b.const(multipliers(1, 32, 0.0005)), 0, 0, 127, torch.uint8)
    f = b.call(torch.ops.aten.flatten.using_ints, c, 1)
    w2 = b.const(_extreme_weight(2, (24, 32 * 5 * 5), *w_range))
    y = b.call(P.linear.default, f, 3, w2, None, b.const(multipliers(3, 24, 0.0002)), 0,
               -128, 127, torch.int8)
    return b.build((c, y))


def _inputs(in_dtype, x_range):
    """Mostly the top of the range (largest products), some bottom and random values."""
    lo, hi = x_range if x_range is not None else (torch.iinfo(in_dtype).min,
                                                  torch.iinfo(in_dtype).max)
    g = torch.Generator().manual_seed(7)
    x = torch.full((2, 16, 5, 5), hi, dtype=torch.int16)
    pick = torch.rand(x.shape, generator=g)
    x[pick < 0.2] = lo
    rnd = pick > 0.9
    x[rnd] = torch.randint(lo, hi + 1, (int(rnd.sum()),), generator=g, dtype=torch.int16)
    return [x.to(in_dtype)]


@pytest.mark.parametrize("in_dtype,x_range,w_range,zp", [
    (torch.uint8, (0, 127), (-128, 127), 64),    # QSpec(reduce_range=True) activations
    (torch.int8, (-64, 63), (-127, 127), -5),    # signed 7-bit activations
    (torch.uint8, None, (-64, 63), 128),         # full-range activations, 7-bit weights
], ids=["u7-activations", "s7-activations", "s7-weights"])
def test_proven_kernels_use_vpmaddubsw_and_are_exact(tvm_backend, in_dtype, x_range, w_range,
                                                     zp):
    gm = _graph(in_dtype, x_range, w_range, zp)
    inputs = _inputs(in_dtype, x_range)
    cm = tvm_backend.compile(gm, "x86-avx2", example_inputs=inputs)
    variants = cm.meta["variants"]
    assert sorted(variants) == ["conv2d_default", "linear_default"]
    assert {v for v, _ in variants.values()} == {"avx2-pairwise"}, variants
    asm = cm.source("asm")
    for kernel in PACKED:
        body = _kernel_asm(asm, kernel)
        assert "vpmaddubsw" in body, kernel
    assert_exact(cm(*inputs), gm(*inputs), "x86-avx2 pairwise")


def test_unproven_kernels_keep_the_exact_int16_layout(tvm_backend):
    """Full-range u8 activations on full-range weights: pairs can reach 255 * 254 > 2**15 - 1,
    so the conv keeps ``vpmaddwd`` on int16 and says why; the linear reads the conv's
    ``[0, 127]`` output (through flatten) and is proven."""
    gm = _graph(torch.uint8, None, (-128, 127), 128)
    inputs = _inputs(torch.uint8, None)
    cm = tvm_backend.compile(gm, "x86-avx2", example_inputs=inputs)
    variant, why = cm.meta["variants"]["conv2d_default"]
    assert variant == "main" and "overflow int16" in why and "[0, 255]" in why, why
    assert cm.meta["variants"]["linear_default"][0] == "avx2-pairwise"
    asm = cm.source("asm")
    conv = _kernel_asm(asm, "ptq_conv2d")
    assert "vpmaddwd" in conv and "vpmaddubsw" not in conv
    assert "vpmaddubsw" in _kernel_asm(asm, "ptq_dense")
    assert_exact(cm(*inputs), gm(*inputs), "x86-avx2 int16 + pairwise")


def test_vnni_targets_have_no_pairwise_variant(tvm_backend):
    gm = _graph(torch.uint8, (0, 127), (-128, 127), 64)
    mod = tvm_backend.emit(gm, "x86-avx512-vnni", example_inputs=_inputs(torch.uint8, (0, 127)))
    assert "ptq.variants" not in (mod.attrs or {})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=2, max_size=16).filter(lambda v: len(v) % 2 == 0),
       st.integers(0, 255))
def test_pair_proof_matches_the_worst_case(w, u_max):
    """``pairs_fit_int16`` is true exactly when every pair's extreme sums fit int16 (checked
    over all corner activations ``{0, u_max}^2``)."""
    pairs = np.array(w, dtype=np.int64).reshape(-1, 2)
    corners = [(a, b) for a in (0, u_max) for b in (0, u_max)]
    fits = all(-2**15 <= a * w0 + b * w1 <= 2**15 - 1 for w0, w1 in pairs for a, b in corners)
    assert avx2.pairs_fit_int16(np.array(w, dtype=np.int8), u_max) == fits


def test_value_range_follows_views_and_max_pool():
    b = GraphBuilder()
    x = b.input("x")
    q = b.call(P.quantize.default, x, 0.1, 3, 0, 127, torch.uint8)
    v = b.call(torch.ops.aten.view.default, q, [-1, 4])
    m = b.call(P.max_pool2d.default, q, [2, 2], [2, 2], [0, 0], [1, 1], False)
    d = b.call(P.dequantize.default, q, 0.1, 3)
    gm = b.build((v, m, d))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert value_range(nodes["view_default"]) == (0, 127)
    assert value_range(nodes["max_pool2d_default"]) == (0, 127)
    assert value_range(nodes["dequantize_default"]) is None
    assert value_range(nodes["x"]) is None
