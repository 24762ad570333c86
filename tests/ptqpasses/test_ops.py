"""The reference integer kernels: semantics spelled out in docs/integer_ops.md."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ptqpasses  # noqa: F401

ptq = torch.ops.ptq


def test_quantize_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0])
    q = ptq.quantize(x, 1.0, 0, -128, 127, torch.int8)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert q.dtype == torch.int8


def test_dequantize_inverts_quantize_on_grid():
    q = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8)
    x = ptq.dequantize(q, 0.1, 128)
    assert torch.equal(ptq.quantize(x, 0.1, 128, 0, 255, torch.uint8), q)


def test_requantize_is_one_float32_multiply():
    x = torch.tensor([0, 10, 200, 255], dtype=torch.uint8)
    y = ptq.requantize(x, 10, 0.5, 3, 0, 255, torch.uint8)
    expected = torch.round((x.int() - 10).float() * torch.tensor(0.5)) + 3
    assert torch.equal(y, expected.clamp(0, 255).to(torch.uint8))


def test_conv2d_pads_with_input_zero_point():
    x = torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8)
    w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    m = torch.full((4,), 1e-3)
    y = ptq.conv2d(x, 100, w, None, [1, 1], [1, 1], [1, 1], 1, m, 0, -128, 127, torch.int8)
    # explicit padding with the zero point, then an unpadded conv, gives the same result
    padded = F.pad(x.int(), (1, 1, 1, 1), value=100).to(torch.uint8)
    y2 = ptq.conv2d(padded, 100, w, None, [1, 1], [0, 0], [1, 1], 1, m, 0, -128, 127, torch.int8)
    assert torch.equal(y, y2)


def test_conv2d_matches_int64_reference():
    x = torch.randint(0, 256, (2, 4, 6, 6), dtype=torch.uint8)
    w = torch.randint(-127, 128, (6, 2, 3, 3), dtype=torch.int8)
    b = torch.randint(-1000, 1000, (6,), dtype=torch.int32)
    m = torch.rand(6) * 1e-3
    y = ptq.conv2d(x, 7, w, b, [2, 1], [1, 0], [1, 1], 2, m, 5, 0, 255, torch.uint8)
    # independent reference: unfold + integer matmul per group
    xc = F.pad(x.long() - 7, (0, 0, 1, 1))
    cols = F.unfold(xc.double(), 3, stride=(2, 1)).long()  # [N, C*9, L]
    acc = []
    for g in range(2):
        wg = w[g * 3:(g + 1) * 3].long().reshape(3, -1)
        acc.append(torch.einsum("ok,nkl->nol", wg, cols[:, g * 18:(g + 1) * 18]))
    acc = torch.cat(acc, 1) + b.long()[None, :, None]
    ref = (torch.round(acc.int().float() * m[None, :, None]) + 5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(y.reshape(2, 6, -1), ref)


def test_add_uses_integer_common_scale():
    a = torch.tensor([0, 100, 255], dtype=torch.uint8)
    b = torch.tensor([255, 3, 0], dtype=torch.uint8)
    y = ptq.add(a, 10, 16384, b, 20, 8192, 1e-4, 7, 0, 255, torch.uint8)
    acc = (a.int() - 10) * 16384 + (b.int() - 20) * 8192
    assert torch.equal(y, (torch.round(acc.float() * torch.tensor(1e-4)) + 7).clamp(0, 255).to(torch.uint8))


def test_max_pool_and_mean_and_cat():
    x = torch.randint(-128, 128, (1, 2, 4, 4), dtype=torch.int8)
    y = ptq.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert torch.equal(y, F.max_pool2d(x.float(), 2).to(torch.int8))
    m = ptq.mean(x, -3, [-2, -1], True, 1.0 / 16, 0, -128, 127, torch.int8)
    ref = torch.round((x.int() + 3).sum((-2, -1), keepdim=True).float() * torch.tensor(1.0 / 16))
    assert torch.equal(m, ref.clamp(-128, 127).to(torch.int8))
    c = ptq.cat([x, x], [0, 0], [1.0, 0.5], 1, 0, -128, 127, torch.int8)
    assert c.shape == (1, 4, 4, 4) and torch.equal(c[:, :2], x)


def _qdq_conv(x, xs, xz, w, ws, b, stride, pad, groups, os_, oz):
    """The QDQ simulation of one conv: dequantize, float conv, quantize."""
    xf = ptq.dequantize(x, xs, xz)
    wf = ptq.dequantize_per_channel(w, ws, torch.zeros(len(ws), dtype=torch.long), 0)
    bf = ptq.dequantize_per_channel(b, (torch.tensor(xs, dtype=torch.float64) * ws.double()).float(),
                                    torch.zeros(len(ws), dtype=torch.long), 0)
    y = F.conv2d(xf, wf, bf, stride, pad, 1, groups)
    return ptq.quantize(y, os_, oz, 0, 255, torch.uint8)


@settings(max_examples=40, deadline=None)
@given(
    cin_per_group=st.integers(1, 4), cout_per_group=st.integers(1, 4), groups=st.integers(1, 3),
    k=st.sampled_from([1, 3]), stride=st.integers(1, 2), pad=st.integers(0, 1),
    hw=st.integers(3, 7), xz=st.integers(0, 255), oz=st.integers(0, 255), seed=st.integers(0, 99),
)
def test_integer_conv_matches_qdq_within_one_lsb(cin_per_group, cout_per_group, groups, k, stride,
                                                 pad, hw, xz, oz, seed):
    g = torch.Generator().manual_seed(seed)
    cin, cout = cin_per_group * groups, cout_per_group * groups
    x = torch.randint(0, 256, (2, cin, hw, hw), generator=g).to(torch.uint8)
    w = torch.randint(-127, 128, (cout, cin_per_group, k, k), generator=g).to(torch.int8)
    ws = (torch.rand(cout, generator=g) * 0.01 + 1e-3).float()
    xs, os_ = 0.02, 0.05 + float(torch.rand(1, generator=g))
    bs = (torch.tensor(xs, dtype=torch.float64) * ws.double()).float()
    b = torch.randint(-5000, 5000, (cout,), generator=g).to(torch.int32)
    qdq = _qdq_conv(x, xs, xz, w, ws, b, [stride] * 2, [pad] * 2, groups, os_, oz)
    mult = (torch.tensor(xs, dtype=torch.float64) * ws.double() / os_).float()
    out = ptq.conv2d(x, xz, w, b, [stride] * 2, [pad] * 2, [1, 1], groups, mult, oz, 0, 255,
                     torch.uint8)
    assert out.shape == qdq.shape
    assert (out.int() - qdq.int()).abs().max() <= 1
    del bs


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 9), xz=st.integers(0, 255),
       oz=st.integers(0, 255), seed=st.integers(0, 99))
def test_integer_linear_matches_qdq_within_one_lsb(m, k, n, xz, oz, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (m, k), generator=g).to(torch.uint8)
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    ws = (torch.rand(n, generator=g) * 0.01 + 1e-3).float()
    xs, os_ = 0.03, 0.02 + float(torch.rand(1, generator=g))
    zeros = torch.zeros(n, dtype=torch.long)
    xf = ptq.dequantize(x, xs, xz)
    y = F.linear(xf, ptq.dequantize_per_channel(w, ws, zeros, 0))
    qdq = ptq.quantize(y, os_, oz, 0, 255, torch.uint8)
    mult = (torch.tensor(xs, dtype=torch.float64) * ws.double() / os_).float()
    out = ptq.linear(x, xz, w, None, mult, oz, 0, 255, torch.uint8)
    assert (out.int() - qdq.int()).abs().max() <= 1
