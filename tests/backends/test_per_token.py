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
            "x86-amx": ("avx512vnni", "amx-int8", "amx-tile"), "host": ()}


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
@pytest.mark.parametrize("lead,k,n", [((2, 37), 70, 33), ((1, 5), 16, 64), ((3, 40), 384, 96)])
def test_linear_dynamic_is_exact_on_every_family(tvm_backend, target, lead, k, n):
    if not all(host_has(f) for f in FAMILIES[target]):
        pytest.skip(f"this CPU cannot run {target}")
    gm = _graph(k, n, seed=k + n)
    x = _rows(k, lead, k)
    want = gm(x)
    assert torch.isfinite(want[0][0]).all()  # the zero row's output is exactly 0
    cm = tvm_backend.compile(gm, target, example_inputs=(x,), dynamic_batch=True)
    assert_exact(cm(x), want, target)
    x2 = _rows(k + 1, (lead[0] + 1, *lead[1:]), k)  # another batch through the same module
    assert_exact(cm(x2), gm(x2), target)


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
