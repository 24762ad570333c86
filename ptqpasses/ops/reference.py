"""Registration and reference kernels of the ``ptq`` integer operators.

The kernels compute integer accumulations in float64, which is exact while every partial
sum stays below 2**53 (true for int8 operands and any reduction shorter than 2**37), then
convert to int32. Requantization is done in float32 exactly as the docstring of
:func:`requantize_acc` states; backends reproduce the same float32 operations.

Accumulator width: int32 when every operand is 8-bit. When an activation operand is int16
(a per-node precision raise), the accumulator is int64: an int16 x int8 product needs 23
bits, so conv/linear reductions longer than 256 terms (and int16 x int16 matmul, add with
the 2**14 scale factors, mul) can exceed int32. The reference computes the exact sum (float64
is exact below 2**53) and converts it through int64; backends must accumulate in int64 for
int16 operands.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_NS = "ptq"


def _rne(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even


def requantize_acc(
    acc: torch.Tensor, multiplier, out_zp: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """``clamp(rne(float32(acc) * m) + out_zp, qmin, qmax)`` cast to ``dtype``.

    ``acc`` is an int32/int64 (or exactly integer float64) tensor; ``multiplier`` is a
    float32 scalar or a float32 tensor broadcastable against ``acc``. ``float32(acc)`` is
    the exact accumulator rounded to float32 (exact for |acc| < 2**24); an accumulator
    beyond int32 occurs only with int16 operands (int64 accumulation, see the module doc).

    ``dtype`` float32 is a float output (an integer op whose consumers are float): the
    dequantized accumulator ``float32(acc) * m`` with ``m = s_x * s_w``, one float32 multiply;
    ``out_zp``, ``qmin`` and ``qmax`` are unused (0).
    """
    m = torch.as_tensor(multiplier, dtype=torch.float32)
    y = acc.to(torch.int64).to(torch.float32) * m
    if dtype == torch.float32:
        return y
    return (_rne(y) + out_zp).clamp(qmin, qmax).to(dtype)


def _centered(x: torch.Tensor, zp: int) -> torch.Tensor:
    return x.to(torch.float64) - zp


def _channel_view(m: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return m.reshape(shape)


# --- quantize / dequantize / requantize ------------------------------------------------


@torch.library.custom_op(f"{_NS}::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """``clamp(rne(x / scale) + zero_point, qmin, qmax)`` in float32 (NaN reads as 0.0).

    So NaN becomes the zero point (clamped); +-inf saturate to ``qmax`` / ``qmin``."""
    s = torch.tensor(scale, dtype=torch.float32)
    x = x.to(torch.float32)
    x = torch.where(torch.isnan(x), 0.0, x)
    return (_rne(x / s) + zero_point).clamp(qmin, qmax).to(dtype)


@torch.library.custom_op(f"{_NS}::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32."""
    s = torch.tensor(scale, dtype=torch.float32)
    return (q.to(torch.int32) - zero_point).to(torch.float32) * s


@torch.library.custom_op(f"{_NS}::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(
    q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int
) -> torch.Tensor:
    """Per-channel dequantize along ``axis`` (weights and int32 bias in the QDQ form)."""
    s = _channel_view(scales.to(torch.float32), q.dim(), axis)
    z = _channel_view(zero_points.to(torch.int64), q.dim(), axis)
    return (q.to(torch.int64) - z).to(torch.float32) * s


@torch.library.custom_op(f"{_NS}::requantize", mutates_args=())
def requantize(
    x: torch.Tensor, x_zp: int, multiplier: float, out_zp: int, qmin: int, qmax: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Change scale/zero point: ``requant(x - x_zp, multiplier)``."""
    acc = x.to(torch.int32) - x_zp
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::clamp", mutates_args=())
def clamp(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer clamp (a ReLU / ReLU6 on a quantized tensor whose qparams pass through)."""
    return x.clamp(qmin, qmax)


# --- per-token (dynamic) activations ---------------------------------------------------

#: The smallest scale a per-token row gets (the smallest normal float32, 2**-126): a row of
#: zeros quantizes to zero with a finite reciprocal.
TOKEN_SCALE_MIN = 2.0 ** -126


def token_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (last axis) uint8 parameters of ``x``, in float32, as every backend computes
    them: ``lo = min(min_k x, 0)``, ``hi = max(max_k x, 0)`` (NaN read as 0),
    ``s = max(hi / 255 - lo / 255, 2**-126)``, ``inv = 1 / s``,
    ``zp = clamp(rne(-lo * inv), 0, 255)``. Returns ``(s, inv, zp)``, each ``[..., 1]``
    float32 (``zp`` holds an integer)."""
    return _row_qparams(_finite(x))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 with NaN read as 0.0."""
    return torch.where(torch.isnan(x), 0.0, x.to(torch.float32))


def _row_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_qparams` of a float32 ``x`` without NaN."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    c = torch.tensor(255.0, dtype=torch.float32)
    s = (hi / c - lo / c).clamp(min=TOKEN_SCALE_MIN)
    inv = torch.tensor(1.0, dtype=torch.float32) / s
    zp = _rne(-lo * inv).clamp(0.0, 255.0)
    return s, inv, zp


def _token_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, zp)``: ``q = clamp(rne(x * inv) + zp, 0, 255)`` per row (float32 values)."""
    x = _finite(x)
    s, inv, zp = _row_qparams(x)
    return (_rne(x * inv) + zp).clamp(0.0, 255.0), s, zp


@torch.library.custom_op(f"{_NS}::fake_quantize_per_token", mutates_args=())
def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """The QDQ simulation of a per-token activation: ``(q - zp) * s`` with ``q``, ``s``,
    ``zp`` of :func:`token_qparams` (row by row, at run time)."""
    q, s, zp = _token_quantize(x)
    return (q - zp) * s


@torch.library.custom_op(f"{_NS}::linear_dynamic", mutates_args=())
def linear_dynamic(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """A linear layer on per-token uint8 activations, float32 output (no bias: the graph adds
    it in float after the op).

    Each row of the float ``x[..., K]`` is quantized at run time (:func:`token_qparams`,
    ``q`` uint8), then ``raw[.., n] = sum_k q[.., k] * weight[n, k]`` (exact integer sum) and
    ``y = ((float32(raw) - float32(zp * colsum[n])) * s) * w_scale[n]``, with
    ``colsum[n] = sum_k weight[n, k]``: the integer parts exact, three float32 operations
    after them, none a multiply feeding an add (so no fused multiply-add changes them)."""
    q, s, zp = _token_quantize(x)
    w = weight.to(torch.float64)
    raw = (q.to(torch.float64) @ w.T).to(torch.float32)
    corr = (zp.to(torch.float64) * w.sum(1)).to(torch.float32)
    return ((raw - corr) * s) * w_scale.to(torch.float32)


# --- compute ops ------------------------------------------------------------------------


def _conv_f64(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
              groups: int) -> torch.Tensor:
    """Exact float64 conv of integer values. Grouped convs go through im2col and a batched
    matmul: torch's own float64 grouped conv is 25-240x slower than float32 (a depthwise
    3x3 over 960 channels at 2x2: 7.7 s), which made MobileNetV2's reference take minutes."""
    if groups == 1:
        return F.conv2d(x, w, None, stride, padding, dilation)
    n, _, h, wd = x.shape
    o, cg, r, s = w.shape
    cols = F.unfold(x, (r, s), dilation=dilation, padding=padding, stride=stride)
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    cols = cols.view(n, groups, cg * r * s, oh * ow)
    acc = torch.matmul(w.reshape(groups, o // groups, cg * r * s), cols)  # [n, g, og, L]
    return acc.reshape(n, o, oh, ow)


@torch.library.custom_op(f"{_NS}::conv2d", mutates_args=())
def conv2d(
    x: torch.Tensor, x_zp: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    multiplier: torch.Tensor, out_zp: int, qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """NCHW conv. Padding holds ``x_zp`` (real zero), i.e. zero after centering."""
    acc = _conv_f64(_centered(x, x_zp), weight.to(torch.float64), stride, padding, dilation,
                    groups)
    if bias is not None:
        acc = acc + _channel_view(bias.to(torch.float64), 4, 1)
    return requantize_acc(acc, _channel_view(multiplier, 4, 1), out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::linear", mutates_args=())
def linear(
    x: torch.Tensor, x_zp: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
    multiplier: torch.Tensor, out_zp: int, qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``x[..., K] @ weight[N, K].T + bias[N]``, requantized per output feature."""
    acc = _centered(x, x_zp) @ weight.to(torch.float64).T
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::matmul", mutates_args=())
def matmul(
    a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int, multiplier: float, out_zp: int,
    qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Batched ``(a - a_zp) @ (b - b_zp)`` with torch.matmul broadcasting."""
    acc = torch.matmul(_centered(a, a_zp), _centered(b, b_zp))
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::add", mutates_args=())
def add(
    a: torch.Tensor, a_zp: int, a_mult: int, b: torch.Tensor, b_zp: int, b_mult: int,
    multiplier: float, out_zp: int, qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``requant((a - a_zp) * a_mult + (b - b_zp) * b_mult, multiplier)``.

    ``a_mult``/``b_mult`` are integers (<= 2**14) that put both inputs on a common scale, so
    the sum is exact in int32 for 8-bit inputs (int64 when an input is int16) and
    requantization is a single float32 multiply.
    """
    acc = (a.to(torch.int64) - a_zp) * a_mult + (b.to(torch.int64) - b_zp) * b_mult
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::mul", mutates_args=())
def mul(
    a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int, multiplier: float, out_zp: int,
    qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Elementwise ``requant((a - a_zp) * (b - b_zp), multiplier)`` with broadcasting
    (int64 products: two int16 inputs overflow int32)."""
    acc = (a.to(torch.int64) - a_zp) * (b.to(torch.int64) - b_zp)
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::cat", mutates_args=())
def cat(
    xs: list[torch.Tensor], zps: list[int], multipliers: list[float], dim: int, out_zp: int,
    qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Requantize each input to the output qparams, then concatenate."""
    parts = [requantize_acc(x.to(torch.int32) - z, m, out_zp, qmin, qmax, out_dtype)
             for x, z, m in zip(xs, zps, multipliers)]
    return torch.cat(parts, dim)


@torch.library.custom_op(f"{_NS}::max_pool2d", mutates_args=())
def max_pool2d(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int], ceil_mode: bool,
) -> torch.Tensor:
    """Max pooling on the integer values; padding never wins (acts as -inf)."""
    y = F.max_pool2d(x.to(torch.float32), kernel_size, stride, padding, dilation, ceil_mode)
    return y.to(x.dtype)


@torch.library.custom_op(f"{_NS}::avg_pool2d", mutates_args=())
def avg_pool2d(
    x: torch.Tensor, x_zp: int, kernel_size: list[int], stride: list[int], padding: list[int],
    multiplier: float, out_zp: int, qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Window sum of ``x - x_zp`` (padding counts as zero), times ``multiplier``.

    ``multiplier`` already contains ``1 / (kh * kw)`` (count_include_pad semantics).
    """
    kh, kw = kernel_size
    acc = F.avg_pool2d(_centered(x, x_zp), kernel_size, stride, padding, False, True) * (kh * kw)
    return requantize_acc(torch.round(acc), multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::mean", mutates_args=())
def mean(
    x: torch.Tensor, x_zp: int, dims: list[int], keepdim: bool, multiplier: float, out_zp: int,
    qmin: int, qmax: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Sum of ``x - x_zp`` over ``dims``, times ``multiplier`` (which contains ``1/count``)."""
    acc = _centered(x, x_zp).sum(dim=dims, keepdim=keepdim)
    return requantize_acc(acc, multiplier, out_zp, qmin, qmax, out_dtype)


@torch.library.custom_op(f"{_NS}::lut", mutates_args=())
def lut(x: torch.Tensor, table: torch.Tensor, x_min: int) -> torch.Tensor:
    """Table lookup ``table[x - x_min]``: any elementwise function of an 8-bit input.

    The lowering fills the table by running the float function on every input value, so
    the op is exact for whatever the QDQ simulation computes (sigmoid, GELU, hardswish...).
    """
    return table[(x.to(torch.int64) - x_min)]


# --- fake (shape) kernels, so integer graphs can be traced and exported -------------------


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


@dequantize_per_channel.register_fake
def _(q, scales, zero_points, axis):
    return torch.empty_like(q, dtype=torch.float32)


@requantize.register_fake
def _(x, x_zp, multiplier, out_zp, qmin, qmax, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


@clamp.register_fake
def _(x, qmin, qmax):
    return torch.empty_like(x)


@conv2d.register_fake
def _(x, x_zp, weight, bias, stride, padding, dilation, groups, multiplier, out_zp, qmin, qmax,
      out_dtype):
    y = F.conv2d(x.to(torch.float32), weight.to(torch.float32), None, stride, padding, dilation,
                 groups)
    return y.to(out_dtype)


@linear.register_fake
def _(x, x_zp, weight, bias, multiplier, out_zp, qmin, qmax, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@matmul.register_fake
def _(a, a_zp, b, b_zp, multiplier, out_zp, qmin, qmax, out_dtype):
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(out_dtype)


@add.register_fake
def _(a, a_zp, a_mult, b, b_zp, b_mult, multiplier, out_zp, qmin, qmax, out_dtype):
    return (a.to(torch.float32) + b.to(torch.float32)).to(out_dtype)


@mul.register_fake
def _(a, a_zp, b, b_zp, multiplier, out_zp, qmin, qmax, out_dtype):
    return (a.to(torch.float32) * b.to(torch.float32)).to(out_dtype)


@cat.register_fake
def _(xs, zps, multipliers, dim, out_zp, qmin, qmax, out_dtype):
    return torch.cat([x.to(out_dtype) for x in xs], dim)


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x.to(torch.float32), kernel_size, stride, padding, dilation,
                        ceil_mode).to(x.dtype)


@avg_pool2d.register_fake
def _(x, x_zp, kernel_size, stride, padding, multiplier, out_zp, qmin, qmax, out_dtype):
    return F.avg_pool2d(x.to(torch.float32), kernel_size, stride, padding).to(out_dtype)


@mean.register_fake
def _(x, x_zp, dims, keepdim, multiplier, out_zp, qmin, qmax, out_dtype):
    return x.to(torch.float32).sum(dim=dims, keepdim=keepdim).to(out_dtype)


@lut.register_fake
def _(x, table, x_min):
    return torch.empty_like(x, dtype=table.dtype)


@fake_quantize_per_token.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float32)


@linear_dynamic.register_fake
def _(x, weight, w_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


#: Every integer operator, by short name (``torch.ops.ptq.<name>.default``).
INTEGER_OPS = {
    name: getattr(torch.ops.ptq, name).default
    for name in ("quantize", "dequantize", "dequantize_per_channel", "requantize", "clamp",
                 "conv2d", "linear", "matmul", "add", "mul", "cat", "max_pool2d",
                 "avg_pool2d", "mean", "lut", "fake_quantize_per_token", "linear_dynamic")
}
