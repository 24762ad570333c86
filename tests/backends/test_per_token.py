"""Per-token (dynamic) activations through TVM: ``ptq.linear_dynamic`` and
``ptq.fake_quantize_per_token`` bit-exact against the reference on every x86 family the
machine can run (the others are cross-built), edge rows included (zeros, one sign only,
NaN, huge values)."""

from __future__ import annotations

import pytest
import torch

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has

#: x86 strategies and the CPU flags they need to run here.
FAMILIES = {"x86-avx2": ("avx2",), "x86-avx512-vnni": ("avx512f", "avx512vnni"),
            "x86-amx": ("avx512vnni", "amx-int8", "amx-tile"), "x86-avx-vnni": ("avxvnni",),
            "x86-generic": (), "host": ()}
#: Families without a named target: x86-64 without AVX2 (SSE: the 4-lane kernel).
TARGETS = {"x86-generic": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}}


def _rows(seed: int, lead, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * torch.rand(*lead, 1, generator=g) * 8
    flat = x.view(-1, k)
    flat[0] = 0.0                                   # a row of zeros: q = 0, s = 2**-126
    if len(flat) > 4:
        flat[1] = flat[1].abs()                         # positive only: zero point 0
        flat[2] = -flat[2].abs()                        # negative only: zero point 255
        flat[3, ::3] = float("nan")                     # NaN reads as 0
        flat[4] *= 1e30                                 # huge values
    return x


def _graph(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x")
    w = b.const(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
    ws = b.const((torch.rand(n, generator=g) + 0.1) * 0.01)
    y = b.call(P.linear_dynamic.default, x, w, ws)
    fq = b.call(P.fake_quantize_per_token.default, x)
    return b.build((y, fq))


@pytest.mark.parametrize("target", list(FAMILIES))
@pytest.mark.parametrize("lead,k,n,dynamic", [((2, 37), 70, 33, True), ((1, 5), 16, 64, True),
                                               ((3, 40), 384, 96, True),
                                               ((4, 130), 161, 48, False)])
def test_linear_dynamic_is_exact_on_every_family(tvm_backend, target, lead, k, n, dynamic):
    """Symbolic rows (``dynamic_batch``) and 520 static rows x 161 run the CPU families'
    one-pass kernel in parallel (rows not a multiple of its task); K = 16 / 384 fill its
    vectors, 70 / 161 leave lane and scalar tails."""
    if not all(host_has(f) for f in FAMILIES[target]):
        pytest.skip(f"this CPU cannot run {target}")
    gm = _graph(k, n, seed=k + n)
    x = _rows(k, lead, k)
    want = gm(x)
    assert torch.isfinite(want[0][0]).all()  # the zero row's output is exactly 0
    cm = tvm_backend.compile(gm, TARGETS.get(target, target), example_inputs=(x,),
                             dynamic_batch=dynamic)
    assert_exact(cm(x), want, target)
    if not dynamic:
        return
    x2 = _rows(k + 1, (lead[0] + 1, *lead[1:]), k)  # another batch through the same module
    assert_exact(cm(x2), gm(x2), target)


@pytest.mark.parametrize("rows,k", [(5, 70), (40, 384), (3, 7)])
@pytest.mark.parametrize("lanes,avx512", [(16, True), (8, False), (4, False)])
@pytest.mark.parametrize("parallel", [False, True])
def test_cpu_one_pass_kernel_matches_the_reference(tvm_backend, rows, k, lanes, avx512,
                                                   parallel):
    """``cpu/token.py`` alone: codes and (scale, inverse, zero point) bit for bit against
    ``reference.token_qparams`` / ``_token_quantize``, every lane width it is built with."""
    import numpy as np
    import tvm

    from ptqpasses.ops import reference
    from ptqpasses_backends.tvm.cpu.token import token_quantize_rows

    if not host_has("avx512f" if avx512 else "avx2"):
        pytest.skip("this CPU cannot run the kernel's target")
    x = _rows(rows, (rows,), k)
    func = token_quantize_rows(None, k, lanes=lanes, avx512=avx512, parallel=parallel)
    from ptqpasses_backends.tvm import targets

    target = targets.resolve("host" if avx512 else "x86-avx2").target()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=target)
    out = [tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(np.zeros((rows, k), np.uint8)),
           tvm.runtime.tensor(np.zeros((rows, 3), np.float32))]
    lib(*out)
    q, s, zp = reference._token_quantize(x)
    want_p = torch.cat(reference.token_qparams(x), 1)
    assert torch.equal(torch.from_numpy(out[1].numpy()), q.to(torch.uint8))
    assert torch.equal(torch.from_numpy(out[2].numpy()), want_p)


def test_cpu_families_quantize_each_row_in_one_kernel(tvm_backend):
    """Every CPU strategy builds per-token inputs with the one-pass kernel (no separate row
    statistics kernel); CUDA keeps the TE pair (``test_cuda_builds_the_per_token_kernels``)."""
    from ptqpasses_backends.tvm import registry
    from ptqpasses_backends.tvm.strategy import Device

    for strategy in registry.all_strategies():
        assert (strategy.kernel("token_quantize") is not None) == (
            strategy.device is Device.CPU), \
            strategy.name
    gm = _graph(64, 48, seed=5)
    x = _rows(64, (2, 8), 64)
    src = tvm_backend.compile(gm, "x86-avx2", example_inputs=(x,)).source("ll")
    assert "token_quantize" in src and "token_params" not in src


def test_amx_dense_takes_the_per_token_epilogue(tvm_backend):
    """Cross-built on any x86 machine: on ``x86-amx`` the tile dense computes the per-row
    correction and scales in its epilogue (it reads the row parameters; no
    ``token_epilogue`` kernel), on ``x86-avx512-vnni`` the TE epilogue follows the dense.
    (Bit-exactness: ``test_linear_dynamic_is_exact_on_every_family``.)"""
    import tvm

    gm = _graph(64, 48, seed=5)
    x = _rows(64, (2, 8), 64)
    for target, fused in (("x86-amx", True), ("x86-avx512-vnni", False)):
        mod = tvm_backend.emit(gm, target, example_inputs=(x,))
        names = {gv.name_hint for gv in mod.get_global_vars()}
        dense = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
                 and f.attrs and str(f.attrs.get("ptq.kernel", "")) == "dense"]
        assert len(dense) == 1, names
        assert any(p.name == "params" for p in dense[0].params) == fused, target
        assert any(n.startswith("token_epilogue") for n in names) != fused, (target, names)


def test_reference_matches_the_float_formula():
    """The reference op against the plain float computation it stands for: within the
    rounding of ``float32(raw)`` and of the per-row scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 96, generator=g) * 3
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    ws = torch.rand(40, generator=g) * 0.02 + 0.001
    y = P.linear_dynamic(x, w, ws)
    xq = P.fake_quantize_per_token(x)
    want = xq.double() @ (w.double() * ws.double()[:, None]).T
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # per-token uint8: each row's error is at most half its own step
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    assert ((xq - x).abs() <= step / 2 * 1.001 + 1e-7).all()


def test_cuda_builds_the_per_token_kernels(tvm_backend):
    """No GPU here: the CUDA family is built (TVM's dlight rules schedule the glue), not run."""
    import re

    gm = _graph(64, 48, seed=5)
    x = _rows(64, (2, 8), 64)
    src = tvm_backend.compile(gm, "cuda-sm80", example_inputs=(x,),
                              dynamic_batch=False).source("cuda")
    kernels = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", src)
    for name in ("token_params", "token_quantize", "ptq_dense", "token_epilogue"):
        assert any(k.startswith(name) for k in kernels), (name, kernels)
