"""ATen nodes around the integer ops: int8 pass-throughs (bit-exact) and float islands."""

from __future__ import annotations

import pytest
import torch

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor

aten = torch.ops.aten


def test_integer_passthroughs_are_exact(tvm_backend):
    b = GraphBuilder()
    x = b.input("x")  # int8 [B, 4, 6]
    outs = [
        b.call(aten.view.default, x, [-1, 24]),
        b.call(aten.reshape.default, x, [-1, 2, 12]),
        b.call(aten.flatten.using_ints, x, 1),
        b.call(aten.permute.default, x, [0, 2, 1]),
        b.call(aten.contiguous.default, b.call(aten.transpose.int, x, 1, 2)),
        b.call(aten.clone.default, x),
        b.call(aten.squeeze.dim, b.call(aten.unsqueeze.default, x, 1), 1),
        b.call(aten.dropout.default, x, 0.1, False),
        b.call(aten.slice.Tensor, x, 2, 1, 5, 2),
        b.call(aten.select.int, x, 1, 2),
        b.call(aten.expand.default, b.call(aten.unsqueeze.default, x, 1), [-1, 3, -1, -1]),
    ]
    outs = [b.call(P.requantize.default, o, 3, 0.5, -1, -128, 127, torch.int8) for o in outs]
    gm = b.build(tuple(outs))
    cm = tvm_backend.compile(gm, "host", example_inputs=[int_tensor(0, (2, 4, 6), torch.int8)])
    for n in (2, 5):
        xin = int_tensor(n, (n, 4, 6), torch.int8)
        assert_exact(cm(xin), gm(xin), f"pass-throughs batch {n}")


def test_float_islands(tvm_backend):
    """Float ops between dequantize and quantize; tolerance 1e-5 on floats, 1 LSB after the
    final quantize (TVM's float kernels are not ATen's)."""
    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 8]
    ids = b.input("ids")  # int64 [B, 3]
    f = b.call(P.dequantize.default, q, 0.05, 2)
    table = b.const(torch.randn(11, 8))
    wf = b.const(torch.randn(5, 8))
    outs = [
        b.call(aten.sigmoid.default, f),
        b.call(aten.hardswish.default, f),
        b.call(aten.div.Tensor, f, 3.0),
        b.call(aten.mul.Tensor, f, f),
        b.call(aten.add.Tensor, f, 1.5),
        b.call(aten.gelu.default, f),
        b.call(aten.softmax.int, f, -1),
        b.call(aten.linear.default, f, wf),
        b.call(aten.embedding.default, table, ids),
    ]
    qs = [b.call(P.quantize.default, o, 0.01, 0, -128, 127, torch.int8) for o in outs[:4]]
    gm = b.build(tuple(outs + qs))
    inputs = [int_tensor(1, (3, 8), torch.int8), torch.randint(0, 11, (3, 3))]
    got, want = tvm_backend.compile(gm, "host", example_inputs=inputs)(*inputs), gm(*inputs)
    for g, w in zip(got[:len(outs)], want[:len(outs)]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for g, w in zip(got[len(outs):], want[len(outs):]):
        assert (g.int() - w.int()).abs().max() <= 1


def test_layer_norm_statistics_are_accurate(tvm_backend):
    """LayerNorm on a dequantized residual stream with an outlier channel (MiniLM's shape:
    rows of 384, std ~0.5, one channel ~16 std out). TVM's own ``nn.layer_norm`` sums the row
    serially in float32 and lands ~11 ulps of max|y| from ATen here (~34 on MiniLM), enough
    for the quantize after it to flip LSBs; the emitter's float64-statistics form must stay
    within 2 ulps of the exact result and 4 of ATen's. Also without weight/bias, and with a
    dynamic batch."""
    gen = torch.Generator().manual_seed(0)
    scale, zp = 0.0581, 116
    weight = torch.rand(384, generator=gen) + 0.5
    weight[99] = 1.5
    bias = torch.randn(384, generator=gen) * 0.1
    b = GraphBuilder()
    x = b.input("x")  # uint8 [B, T, 384]
    f = b.call(P.dequantize.default, x, scale, zp)
    ln = b.call(aten.layer_norm.default, f, [384], b.const(weight), b.const(bias), 1e-12)
    plain = b.call(aten.layer_norm.default, f, [384])
    q = b.call(P.quantize.default, ln, 0.0578, 118, 0, 255, torch.uint8)
    gm = b.build((ln, plain, q))

    def stream(n):
        xf = torch.randn(n, 16, 384, generator=gen) * 0.5
        xf[..., 99] += 8.0
        return (xf / scale).round().add(zp).clamp(0, 255).to(torch.uint8)

    cm = tvm_backend.compile(gm, "host", example_inputs=[stream(2)])
    eps32 = torch.finfo(torch.float32).eps
    for n in (10, 3):
        xin = stream(n)
        got, want = cm(xin), gm(xin)
        f64 = P.dequantize.default(xin, scale, zp).double()
        exact = [torch.nn.functional.layer_norm(f64, [384], *wb)
                 for wb in ((weight.double(), bias.double(), 1e-12), (None, None, 1e-5))]
        for g, w, e, what in zip(got[:2], want[:2], exact, ("affine", "plain")):
            ulp = eps32 * float(w.abs().max())
            err_exact = float((g.double() - e).abs().max())
            err_aten = float((g - w).abs().max())
            assert err_exact <= 2 * ulp, f"{what} batch {n}: {err_exact:.3g} from exact"
            assert err_aten <= 4 * ulp, f"{what} batch {n}: {err_aten:.3g} from ATen"
        assert (got[2].int() - want[2].int()).abs().max() <= 1


def test_layer_norm_is_one_scheduled_kernel(tvm_backend):
    """``aten.layer_norm`` becomes one PrimFunc (``kernels/layer_norm.py``) that the glue
    schedule takes (no float64 intermediates left to other kernels), also when it normalizes
    over several axes (flattened into one row) or over a row too short or odd for the lane
    partials (n = 15, serial sums); within 4 ulps of ATen either way."""
    import tvm

    gen = torch.Generator().manual_seed(1)
    b = GraphBuilder()
    x = b.input("x")  # int8 [B, 3, 5] and [B, 4, 3, 8]
    y = b.input("y")
    fx_, fy = b.call(P.dequantize.default, x, 0.1, 2), b.call(P.dequantize.default, y, 0.05, -3)
    w = torch.rand(3, 5, generator=gen) + 0.5
    out = (b.call(aten.layer_norm.default, fx_, [3, 5], b.const(w), None, 1e-5),
           b.call(aten.layer_norm.default, fy, [3, 8], None, b.const(torch.randn(3, 8, generator=gen)), 1e-6),
           b.call(aten.layer_norm.default, fy, [8]))
    gm = b.build(out)
    funcs = {}

    @tvm.transform.module_pass(opt_level=0, name="probe_lowered")
    def probe(mod, _ctx):
        funcs.update({gv.name_hint: f for gv, f in mod.functions_items()
                      if isinstance(f, tvm.tirx.PrimFunc)})
        return mod

    inputs = [int_tensor(2, (2, 3, 5), torch.int8), int_tensor(3, (2, 4, 3, 8), torch.int8)]
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs,
                             relax_passes={"after_lowering": probe})
    norms = {n: f for n, f in funcs.items() if "layer_norm" in n}
    assert len(norms) == 3, sorted(funcs)
    assert all(f.attrs and "tir.is_scheduled" in f.attrs for f in norms.values()), sorted(norms)
    f64 = [n for n, f in funcs.items() if n not in norms and "float64" in f.script()]
    assert not f64, f"float64 buffers outside the layer_norm kernels: {f64}"
    eps32 = torch.finfo(torch.float32).eps
    got, want = cm(*inputs), gm(*inputs)
    for i, (g, ref) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, ref, atol=4 * eps32 * float(ref.abs().max()), rtol=0,
                                   msg=lambda m: f"output {i}: {m}")


def test_softmax_kernel_matches_torch(tvm_backend):
    """Float32 softmax is emitted with ``kernels/softmax.py`` (not TVM's ``nn.softmax``), within
    ``SOFTMAX_TOLERANCE`` of ``torch.softmax``: rows masked at -1e4 (MiniLM's padding) and -inf,
    a fully -inf row (NaN, as torch), long rows with a wide range, dims other than the last."""
    from tvm import relax

    from ptqpasses_backends.tvm.kernels.softmax import SOFTMAX_TOLERANCE

    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 40)
    mask[0, 5:] = -1e4
    mask[1, ::3] = float("-inf")
    mask[2, :] = float("-inf")
    mask[3, :20] = -50.0
    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 4, 40]
    f = b.call(P.dequantize.default, q, 0.25, 3)
    masked = b.call(aten.add.Tensor, f, b.const(mask))
    outs = (b.call(aten.softmax.int, masked, -1), b.call(aten._softmax.default, f, 1, False),
            b.call(aten.softmax.int, f, 0), b.call(aten.softmax.int, f, 2, torch.float32))
    gm = b.build(outs)
    mod = tvm_backend.emit(gm, "host", example_inputs=[int_tensor(0, (2, 4, 40), torch.int8)])
    ops = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.add(e.op.name) if isinstance(
        e, relax.Call) and hasattr(e.op, "name") else None)
    assert "relax.nn.softmax" not in ops and any(
        gv.name_hint.startswith("softmax") for gv in mod.get_global_vars())
    cm = tvm_backend.compile(mod)
    for n in (2, 3):
        xin = torch.randint(-128, 128, (n, 4, 40), generator=gen, dtype=torch.int8)
        for i, (g, w) in enumerate(zip(cm(xin), gm(xin))):
            torch.testing.assert_close(g, w, equal_nan=True, **SOFTMAX_TOLERANCE,
                                       msg=lambda m: f"softmax output {i} batch {n}: {m}")
        assert torch.isnan(cm(xin)[0][:, 2]).all()  # the fully -inf row


@pytest.mark.parametrize("target", ["host", "x86-avx2", "x86-generic"])
def test_row_softmax_kernel_matches_torch_and_stores_its_quantize(tvm_backend, target):
    """CPU strategies run a softmax over rows of a multiple of their vector width with
    ``cpu/softmax.py`` (16 / 8 / 4 lanes here), the ``ptq.quantize`` after it folded into the
    kernel's store: the float rows within ``SOFTMAX_TOLERANCE`` of ``torch.softmax`` (masked
    -1e4 and -inf entries, a fully -inf row: NaN), the codes equal to the reference quantize
    of torch's softmax except where torch's value lies within that tolerance of a rounding
    boundary (there one code either way). Symbolic rows (batch) and static ones."""
    from ptqpasses.ops import reference
    from ptqpasses_backends.tvm.kernels.softmax import SOFTMAX_TOLERANCE

    targets = {"x86-generic": {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                               "mcpu": "x86-64"}}
    if target == "x86-avx2" and not host_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(5, 48)
    mask[0, 7:] = -1e4
    mask[1, ::3] = float("-inf")
    mask[2, :] = float("-inf")
    mask[3, :20] = -50.0
    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 5, 48]
    f = b.call(aten.add.Tensor, b.call(P.dequantize.default, q, 0.25, 3), b.const(mask))
    probs = b.call(aten.softmax.int, f, -1)
    scale = 1 / 255
    codes = b.call(P.quantize.default, b.call(aten.softmax.int, f, -1), scale, 0, 0, 255,
                   torch.uint8)
    gm = b.build((probs, codes))
    example = [int_tensor(0, (2, 5, 48), torch.int8)]
    for dynamic in (True, False):
        mod = tvm_backend.emit(gm, targets.get(target, target), example_inputs=example,
                               dynamic_batch=dynamic)
        names = {gv.name_hint for gv in mod.get_global_vars()}
        assert {"softmax_rows", "softmax_quantize"} <= names, sorted(names)
        assert not any("nan_to_zero" in n for n in names), sorted(names)  # no quantize kernel
        cm = tvm_backend.compile(mod)
        for n in ((2, 3) if dynamic else (2,)):
            xin = torch.randint(-128, 128, (n, 5, 48), generator=gen, dtype=torch.int8)
            got_p, got_q = cm(xin)
            want = gm(xin)[0]
            torch.testing.assert_close(got_p, want, equal_nan=True, **SOFTMAX_TOLERANCE)
            assert torch.isnan(got_p[:, 2]).all()
            ref = reference.quantize(want, scale, 0, 0, 255, torch.uint8)
            off = got_q.int() - ref.int()
            assert off.abs().max() <= 1
            v = torch.nan_to_num(want[off != 0].double(), nan=0.0) / scale
            slack = (SOFTMAX_TOLERANCE["rtol"] * v.abs() * scale + SOFTMAX_TOLERANCE["atol"]
                     ) / scale
            assert ((v - v.floor() - 0.5).abs() <= slack + 1e-9).all(), v


def test_tanh_kernel_is_accurate_near_zero(tvm_backend):
    """Float32 tanh is emitted with ``kernels/tanh.py``: TVM's own lowering cancels near 0
    (``tanh(-4.66e-7)`` came out as ``-2^-21``, found by the fuzzer). Within
    ``TANH_TOLERANCE`` of ``torch.tanh`` on tiny inputs, across the series / exp cut-over and
    in saturation; NaN and -0.0 as torch."""
    from ptqpasses_backends.tvm.kernels.tanh import SMALL, TANH_TOLERANCE

    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 256]
    outs = tuple(b.call(aten.tanh.default, b.call(P.dequantize.default, q, s, 0))
                 for s in (1e-9, 2e-6, SMALL / 100, 0.1))
    extra = b.input("f")  # float32 [B, 4]
    gm = b.build(outs + (b.call(aten.tanh.default, extra),))
    codes = torch.arange(-128, 128, dtype=torch.int8).repeat(2, 1)
    special = torch.tensor([[float("nan"), -0.0, 0.0, -float("inf")]] * 2)
    mod = tvm_backend.emit(gm, "host", example_inputs=[codes, special])
    assert any(gv.name_hint.startswith("tanh") for gv in mod.get_global_vars())
    got, want = tvm_backend.compile(mod)(codes, special), gm(codes, special)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, equal_nan=True, **TANH_TOLERANCE,
                                   msg=lambda m: f"tanh output {i}: {m}")
    assert torch.equal(torch.signbit(got[-1]), torch.signbit(want[-1]))


def test_erf_and_gelu_kernels_are_vectorizable_and_accurate(tvm_backend):
    """Float32 ``erf`` and exact ``gelu`` are emitted with ``kernels/erf.py`` (TVM's own call
    libm's ``erff`` per element: no vector code): within ``ERF_TOLERANCE`` of ``torch.erf``
    across the range, tiny and saturated inputs and NaN; both GELUs (exact; tanh, with
    ``kernels/tanh.py``) within 1e-6 of ATen's."""
    from ptqpasses_backends.tvm.kernels.erf import ERF_TOLERANCE

    b = GraphBuilder()
    q = b.input("q")  # int16 [B, 512]
    f = b.call(P.dequantize.default, q, 2.0**-12, 0)  # -8 .. 8
    g = b.input("g")  # float32 [B, 4]
    outs = (b.call(aten.erf.default, f), b.call(aten.gelu.default, f),
            b.call(aten.gelu.default, f, approximate="tanh"), b.call(aten.erf.default, g))
    gm = b.build(outs)
    codes = torch.linspace(-32768, 32767, 1024).to(torch.int16).reshape(2, 512)
    special = torch.tensor([[float("nan"), 1e-30, -3.3159, 5.0]] * 2)
    mod = tvm_backend.emit(gm, "host", example_inputs=[codes, special])
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.startswith("erf") for n in names) and any(n.startswith("gelu") for n in names)
    cm = tvm_backend.compile(mod)
    assert "erff" not in cm.source("asm")
    got, want = cm(codes, special), gm(codes, special)
    for i in (0, 3):
        torch.testing.assert_close(got[i], want[i], equal_nan=True, **ERF_TOLERANCE,
                                   msg=lambda m: f"erf output {i}: {m}")
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)


def test_float_convs_are_emitted_as_scheduled_glue(tvm_backend):
    """Float32 convs the accuracy guard keeps float: 1x1 as a matmul (the glue schedule's
    column-reduction rule), depthwise (padding, stride, dilation) as a sum of taps, on CPUs
    one channel-last kernel each (``depthwise_float``); TVM's own unscheduled ``conv2d`` is
    not used for them (MobileNetV2's 1x1 960 -> 160 took 15 ms). A grouped conv that is
    neither stays TVM's. Within 1e-5 of ATen."""
    from tvm import relax

    gen = torch.Generator().manual_seed(3)
    b = GraphBuilder()
    q = b.input("q")  # int8 [B, 16, 9, 11]
    f = b.call(P.dequantize.default, q, 0.05, 2)

    def w(*shape):
        return b.const(torch.randn(*shape, generator=gen) * 0.3)

    outs = (b.call(aten.conv2d.default, f, w(24, 16, 1, 1), w(24)),
            b.call(aten.conv2d.default, f, w(16, 1, 3, 3), w(16), [1, 1], [1, 1], [1, 1], 16),
            b.call(aten.conv2d.default, f, w(16, 1, 3, 3), None, [2, 2], [2, 1], [2, 1], 16),
            b.call(aten.conv2d.default, f, w(8, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], 4))
    gm = b.build(outs)
    example = [int_tensor(0, (2, 16, 9, 11), torch.int8)]
    mod = tvm_backend.emit(gm, "host", example_inputs=example)
    convs = []
    relax.analysis.post_order_visit(mod["main"], lambda e: convs.append(e) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    assert len(convs) == 1  # only the grouped (non-depthwise) one
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sum(n.startswith("depthwise_float") for n in names) == 2, names
    cm = tvm_backend.compile(mod)
    for n in (2, 3):
        xin = int_tensor(n, (n, 16, 9, 11), torch.int8)
        for i, (g, want) in enumerate(zip(cm(xin), gm(xin))):
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"float conv {i} batch {n}: {m}")


def test_unfolded_batch_norm_uses_running_statistics(tvm_backend):
    """A batch norm FoldBatchNorm cannot fold (after a pool, a linear) stays a float
    ``aten.batch_norm``; TVM's converter read its arguments at the positions of
    ``_native_batch_norm_legit_no_training`` (batch statistics, eps = momentum). Found by
    ``tools/fuzz.py``: Linear(1, 1) -> BatchNorm1d(1) gave 0.081 for -0.0076. Tolerance: 2 ulps
    of the largest output (x * a + b may be contracted to an fma)."""
    for shape in ((4, 3), (2, 3, 5, 5)):
        b = GraphBuilder()
        x = b.input("x")
        g = torch.Generator().manual_seed(len(shape))
        stats = [torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g),
                 torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.2]
        w, bias, mean, var = (b.const(t) for t in stats)
        gm = b.build(b.call(aten.batch_norm.default, x, w, bias, mean, var, False, 0.1, 1e-5,
                            False))
        xin = torch.randn(*shape, generator=g) * 3
        cm = tvm_backend.compile(gm, "host", example_inputs=[xin])
        for n in (1, 5):
            xb = torch.randn(n, *shape[1:], generator=g) * 3
            want = torch.nn.functional.batch_norm(xb, stats[2], stats[3], stats[0], stats[1],
                                                  eps=1e-5)
            got = cm(xb)
            torch.testing.assert_close(got, want, rtol=0, atol=2 * want.abs().max().item() * 2**-23)


def test_im2col_is_exact(tvm_backend):
    """``aten.im2col`` (``nn.Unfold``; ConvBERT's span conv on a float ``[B, C, T, 1]``) is a
    gather: bit-exact for float32 and int8 with padding, dilation and stride, batched (a
    dynamic batch, two sizes) and unbatched ``[C, H, W]``. ATen's CPU im2col takes floats
    only: the int8 reference is the float one of the same values, cast back."""
    cases = [  # kernel, dilation, padding, stride, input [C, H, W]
        ((9, 1), (1, 1), (4, 0), (1, 1), (4, 10, 1)),  # ConvBERT's
        ((3, 2), (2, 1), (1, 2), (2, 1), (3, 9, 7)),
        ((2, 3), (1, 2), (0, 1), (1, 3), (2, 5, 8)),
        ((1, 1), (1, 1), (0, 0), (2, 2), (3, 6, 6)),
    ]
    gen = torch.Generator().manual_seed(0)

    def tensor(shape, dtype, seed):
        if dtype == torch.int8:
            return int_tensor(seed, shape, dtype)
        return torch.randn(*shape, generator=gen)

    def graph():
        b = GraphBuilder()
        xs = [b.input(f"x{i}") for i in range(len(cases))]
        return b.build(tuple(b.call(aten.im2col.default, x, *(list(v) for v in case[:4]))
                             for x, case in zip(xs, cases)))

    def reference(gm, xs):
        if xs[0].dtype == torch.int8:
            return tuple(y.to(torch.int8) for y in gm(*(x.float() for x in xs)))
        return gm(*xs)

    for dtype in (torch.float32, torch.int8):
        gm = graph()
        batched = [tensor((2, *case[4]), dtype, i) for i, case in enumerate(cases)]
        cm = tvm_backend.compile(gm, "host", example_inputs=batched)
        for n in (1, 3):
            xs = [tensor((n, *case[4]), dtype, 10 * n + i) for i, case in enumerate(cases)]
            assert_exact(cm(*xs), reference(gm, xs), f"im2col {dtype} batch {n}")
        unbatched = [tensor(case[4], dtype, 50 + i) for i, case in enumerate(cases)]
        cm = tvm_backend.compile(gm, "host", example_inputs=unbatched, dynamic_batch=False)
        assert_exact(cm(*unbatched), reference(gm, unbatched), f"im2col {dtype} unbatched")


def test_inplace_ops_are_functional_only_where_nothing_else_reads(tvm_backend):
    """An in-place op TVM has no converter for (``div_``: DeBERTa's ``pos_query_layer /=
    scale``) is emitted as its functional form where the tensor it writes (and the views it
    is made of) has no other reader; otherwise, or on an input, an EmitError names it."""
    import pytest

    from ptqpasses_backends.tvm.emit import EmitError

    four = torch.tensor(4.0)
    b = GraphBuilder()
    x = b.input("x")
    y = b.call(aten.permute.default, b.call(aten.mul.Tensor, x, 2.0), [1, 0])
    gm = b.build(b.call(aten.div_.Tensor, y, b.const(four)))
    xin = torch.randn(3, 5)
    cm = tvm_backend.compile(gm, "host", example_inputs=[xin])
    assert_exact(cm(xin), gm(xin.clone()), "div_")

    for read_elsewhere in (True, False):
        b = GraphBuilder()
        x = b.input("x")
        y = b.call(aten.mul.Tensor, x, 2.0) if read_elsewhere else x
        d = b.call(aten.div_.Tensor, y, b.const(four))
        gm = b.build((d, y) if read_elsewhere else d)
        with pytest.raises(EmitError,
                           match=r"node 'div_\w*' \(aten.div_.Tensor\): in place.*other nodes"):
            tvm_backend.emit(gm, "host", example_inputs=[xin])
