"""The CPU schedule of depthwise convs (``backends/tvm/cpu/depthwise.py``): bit-exact
against the reference for strides 1 and 2, padding 0 / 1 / 2, dilation 2, a channel
multiplier, odd widths, 8-bit dtypes on both sides and a dynamic batch; applied (marked
scheduled, a parallel loop, vector loops); vector integer multiplies in the assembly (x86,
aarch64 built); the CUDA family builds the same compute."""

from __future__ import annotations

import re

import torch

from tests.backends.conftest import P, GraphBuilder, assert_exact, kernel_probe
from tests.backends.strategies import int_tensor, multipliers, weight

I8, U8 = torch.int8, torch.uint8

#: (in dtype, x_zp, channels, multiplier k, (h, w), kernel, stride, padding, dilation, bias,
#:  out dtype, out_zp, qmin, qmax)
CASES = [
    (U8, 3, 6, 1, (9, 13), (3, 3), (1, 1), (1, 1), (1, 1), True, I8, -3, -128, 127),
    (I8, -5, 5, 1, (11, 15), (3, 3), (2, 2), (1, 1), (1, 1), True, U8, 7, 7, 255),
    (U8, 128, 4, 1, (10, 12), (3, 3), (1, 1), (2, 2), (2, 2), False, I8, 0, -128, 127),
    (I8, 0, 3, 2, (9, 10), (3, 3), (2, 2), (0, 0), (1, 1), True, I8, 1, -128, 127),
    (U8, 0, 4, 1, (7, 7), (5, 5), (1, 2), (2, 1), (1, 2), True, U8, 0, 0, 255),
    (I8, 12, 3, 1, (8, 16), (3, 3), (1, 1), (0, 0), (1, 1), False, I8, -1, -128, 127),
    # stride 2 on even widths: the tensorized column split, 8 and 4 lanes
    (U8, 250, 3, 1, (6, 32), (3, 3), (2, 2), (1, 1), (1, 1), True, U8, 3, 0, 255),
    (I8, -128, 2, 2, (7, 24), (3, 3), (2, 2), (1, 1), (1, 1), True, I8, 0, -128, 127),
]


def _graph():
    b, outs = GraphBuilder(), []
    for i, (_, xzp, c, k, _, ks, st, pad, dil, bias, odt, ozp, lo, hi) in enumerate(CASES):
        x = b.input(f"x{i}")
        w = b.const(weight(10 * i + 1, (c * k, 1, *ks)))
        bias_c = b.const(torch.randint(-4000, 4000, (c * k,), dtype=torch.int32,
                                       generator=torch.Generator().manual_seed(i))) \
            if bias else None
        m = b.const(multipliers(10 * i + 2, c * k, 0.004))
        outs.append(b.call(P.conv2d.default, x, xzp, w, bias_c, list(st), list(pad),
                           list(dil), c, m, ozp, lo, hi, odt))
    return b.build(tuple(outs))


def _inputs(n: int, seed: int):
    xs = [int_tensor(seed + i, (n, c, *hw), dt)
          for i, (dt, _, c, _, hw, *_) in enumerate(CASES)]
    for x, (dt, *_) in zip(xs, CASES):  # a border row / column at the dtype's extremes
        lo, hi = (-128, 127) if dt == I8 else (0, 255)
        x[:, 0, 0, :], x[:, 0, :, -1], x[:, -1, -1, :] = hi, lo, lo
    return xs


def test_depthwise_convs_are_scheduled_and_exact(tvm_backend):
    gm = _graph()
    seen = {}
    cm = tvm_backend.compile(gm, "host", example_inputs=_inputs(2, 0), dynamic_batch=True,
                             relax_passes={"after_schedule": kernel_probe("conv2d_depthwise",
                                                                          seen)})
    for n, seed in ((2, 10), (1, 20), (3, 30)):  # one module, several batch sizes
        xs = _inputs(n, seed)
        assert_exact(cm(*xs), gm(*xs), f"depthwise batch {n}")
    assert len(seen) == len(CASES)
    for name, f in seen.items():
        assert "tir.is_scheduled" in f.attrs, name
        text = f.script()
        assert "T.parallel(" in text, name
        # the tile: 8 int32 accumulators (init, update, write-back), vectorized
        assert len(re.findall(r"T\.vectorized\((T\.int64\()?8\)", text)) >= 3, name
    # the zero-point border split off x_enc (a fill, then an unguarded copy) at least wherever
    # the stride divides the width (the stride-2 convs on odd widths may keep the guard)
    split = [name for name, f in seen.items() if "x_enc_pad_const" in f.script()]
    assert len(split) >= len(CASES) - 2, split
    # the stride-2 column split (even widths): one vector load and two shuffles per vector
    assert sum("T.Shuffle(" in f.script() for f in seen.values()) == 2


def test_assembly_has_vector_integer_multiplies(tvm_backend):
    """x86 AVX2: 8-lane int32 multiplies (or LLVM's ``vpmaddwd`` form of them); aarch64 NEON
    (built, not run here): the same schedule, column split included, builds and multiplies
    whole vector registers."""
    b = GraphBuilder()
    x = b.input("x")
    w = b.const(weight(1, (16, 1, 3, 3)))
    m = b.const(multipliers(2, 16, 0.004))
    gm = b.build(b.call(P.conv2d.default, x, 3, w, None, [2, 2], [1, 1], [1, 1], 16, m, 0,
                        -128, 127, I8))
    xs = [int_tensor(0, (1, 16, 20, 20), U8)]
    asm = tvm_backend.compile(gm, "x86-avx2", example_inputs=xs).source("asm")
    assert re.search(r"\b(vpmulld|vpmaddwd)\s+[^\n]*%ymm", asm)
    asm = tvm_backend.compile(gm, "aarch64-neon", example_inputs=xs).source("asm")
    assert re.search(r"\bmla?\s+v\d+\.4s", asm)


def test_cuda_builds_the_same_compute(tvm_backend):
    """The compute is shared by every family: CUDA (dlight's rules, built only) takes the
    stride-phase ``x_enc`` with a channel multiplier and a dilated stride-2 kernel."""
    b = GraphBuilder()
    outs = []
    for i, (k, ks, st, pad, dil) in enumerate([(2, (3, 3), [2, 2], [1, 1], [1, 1]),
                                               (1, (5, 5), [1, 2], [2, 1], [1, 2])]):
        w = b.const(weight(i, (4 * k, 1, *ks)))
        m = b.const(multipliers(i + 1, 4 * k, 0.004))
        outs.append(b.call(P.conv2d.default, b.input(f"x{i}"), 3, w, None, st, pad, dil, 4, m,
                           0, -128, 127, I8))
    xs = [int_tensor(0, (1, 4, 12, 16), U8), int_tensor(1, (1, 4, 9, 14), U8)]
    src = tvm_backend.compile(b.build(tuple(outs)), "cuda-sm80",
                              example_inputs=xs).source("cuda")
    kernels = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", src)
    assert sum(k.startswith("ptq_conv2d_depthwise") for k in kernels) >= 2, kernels


#: (in dtype, x_zp, channels, (h, w), kernel, stride, padding, dilation, bias, out dtype,
#:  out_zp, qmin, qmax): MobileNetV2's shapes in small (3x3, stride 1 and 2), a 5x5 (two
#: groups of kernel rows), dilation, int8 in and out, output widths not a multiple of the
#: kernel's 4 pixels.
VNNI_CASES = [
    (U8, 3, 32, (9, 13), (3, 3), (1, 1), (1, 1), (1, 1), True, U8, 0, 0, 255),
    (I8, -5, 48, (11, 15), (3, 3), (2, 2), (1, 1), (1, 1), True, I8, 2, -128, 127),
    (U8, 0, 16, (10, 12), (5, 5), (2, 1), (2, 2), (1, 1), False, U8, 3, 0, 255),
    (I8, 0, 16, (9, 9), (3, 3), (1, 1), (2, 2), (2, 2), True, U8, 0, 0, 255),
]


def _vnni_graph():
    """Each depthwise conv reads the NHWC output of a 1x1 conv (the only layout the VNNI
    kernel takes), as in MobileNetV2."""
    b, outs, inputs = GraphBuilder(), [], []
    for i, (dt, xzp, c, hw, ks, st, pad, dil, bias, odt, ozp, lo, hi) in enumerate(VNNI_CASES):
        x = b.input(f"x{i}")
        span = (-128, 127) if dt == I8 else (0, 255)
        x1 = b.call(P.conv2d.default, x, 0, b.const(weight(90 + i, (c, c, 1, 1))), None,
                    [1, 1], [0, 0], [1, 1], 1, b.const(multipliers(i, c, 0.01)), xzp, *span, dt)
        bias_c = b.const(torch.randint(-4000, 4000, (c,), dtype=torch.int32,
                                       generator=torch.Generator().manual_seed(i))) \
            if bias else None
        outs.append(b.call(P.conv2d.default, x1, xzp, b.const(weight(10 * i, (c, 1, *ks))),
                           bias_c, list(st), list(pad), list(dil), c,
                           b.const(multipliers(i + 20, c, 0.02)), ozp, lo, hi, odt))
        inputs.append(int_tensor(i, (2, c, *hw), U8))
    return b.build(tuple(outs)), inputs


def test_vnni_depthwise_kernel_is_chosen_where_it_fits(tvm_backend):
    """Cross-built for ``x86-avx512-vnni`` on any x86 machine: every depthwise conv of
    ``VNNI_CASES`` takes ``x86/depthwise.py`` (recorded in the variants; ``vpdpbusd`` in
    its code); AVX2 keeps the generic kernel."""
    gm, inputs = _vnni_graph()
    cm = tvm_backend.compile(gm, "x86-avx512-vnni", example_inputs=inputs)
    picked = [n for n, v in cm.meta["variants"].items() if v[0] == "vnni-depthwise"]
    assert len(picked) == len(VNNI_CASES), cm.meta["variants"]
    assert re.search(r"\bvpdpbusd\b", cm.source("asm"))
    mod = tvm_backend.emit(gm, "x86-avx2", example_inputs=inputs)
    assert not any("vnni" in gv.name_hint for gv in mod.get_global_vars())


def test_vnni_depthwise_kernel_is_exact(tvm_backend):
    from tests.backends.conftest import host_has

    if not host_has("avx512vnni"):
        import pytest

        pytest.skip("this CPU has no AVX-512 VNNI")
    gm, inputs = _vnni_graph()
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=True)
    assert_exact(cm(*inputs), gm(*inputs), "VNNI depthwise")
    other = [int_tensor(50 + i, (3, *t.shape[1:]), U8) for i, t in enumerate(inputs)]
    assert_exact(cm(*other), gm(*other), "VNNI depthwise, another batch size")
