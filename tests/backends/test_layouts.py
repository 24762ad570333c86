"""Channel-last (NHWC) activations between integer ops (``ptq_ops.LAYOUTS``): a conv writes
NHWC, and the convs, pools, elementwise ops, channel concat and spatial mean after it take it
as it is; the graph's layout comes back (one transpose) only where an op needs it. Bit-exact
against the reference, with a dynamic batch, for every CPU strategy this machine runs; and
the transposes counted in the emitted module."""

from __future__ import annotations

import pytest
import torch
import tvm

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor, multipliers, weight
from tests.backends.test_depthwise_schedule import CASES as DEPTHWISE_CASES

I8, U8 = torch.int8, torch.uint8


def _conv(b, x, seed, c_in, c_out, k=3, stride=1, pad=1, groups=1, x_zp=3, out=(I8, -2)):
    w = b.const(weight(seed, (c_out, c_in // groups, k, k)))
    bias = b.const(torch.randint(-3000, 3000, (c_out,), dtype=torch.int32,
                                 generator=torch.Generator().manual_seed(seed)))
    m = b.const(multipliers(seed + 1, c_out, 0.002))
    dt, zp = out
    lo, hi = {I8: (-128, 127), U8: (0, 255)}.get(dt, (0, 0))  # (float32: a float output)
    return b.call(P.conv2d.default, x, x_zp, w, bias, [stride] * 2, [pad] * 2, [1, 1],
                  groups, m, zp, max(lo, zp) if seed % 2 else lo, hi, dt)


def _chain():
    """conv -> (clamp, requantize, lut) -> max_pool -> conv pair -> add -> cat -> conv s2 ->
    depthwise -> avg_pool -> mean (keepdim) and mean -> outputs; plus a conv whose output is
    a graph output and a mul with a [N, C, 1, 1] operand."""
    b = GraphBuilder()
    x = b.input("x")
    y = _conv(b, x, 1, 8, 16, out=(U8, 5))                    # NCHW in -> NHWC out
    y = b.call(P.clamp.default, y, 5, 200)
    y = b.call(P.requantize.default, y, 5, 0.75, 9, 0, 255, U8)
    y = b.call(P.lut.default, y, b.const(torch.arange(255, -1, -1).to(torch.uint8)), 0)
    y = b.call(P.max_pool2d.default, y, [3, 3], [2, 2], [1, 1], [1, 1], False)
    a = _conv(b, y, 3, 16, 16, x_zp=40, out=(I8, 1))
    c = _conv(b, y, 5, 16, 16, k=1, pad=0, x_zp=40, out=(I8, -4))
    s = b.call(P.add.default, a, 1, 3, c, -4, 2, 0.5, 0, -128, 127, I8)
    cat = b.call(P.cat.default, [s, a], [0, 1], [1.0, 0.5], 1, 2, -128, 127, I8)
    d = _conv(b, cat, 7, 32, 24, stride=2, x_zp=2, out=(I8, 0))
    dw = _conv(b, d, 9, 24, 24, groups=24, x_zp=0, out=(U8, 3))  # depthwise on NHWC
    p = b.call(P.avg_pool2d.default, dw, 3, [2, 2], [1, 1], [0, 0], 0.25, 1, 0, 255, U8)
    g = b.call(P.mean.default, p, 1, [2, 3], True, 0.05, 2, 0, 255, U8)
    se = b.call(P.mul.default, p, 1, g, 2, 0.01, 4, 0, 255, U8)
    flat = b.call(P.mean.default, se, 4, [-1, -2], False, 0.05, 2, 0, 255, U8)
    return b.build((flat, g, d)), [int_tensor(0, (2, 8, 15, 17), U8)]


def _permutes(mod) -> int:
    n = 0
    for _, func in mod.functions_items():
        if isinstance(func, tvm.relax.Function):
            n += str(func).count("R.permute_dims(")
    return n


STRATEGIES = [t for t, need in (("x86-avx2", "avx2"), ("x86-avx512-vnni", "avx512vnni"),
                                ("x86-avx-vnni", "avxvnni")) if host_has(need)]


@pytest.mark.parametrize("target", STRATEGIES)
def test_nhwc_chain_is_exact_with_dynamic_batch(tvm_backend, target):
    gm, inputs = _chain()
    cm = tvm_backend.compile(gm, target, example_inputs=inputs, dynamic_batch=True)
    for n, seed in ((2, 0), (1, 7), (3, 9)):
        xs = [int_tensor(seed, (n, 8, 15, 17), U8)]
        assert_exact(cm(*xs), gm(*xs), f"{target} batch {n}")


@pytest.mark.parametrize("target,input_transposes", [("x86-avx512-vnni", 0), ("x86-amx", 1),
                                                     ("x86-avx2", 0)])
def test_nhwc_is_kept_between_integer_ops(tvm_backend, target, input_transposes):
    """Transposes only at the boundaries: the conv output that is also a graph output (one),
    and ``g`` (a kept-dims mean, NHWC) as an output (one); the NCHW graph input is read by the
    first conv itself (its ``x_enc``), or through one transpose by the AMX tile kernel."""
    gm, inputs = _chain()
    mod = tvm_backend.emit(gm, target, example_inputs=inputs)
    assert _permutes(mod) == 2 + input_transposes, mod["main"]
    layouts = {str(f.attrs["ptq.kernel"]): str(f.attrs.get("ptq.layout", ""))
               for _, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs}
    assert layouts["conv2d"] == layouts["conv2d_depthwise"] == "NHWC", layouts
    assert layouts["max_pool2d"] == layouts["avg_pool2d"] == "NHWC", layouts


F32 = torch.float32


@pytest.mark.parametrize("target", STRATEGIES + (["x86-amx"] if host_has("amx-int8") else []))
def test_float_outputs_are_exact(tvm_backend, target):
    """Float-output ops (``float32(acc) * m``, docs/integer_ops.md) on every CPU strategy this
    machine runs: 3x3, strided 1x1 and depthwise convs (NHWC inside), a linear and an
    attention-style matmul, with a dynamic batch."""
    b = GraphBuilder()
    x = b.input("x")
    y = _conv(b, x, 1, 8, 32, out=(U8, 5))
    outs = [_conv(b, y, 3, 32, 16, out=(F32, 0)),
            _conv(b, y, 5, 32, 24, k=1, pad=0, stride=2, x_zp=5, out=(F32, 0)),
            _conv(b, y, 7, 32, 32, groups=32, x_zp=5, out=(F32, 0))]
    flat = b.call(P.mean.default, y, 5, [2, 3], False, 0.05, 2, 0, 255, U8)
    w = b.const(weight(9, (20, 32)))
    bias = b.const(torch.randint(-3000, 3000, (20,), dtype=torch.int32))
    outs.append(b.call(P.linear.default, flat, 2, w, bias, b.const(multipliers(10, 20, 0.01)),
                       0, 0, 0, F32))
    q = b.input("q")
    outs.append(b.call(P.matmul.default, q, 3, q, 3, 0.001, 0, 0, 0, F32))
    gm = b.build(tuple(outs))
    cm = tvm_backend.compile(gm, target, example_inputs=[int_tensor(0, (2, 8, 9, 11), U8),
                                                         int_tensor(1, (2, 16, 16), U8)])
    for n, seed in ((2, 0), (3, 5)):
        xs = [int_tensor(seed, (n, 8, 9, 11), U8), int_tensor(seed + 1, (n, 16, 16), U8)]
        got, want = cm(*xs), gm(*xs)
        assert all(g.dtype == torch.float32 for g in want)
        assert_exact(got, want, f"{target} batch {n}")


def test_depthwise_on_nhwc_inputs_is_exact(tvm_backend):
    """The channel-contiguous depthwise compute (``conv2d_depthwise_nhwc``) on every case of the
    planar compute's test: strides, padding, dilation, channel multiplier, dtypes; its input
    is made NHWC by a 1x1 conv in front."""
    b, outs, shapes = GraphBuilder(), [], []
    for i, (dt, xzp, c, k, hw, ks, st, pad, dil, bias, odt, ozp, lo, hi) in enumerate(
            DEPTHWISE_CASES):
        x = b.input(f"x{i}")
        y = _conv(b, x, 100 + i, c, c, k=1, pad=0, x_zp=0, out=(dt, xzp))
        w = b.const(weight(10 * i + 1, (c * k, 1, *ks)))
        bias_c = b.const(torch.randint(-4000, 4000, (c * k,), dtype=torch.int32)) \
            if bias else None
        m = b.const(multipliers(10 * i + 2, c * k, 0.004))
        outs.append(b.call(P.conv2d.default, y, xzp, w, bias_c, list(st), list(pad),
                           list(dil), c, m, ozp, lo, hi, odt))
        shapes.append((c, hw, dt))
    gm = b.build(tuple(outs))
    xs = [int_tensor(i, (2, c, *hw), dt) for i, (c, hw, dt) in enumerate(shapes)]
    cm = tvm_backend.compile(gm, "host", example_inputs=xs, dynamic_batch=True)
    assert_exact(cm(*xs), gm(*xs), "depthwise NHWC")
    one = [t[:1] for t in xs]
    assert_exact(cm(*one), gm(*one), "depthwise NHWC batch 1")


def _float_stretch():
    """MobileNetV2's guard-raised stretches: conv (float out) -> hardtanh -> float depthwise
    -> hardtanh -> quantize -> conv; conv (float out) -> hardtanh -> float 1x1 -> add with a
    dequantized int8 value -> float 1x1 -> hardtanh -> quantize -> depthwise (int8); the
    graph outputs are int8 (bit-exact up to the float ops' rounding) and one float."""
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(5)
    b = GraphBuilder()
    x = b.input("x")

    def w(*shape):
        return b.const(torch.randn(*shape, generator=gen) * 0.3)

    f = _conv(b, x, 1, 8, 16, out=(F32, 0))
    f = b.call(aten.hardtanh.default, f, 0.0, 6.0)
    f = b.call(aten.conv2d.default, f, w(16, 1, 3, 3), w(16), [1, 1], [1, 1], [1, 1], 16)
    f = b.call(aten.hardtanh.default, f, 0.0, 6.0)
    q = b.call(P.quantize.default, f, 0.03, 0, 0, 255, U8)
    a = _conv(b, q, 3, 16, 16, k=1, pad=0, x_zp=0, out=(I8, 2))
    g = _conv(b, a, 5, 16, 32, k=1, pad=0, x_zp=2, out=(F32, 0))
    g = b.call(aten.hardtanh.default, g, 0.0, 6.0)
    g = b.call(aten.conv2d.default, g, w(16, 32, 1, 1), w(16))
    g = b.call(aten.add.Tensor, b.call(P.dequantize.default, a, 0.05, 2), g)
    g = b.call(aten.conv2d.default, g, w(32, 16, 1, 1), w(32))
    h = b.call(aten.hardtanh.default, g, 0.0, 6.0)
    r = b.call(P.quantize.default, h, 0.03, 0, 0, 255, U8)
    d = _conv(b, r, 7, 32, 32, groups=32, x_zp=0, out=(I8, 0))
    return b.build((d, g)), [int_tensor(0, (2, 8, 10, 12), U8)]


def test_float_stretches_stay_channel_last(tvm_backend):
    """Float ops between int8 convs run on the NHWC values (``Emitter._emit_float_nhwc``,
    the quantize / dequantize layout rules): no transpose but the two graph outputs' (the
    graph's NCHW); against the reference, the int8 output within one code where the float ops'
    rounding moves a value across a boundary, and the float output within float32 rounding."""
    gm, inputs = _float_stretch()
    mod = tvm_backend.emit(gm, "host", example_inputs=inputs)
    assert _permutes(mod) == 2, mod["main"]
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sum(n.startswith("depthwise_float") for n in names) == 1, names
    cm = tvm_backend.compile(mod)
    for n, seed in ((2, 0), (3, 4)):
        xs = [int_tensor(seed, (n, 8, 10, 12), U8)]
        (d, g), (d_want, g_want) = cm(*xs), gm(*xs)
        torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-5)
        off = (d.int() - d_want.int()).abs()
        assert int(off.max()) <= 1 and float((off > 0).float().mean()) < 1e-3, (n, off.max())
