"""Relax emission of each ``torch.ops.ptq`` operator (one function per op).

Every function takes the :class:`~ptqpasses_backends.tvm.emit.Emitter` and the op's arguments
bound by
name (``args``), and returns the Relax expression of the result.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx
from tvm import relax, te, tirx

from ptqpasses_backends.tvm import packing
from ptqpasses_backends.tvm.fxgraph import bind_args, value_range
from ptqpasses_backends.tvm.kernels import conv2d as conv_k
from ptqpasses_backends.tvm.kernels import dense as dense_k
from ptqpasses_backends.tvm.kernels import matmul as matmul_k
from ptqpasses_backends.tvm.kernels import pool as pool_k
from ptqpasses_backends.tvm.kernels import token as token_k
from ptqpasses_backends.tvm.kernels import wide as wide_k
from ptqpasses_backends.tvm.requant import (centered_relax, dequantize_relax, quantize_relax,
                                  requant_relax)
from ptqpasses_backends.tvm.strategy import KernelFacts

_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves ptq kernels alone.


def dtype_name(dtype) -> str:
    """``torch.int8`` / relax dtype -> ``"int8"``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return str(dtype)


def _kernel(em, func, *args, kind: str, variant: str = "", **kwargs):
    attrs = {"ptq.kernel": kind, "op_pattern": _OPAQUE}
    if variant:
        attrs["ptq.variant"] = variant
    if em.out_nhwc:
        attrs["ptq.layout"] = "NHWC"
    return em.bb.emit_te(func, *args, primfunc_name_hint=f"ptq_{kind}", primfunc_attrs=attrs,
                         **kwargs)


def _requant_args(a) -> dict:
    return dict(out_zp=int(a["out_zp"]), qmin=int(a["qmin"]), qmax=int(a["qmax"]),
                out_dtype=dtype_name(a["out_dtype"]))


def _per_channel(values, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size not in (1, n):
        raise ValueError(f"{v.size} multipliers for {n} output channels")
    return np.broadcast_to(v, (n,)).copy()


_EIGHT_BIT = ("int8", "uint8")


def _dt(value) -> str:
    """The dtype name of a Relax tensor value."""
    return dtype_name(value.ty.dtype)


def _static(dim):
    """A shape dim as an int, or None when symbolic."""
    try:
        return int(dim)
    except TypeError:
        return None


def _sum_dtype(bound, *dtypes: str) -> str:
    """Accumulator dtype of an exact integer sum whose partial sums are at most ``bound`` (None:
    unknown, e.g. a symbolic reduction length): int32 when it provably fits, and for 8-bit
    operands (the int8 kernels' int32 contract), else int64 (the reference's exact sum)."""
    if bound is None:
        return "int32" if all(d in _EIGHT_BIT for d in dtypes) else "int64"
    return wide_k.accumulator_dtype(bound)


def quantize(em, a):
    build = em.quantize_epilogues.get(a["x"])
    node = bind_args(em.node)["x"]
    if (build is not None and isinstance(node, fx.Node) and len(node.users) == 1
            and dtype_name(a["dtype"]) in _EIGHT_BIT):
        em.fused.append(em.node.name)  # stored quantized by its producer's kernel
        return build(scale=float(a["scale"]), zero_point=int(a["zero_point"]),
                     qmin=int(a["qmin"]), qmax=int(a["qmax"]), dtype=dtype_name(a["dtype"]))
    return quantize_relax(em.bb, a["x"], float(a["scale"]), int(a["zero_point"]),
                          int(a["qmin"]), int(a["qmax"]), dtype_name(a["dtype"]))


def dequantize(em, a):
    return dequantize_relax(em.bb, a["q"], float(a["scale"]), int(a["zero_point"]))


def dequantize_per_channel(em, a):
    q = a["q"]
    ndim = q.ty.ndim
    axis = int(a["axis"]) % ndim
    shape = [1] * ndim
    shape[axis] = -1
    s = em.numpy(a["scales"]).astype(np.float32).reshape(shape)
    z = em.numpy(a["zero_points"]).astype(np.int32).reshape(shape)
    return dequantize_relax(em.bb, q, relax.const(s), relax.const(z))


def requantize(em, a):
    r = _requant_args(a)
    acc = centered_relax(em.bb, a["x"], int(a["x_zp"]))
    return requant_relax(em.bb, acc, float(a["multiplier"]), r["out_zp"], r["qmin"], r["qmax"],
                         r["out_dtype"])


def clamp(em, a):
    x = a["x"]
    dt = dtype_name(x.ty.dtype)
    lo = relax.const(np.array(a["qmin"], dtype=dt))
    hi = relax.const(np.array(a["qmax"], dtype=dt))
    return em.bb.emit(relax.op.minimum(relax.op.maximum(x, lo), hi))


def _packed_choice(em, a, kind: str, in_dt: str, pack, bounds=None, **shape) -> tuple:
    """``(choice, encode shift)`` of a packed dense / conv kernel, as the
    target's strategy chooses (``Strategy.choose``, e.g. x86 AVX2's pairwise variant where its
    proof holds) from the node's facts: the activations' range ``[lo, hi]`` as the graph
    guarantees it (``fxgraph.value_range``; the zero point, which pads convs, included) and
    the GEMM's shape; ``bounds`` gives the range where the node's own ``x`` does not (the
    per-token codes of ``linear_dynamic``: [0, 255]). The choice and its reason are recorded
    in ``em.variants`` (``compile`` reports them)."""
    lo, hi = bounds or value_range(bind_args(em.node)["x"]) or _dtype_bounds(in_dt)
    x_zp = int(a["x_zp"])
    facts = KernelFacts(kind, em.node.name, in_dt, (min(lo, x_zp), max(hi, x_zp)), pack=pack,
                        **shape)
    choice = em.strategy.choose(em.strategy, facts)
    if choice.why:
        em.variants[em.node.name] = (choice.variant.name or "main", choice.why)
    layout = choice.variant.layout
    shift = choice.shift
    if shift is None:
        shift = 0 if in_dt == "int16" else packing.encode_shift(in_dt, layout.act_dtype)
    return choice, shift


def _packed_kernel(em, kind: str, choice, compute, x, w, pack, corr, mult, **params):
    """The kernel of a packed dense / conv: the variant's own builder (``Variant.kernels``,
    given the unpacked weights: it packs them for its plan), else the TE ``compute`` on the
    weights packed in the variant's layout."""
    variant = choice.variant
    if kind in variant.kernels:
        return variant.kernels[kind](em, x, w, corr, mult, variant=variant.name, **params)
    layout = variant.layout
    wp = pack(layout.lanes, layout.depth, layout.k_block)
    return _kernel(em, compute, x, relax.const(wp), relax.const(corr), relax.const(mult),
                   kind=kind, variant=variant.name, **params)


def _dtype_bounds(dt: str) -> tuple[int, int]:
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def linear(em, a):
    x = a["x"]
    w = em.numpy(a["weight"]).astype(np.int8)
    in_dt = dtype_name(x.ty.dtype)
    bias = None if a["bias"] is None else em.numpy(a["bias"])
    if in_dt not in _EIGHT_BIT and not _wide_fits_packed(em, a, w, bias, in_dt):
        return _linear_wide(em, a, w)
    return _linear_packed(em, a, x, w, bias, in_dt)


def _linear_packed(em, a, x, w: np.ndarray, bias, in_dt: str, bounds=None, per_token=None):
    """The packed 8-bit dense the target's strategy picks (``a``: the requantization and
    ``x_zp`` arguments; ``bounds``: the activations' range where the node's own ``x`` does
    not say it). ``per_token``: ``(params, colsum, w_scale)`` of ``linear_dynamic``; then the
    result is ``(value, fused)``: the ``dense_per_token`` kernel's float output (epilogue
    included, ``fused`` True) where the chosen variant has one, else the plain dense."""
    n_out, k_in = w.shape
    rows = 1
    for d in x.ty.shape.values[:-1]:
        rows = None if rows is None or _static(d) is None else rows * _static(d)

    def pack(lanes, depth, k_block):
        return packing.pack_dense(w, lanes, depth, k_block)

    choice, shift = _packed_choice(em, a, "dense", in_dt, pack, bounds, rows=rows, cols=n_out,
                                   depth=k_in)
    corr = packing.correction(w, bias, int(a["x_zp"]) + shift)
    build = None if per_token is None else choice.variant.kernels.get("dense_per_token")
    if build is not None:
        params, colsum, ws = per_token
        return build(em, x, w, corr, ws, variant=choice.variant.name, n_out=n_out,
                     k_in=k_in, shift=shift, act_dtype=choice.variant.layout.act_dtype,
                     per_token=(params, colsum), **_requant_args(a)), True
    mult = _per_channel(em.numpy(a["multiplier"]), n_out)
    y = _packed_kernel(em, "dense", choice, dense_k.dense, x, w, pack, corr, mult,
                       n_out=n_out, k_in=k_in, shift=shift,
                       act_dtype=choice.variant.layout.act_dtype, **_requant_args(a))
    return y if per_token is None else (y, False)


def _token_quantized(em, x):
    """``(q, p)``: ``x`` quantized per token (uint8) and its per-row ``[..., 3]`` scale /
    inverse / zero point; computed once per tensor (a transformer's Q, K and V projections
    read one): by the strategy's one-pass kernel (CPU), else the two TE glue kernels."""
    cache = em.per_token
    if x not in cache:
        f = x if _dt(x) == "float32" else em.bb.emit(relax.op.astype(x, "float32"))
        build = em.strategy.kernel("token_quantize")
        if build is not None:
            cache[x] = build(em, f)
            return cache[x]
        p = em.bb.emit_te(token_k.token_params, f, primfunc_name_hint="token_params")
        q = em.bb.emit_te(token_k.token_quantize, f, p, primfunc_name_hint="token_quantize")
        cache[x] = (q, p)
    return cache[x]


def fake_quantize_per_token(em, a):
    q, p = _token_quantized(em, a["x"])
    return em.bb.emit_te(token_k.token_dequantize, q, p, primfunc_name_hint="token_dequantize")


def linear_dynamic(em, a):
    """Per-token uint8 activations (``_token_quantized``), the target's packed dense on them
    with a float32 output and multiplier 1 (``float32`` of the exact sum), then the per-row
    zero-point correction and scales: in the dense's own epilogue where its variant has a
    ``dense_per_token`` kernel (AMX), else ``token_epilogue``, kept out of fusion: its last
    multiply must reach memory before the graph's float bias add, or LLVM would contract
    the two into an FMA."""
    q, p = _token_quantized(em, a["x"])
    w = em.numpy(a["weight"]).astype(np.int8)
    n_out = w.shape[0]
    ones = np.ones(n_out, np.float32)
    colsum = w.astype(np.int32).sum(1).astype(np.int32)
    ws = em.numpy(a["w_scale"]).astype(np.float32).reshape(n_out)
    spec = dict(x_zp=0, multiplier=ones, out_zp=0, qmin=0, qmax=0, out_dtype="float32")
    raw, fused = _linear_packed(em, spec, q, w, None, "uint8", bounds=(0, 255),
                                per_token=(p, colsum, ws))
    if fused:  # the variant's kernel took the epilogue (AMX)
        return raw
    return em.bb.emit_te(token_k.token_epilogue, raw, p, relax.const(colsum),
                         relax.const(ws), primfunc_name_hint="token_epilogue",
                         primfunc_attrs={"op_pattern": _OPAQUE})


def conv2d(em, a):
    x = a["x"]
    w = em.numpy(a["weight"]).astype(np.int8)
    c_out, cg, kh, kw = w.shape
    groups = int(a["groups"])
    in_dt = dtype_name(x.ty.dtype)
    bias = None if a["bias"] is None else em.numpy(a["bias"])
    depthwise = cg == 1 and groups > 1
    if in_dt not in _EIGHT_BIT and not _wide_fits_packed(em, a, w, bias, in_dt, depthwise):
        return _conv2d_wide(em, a, w)
    mult = _per_channel(em.numpy(a["multiplier"]), c_out)
    geo = dict(kernel=(kh, kw), stride=_pair(a["stride"]), padding=_pair(a["padding"]),
               dilation=_pair(a["dilation"]))
    layouts = dict(in_layout=em.arg_layouts.get("x", "NCHW"),
                   out_layout="NHWC" if em.out_nhwc else "NCHW")
    if depthwise:
        own = em.strategy.kernel("conv2d_depthwise")
        if own is not None and em.out_nhwc and layouts["in_layout"] == "NHWC":
            y = own(em, x, w, bias, mult, x_zp=int(a["x_zp"]), **geo, **_requant_args(a))
            if y is not None:
                return y
        corr = packing.correction(w, bias, int(a["x_zp"]))
        if em.out_nhwc:  # channel-contiguous: weights [R, S, O]
            return _kernel(em, conv_k.conv2d_depthwise_nhwc, x,
                           relax.const(np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))),
                           relax.const(corr), relax.const(mult), kind="conv2d_depthwise",
                           groups=groups, c_out=c_out, x_zp=int(a["x_zp"]), **layouts, **geo,
                           **_requant_args(a))
        return _kernel(em, conv_k.conv2d_depthwise, x, relax.const(w), relax.const(corr),
                       relax.const(mult), kind="conv2d_depthwise", groups=groups, c_out=c_out,
                       x_zp=int(a["x_zp"]), **geo, **_requant_args(a))
    _, _, h, w_in = (_static(d) for d in conv_k.nhwc_shape(list(x.ty.shape.values),
                                                             layouts["in_layout"]))
    oh = conv_k.out_size(h, kh, geo["stride"][0], geo["padding"][0], geo["dilation"][0])
    ow = conv_k.out_size(w_in, kw, geo["stride"][1], geo["padding"][1], geo["dilation"][1])
    def pack(lanes, depth, k_block):
        return packing.pack_conv(w, groups, lanes, depth, k_block)

    choice, shift = _packed_choice(em, a, "conv2d", in_dt, pack, rows=oh * ow, cols=c_out,
                                   depth=cg * kh * kw, width=ow, channels=cg, groups=groups)
    zp_enc = int(a["x_zp"]) + shift
    corr = packing.correction(w, bias, zp_enc)
    params = dict(groups=groups, c_in=cg * groups, c_out=c_out, shift=shift, zp_enc=zp_enc,
                  act_dtype=choice.variant.layout.act_dtype, **layouts, **geo,
                  **_requant_args(a))
    if "conv2d" not in choice.variant.kernels:
        params["width_block"] = choice.width_block or choice.variant.layout.width_block
    return _packed_kernel(em, "conv2d", choice, conv_k.conv2d_packed, x, w, pack, corr, mult,
                          **params)


def _wide_fits_packed(em, a, w, bias, in_dt: str, depthwise: bool = False) -> bool:
    """Whether an int16-activation linear / conv can run on the 8-bit kernels' int32 code:
    the packed ``dense`` / ``conv2d`` of a family whose activations are int16 already (x86
    AVX2: ``vpmaddwd`` of int16 pairs, exact in int32), or the depthwise compute (int32 on any
    family). Those kernels sum raw activations ``x`` times the weights in int32 and add the
    correction ``bias - x_zp * sum(w)`` after, so the proof is: ``max|x| * sum|w| +
    max|correction| < 2**31`` per output channel, with ``x``'s range from the graph
    (``fxgraph.value_range``) or its dtype. Otherwise the direct ``*_wide`` computes (int64
    where needed). The choice and its reason are recorded in ``em.variants``."""
    if in_dt != "int16":
        return False
    act_dtype = em.strategy.main.layout.act_dtype
    if not depthwise and not any(v.layout.act_dtype == "int16" for v in em.strategy.variants):
        em.variants[em.node.name] = ("wide", f"int16 activations: the {em.strategy.name} "
                                     f"packed kernels take {act_dtype} activations")
        return False
    lo, hi = value_range(bind_args(em.node)["x"]) or _dtype_bounds(in_dt)
    x_zp = int(a["x_zp"])
    lo, hi = min(lo, x_zp), max(hi, x_zp)  # the zero point pads convs
    raw = wide_k.weighted_bound(max(abs(lo), abs(hi)), w, None)
    try:
        corr = packing.correction(w, bias, x_zp)
    except OverflowError:
        corr = None
    where = "depthwise int32" if depthwise else f"{em.strategy.arch} packed int16"
    if corr is None or raw + int(np.abs(corr.astype(np.int64)).max(initial=0)) >= 2**31:
        em.variants[em.node.name] = ("wide", f"int16 activations in [{lo}, {hi}]: the raw "
                                     f"sums can overflow int32 ({where} needs them to fit)")
        return False
    em.variants[em.node.name] = (where.replace(" ", "-"), f"int16 activations in [{lo}, {hi}]:"
                                 f" raw sums within {raw} fit int32")
    return True


def _wide_operands(em, a, w):
    """(bias const or None, multipliers, acc dtype) of an int16-activation linear/conv."""
    x_zp = int(a["x_zp"])
    bias = None if a["bias"] is None else em.numpy(a["bias"]).astype(np.int64)
    bound = wide_k.weighted_bound(wide_k.max_centered(_dt(a["x"]), x_zp), w, bias)
    acc_dtype = wide_k.accumulator_dtype(bound)
    bias_c = None if bias is None else relax.const(bias.astype(acc_dtype))
    return bias_c, relax.const(_per_channel(em.numpy(a["multiplier"]), w.shape[0])), acc_dtype


def _linear_wide(em, a, w):
    """An int16-activation linear: direct reduction (``kernels/wide.py``), no 8-bit packing."""
    bias, mult, acc_dtype = _wide_operands(em, a, w)
    args = [a["x"], relax.const(w)] + ([bias] if bias is not None else []) + [mult]
    return _kernel(em, _bias_slot(wide_k.dense_wide, bias is not None), *args,
                   kind="dense_wide", x_zp=int(a["x_zp"]), acc_dtype=acc_dtype,
                   **_requant_args(a))


def _conv2d_wide(em, a, w):
    """An int16-activation conv (any groups): direct NCHW reduction on OIHW weights."""
    bias, mult, acc_dtype = _wide_operands(em, a, w)
    args = [a["x"], relax.const(w)] + ([bias] if bias is not None else []) + [mult]
    return _kernel(em, _bias_slot(wide_k.conv2d_wide, bias is not None), *args,
                   kind="conv2d_wide", groups=int(a["groups"]), stride=_pair(a["stride"]),
                   padding=_pair(a["padding"]), dilation=_pair(a["dilation"]),
                   x_zp=int(a["x_zp"]), acc_dtype=acc_dtype, **_requant_args(a))


def _bias_slot(compute, has_bias: bool):
    """``compute(x, w, bias, mult, ...)`` taking ``(x, w, mult, ...)`` when there is no bias
    (``emit_te`` wants tensors for positional arguments)."""
    if has_bias:
        return compute

    def no_bias(x, w, mult, **kwargs):
        return compute(x, w, None, mult, **kwargs)

    return no_bias


def _pair(v) -> tuple:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def matmul(em, a):
    x, y = a["a"], a["b"]
    squeeze = []
    if x.ty.ndim == 1:
        x, squeeze = em.bb.emit(relax.op.expand_dims(x, 0)), squeeze + [-2]
    if y.ty.ndim == 1:
        y, squeeze = em.bb.emit(relax.op.expand_dims(y, 1)), squeeze + [-1]
    a_zp, b_zp = int(a["a_zp"]), int(a["b_zp"])
    k_dim = _static(x.ty.shape[-1]) if x.ty.shape is not None else None
    bound = None if k_dim is None else (k_dim * wide_k.max_centered(_dt(x), a_zp)
                                        * wide_k.max_centered(_dt(y), b_zp))
    acc_dtype = _sum_dtype(bound, _dt(x), _dt(y))
    block = em.strategy.matmul_block
    own = None
    build = em.strategy.kernel("matmul")
    if build is not None and not squeeze:
        own = build(em, x, y, a_zp=a_zp, b_zp=b_zp, multiplier=float(a["multiplier"]),
                    **_requant_args(a))
    if own is not None:
        out, variant, why = own
        em.variants[em.node.name] = (variant, why)
    elif (block is not None and _dt(x) in _EIGHT_BIT and _dt(y) in _EIGHT_BIT
            and k_dim is not None and _static(y.ty.shape[-1]) is not None):
        out = _kernel(em, matmul_k.matmul_packed, x, y, kind="matmul", a_zp=a_zp, b_zp=b_zp,
                      multiplier=float(a["multiplier"]), lanes=block[0], depth=block[1],
                      **_requant_args(a))
    else:
        out = _kernel(em, matmul_k.matmul, x, y, kind="matmul", a_zp=a_zp, b_zp=b_zp,
                      multiplier=float(a["multiplier"]), acc_dtype=acc_dtype,
                      **_requant_args(a))
    if squeeze:
        out = em.bb.emit(relax.op.squeeze(out, squeeze))
    return out


def add(em, a):
    fused = _add_in_epilogue(em, a)
    if fused is not None:
        return fused
    r = _requant_args(a)
    a_zp, b_zp, ka, kb = int(a["a_zp"]), int(a["b_zp"]), int(a["a_mult"]), int(a["b_mult"])
    dt = _sum_dtype(abs(ka) * wide_k.max_centered(_dt(a["a"]), a_zp)
                    + abs(kb) * wide_k.max_centered(_dt(a["b"]), b_zp))
    xa = centered_relax(em.bb, a["a"], a_zp, dt)
    xb = centered_relax(em.bb, a["b"], b_zp, dt)
    xa = em.bb.emit(relax.op.multiply(xa, relax.const(np.array(ka, dt))))
    xb = em.bb.emit(relax.op.multiply(xb, relax.const(np.array(kb, dt))))
    acc = em.bb.emit(relax.op.add(xa, xb))
    return requant_relax(em.bb, acc, float(a["multiplier"]), r["out_zp"], r["qmin"], r["qmax"],
                         r["out_dtype"])


def _same_shape(em, x, y) -> bool:
    """Whether two Relax tensors have the same shape (static dims, or provably equal
    symbolic ones such as the batch)."""
    sx, sy = x.ty.shape, y.ty.shape
    if sx is None or sy is None or len(sx.values) != len(sy.values):
        return False
    return all(em.analyzer.can_prove_equal(dx, dy) for dx, dy in zip(sx.values, sy.values))


def _add_in_epilogue(em, a):
    """The add folded into the kernel that produces one of its operands (the AMX conv of a
    residual block), where that kernel offers it (``em.epilogue_fusions``), the add is that
    operand's only consumer, both operands are 8-bit tensors of the same shape and layout,
    and the add's output is 8-bit. None: emit the add on its own."""
    nodes = bind_args(em.node)
    if not em.out_nhwc or dtype_name(a["out_dtype"]) not in _EIGHT_BIT:
        return None
    for mine, other in (("a", "b"), ("b", "a")):
        build = em.epilogue_fusions.get(a[mine])
        node = nodes[mine]
        if (build is None or not isinstance(node, fx.Node) or len(node.users) != 1
                or em.arg_layouts.get(mine) != "NHWC" or em.arg_layouts.get(other) != "NHWC"
                or _dt(a[other]) not in _EIGHT_BIT
                or not _same_shape(em, a[mine], a[other])):
            continue
        spec = dict(a_zp=int(a[f"{mine}_zp"]), a_mult=int(a[f"{mine}_mult"]),
                    b_zp=int(a[f"{other}_zp"]), b_mult=int(a[f"{other}_mult"]),
                    multiplier=float(a["multiplier"]), **_requant_args(a))
        if (abs(spec["a_mult"]) + abs(spec["b_mult"])) * 255 >= 2**31:
            continue  # (the integer sum must be exact in int32)
        em.fused.append(em.node.name)
        if node.name in em.variants:
            variant, why = em.variants[node.name]
            em.variants[node.name] = (variant, f"{why}; add {em.node.name!r} in its epilogue")
        return build(spec, a[other], _dt(a[other]))
    return None


def mul(em, a):
    r = _requant_args(a)
    a_zp, b_zp = int(a["a_zp"]), int(a["b_zp"])
    dt = _sum_dtype(wide_k.max_centered(_dt(a["a"]), a_zp)
                    * wide_k.max_centered(_dt(a["b"]), b_zp))
    acc = em.bb.emit(relax.op.multiply(centered_relax(em.bb, a["a"], a_zp, dt),
                                       centered_relax(em.bb, a["b"], b_zp, dt)))
    return requant_relax(em.bb, acc, float(a["multiplier"]), r["out_zp"], r["qmin"], r["qmax"],
                         r["out_dtype"])


def cat(em, a):
    r = _requant_args(a)
    parts = [requant_relax(em.bb, centered_relax(em.bb, x, int(z)), float(m), r["out_zp"],
                           r["qmin"], r["qmax"], r["out_dtype"])
             for x, z, m in zip(a["xs"], a["zps"], a["multipliers"])]
    axis = _NHWC_AXIS[int(a["dim"]) % 4] if em.out_nhwc else int(a["dim"])
    return em.bb.emit(relax.op.concat(parts, axis=axis))


def max_pool2d(em, a):
    dil = a["dilation"] if a["dilation"] else [1, 1]
    stride = a["stride"] if a["stride"] else a["kernel_size"]
    return _kernel(em, pool_k.max_pool2d, a["x"], kind="max_pool2d",
                   kernel=_pair(a["kernel_size"]), stride=_pair(stride),
                   padding=_pair(a["padding"]), dilation=_pair(dil),
                   ceil_mode=bool(a["ceil_mode"]), layout=_layout(em))


def avg_pool2d(em, a):
    stride = a["stride"] if a["stride"] else a["kernel_size"]
    kernel = _pair(a["kernel_size"])
    dt = _sum_dtype(kernel[0] * kernel[1] * wide_k.max_centered(_dt(a["x"]), int(a["x_zp"])))
    return _kernel(em, pool_k.avg_pool2d, a["x"], kind="avg_pool2d", kernel=kernel,
                   stride=_pair(stride), padding=_pair(a["padding"]), x_zp=int(a["x_zp"]),
                   multiplier=float(a["multiplier"]), acc_dtype=dt, layout=_layout(em),
                   **_requant_args(a))


def mean(em, a):
    r = _requant_args(a)
    x, x_zp = a["x"], int(a["x_zp"])
    dims = [int(d) % x.ty.ndim for d in a["dims"]]
    if em.out_nhwc:  # the spatial dims of an NHWC value; a kept-dims result stays NHWC
        dims = [_NHWC_AXIS[d] for d in dims]
        em.out_nhwc = bool(a["keepdim"])
    count = 1
    for d in dims:
        n = _static(x.ty.shape[d]) if x.ty.shape is not None else None
        count = None if n is None or count is None else count * n
    bound = None if count is None else count * wide_k.max_centered(_dt(x), x_zp)
    x = centered_relax(em.bb, x, x_zp, _sum_dtype(bound, _dt(x)))
    acc = em.bb.emit(relax.op.sum(x, axis=dims, keepdims=bool(a["keepdim"])))
    return requant_relax(em.bb, acc, float(a["multiplier"]), r["out_zp"], r["qmin"], r["qmax"],
                         r["out_dtype"])


def lut(em, a):
    """``table[x - x_min]`` (index clipped to the table) as one gather kernel: the index is
    computed in the gather, not written out as an int32 tensor first (``take`` after a
    ``subtract``: two kernels, MiniLM's GELU 0.6 ms)."""
    table = em.numpy(a["table"])
    x_min, last = int(a["x_min"]), int(table.shape[0]) - 1

    def gather(x, t):
        def at(*i):
            k = x[i].astype("int32") - tirx.const(x_min, "int32")
            return t[tirx.max(tirx.min(k, tirx.const(last, "int32")), tirx.const(0, "int32"))]
        return te.compute(x.shape, at, name="lut")

    return em.bb.emit_te(gather, a["x"], relax.const(table), primfunc_name_hint="lut")


#: ``torch.ops.ptq`` op name -> emission function.
HANDLERS = {f.__name__: f for f in (
    quantize, dequantize, dequantize_per_channel, requantize, clamp, linear, conv2d, matmul,
    add, mul, cat, max_pool2d, avg_pool2d, mean, lut, fake_quantize_per_token, linear_dynamic)}


# -- layouts ---------------------------------------------------------------------------
#: NCHW axis -> the same axis of the NHWC value.
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def _layout(em) -> str:
    return "NHWC" if em.out_nhwc else "NCHW"


def _eight_bit(em, node) -> bool:
    value = em.env.get(node, em.nhwc_env.get(node)) if isinstance(node, fx.Node) else None
    return value is not None and _dt(value) in _EIGHT_BIT


def _conv_layout(em, a):
    """8-bit packed convs take their input in either layout (``x_enc`` re-encodes it) and
    write NHWC; 8-bit depthwise convs run channel-contiguous when their input is NHWC already
    (else the planar NCHW compute); int16 convs stay NCHW (their ``*_wide`` computes are
    planar)."""
    if not _eight_bit(em, a["x"]):
        return None
    groups = int(a["groups"])
    if groups > 1 and tuple(em.numpy(a["weight"]).shape)[1] == 1:  # depthwise
        return {"x": "NHWC"} if em.is_nhwc(a["x"]) else None
    return {"x": "ANY"}


def _if_nhwc(*names):
    """Emit channel-last when any 4-D input is channel-last already (all inputs 4-D: a lower
    rank would broadcast along other axes in NHWC)."""

    def rule(em, a):
        nodes = [a[n] for n in names]
        if all(em.ndim(v) == 4 for v in nodes) and any(em.is_nhwc(v) for v in nodes):
            return {n: "NHWC" for n in names}
        return None

    return rule


def _mean_layout(em, a):
    x = a["x"]
    if em.is_nhwc(x) and {int(d) % 4 for d in a["dims"]} <= {2, 3}:
        return {"x": "NHWC"}
    return None


def _cat_layout(em, a):
    xs = list(a["xs"])
    if (int(a["dim"]) % 4 == 1 and all(em.ndim(v) == 4 for v in xs)
            and any(em.is_nhwc(v) for v in xs)):
        return {"xs": "NHWC"}
    return None


def _quantize_layout(em, a):
    """Quantize a 4-D float value channel-last where it exists channel-last (a float op
    emitted channel-last, ``Emitter._emit_float_nhwc``)."""
    x = a["x"]
    return {"x": "NHWC"} if em.ndim(x) == 4 and em.is_nhwc(x) else None


def _dequantize_layout(em, a):
    """Dequantize a channel-last 4-D value channel-last where every user takes the float
    result channel-last (``Emitter.takes_nhwc_float``); otherwise the 8-bit value is
    transposed (a quarter of the float's bytes)."""
    q = a["q"]
    if (em.ndim(q) == 4 and em.is_nhwc(q) and em.node.users
            and all(em.takes_nhwc_float(u) for u in em.node.users)):
        return {"q": "NHWC"}
    return None


#: ptq op -> ``(emitter, bound args) -> {arg: "NHWC" | "ANY"}`` when the op is emitted
#: channel-last (its result NHWC), or None. Ops not listed (linear, matmul, per-channel
#: dequantize) take and give the graph's layout; the emitter transposes at the boundary, once.
LAYOUTS = {
    "conv2d": _conv_layout,
    "quantize": _quantize_layout,
    "dequantize": _dequantize_layout,
    "max_pool2d": _if_nhwc("x"),
    "avg_pool2d": _if_nhwc("x"),
    "requantize": _if_nhwc("x"),
    "clamp": _if_nhwc("x"),
    "lut": _if_nhwc("x"),
    "add": _if_nhwc("a", "b"),
    "mul": _if_nhwc("a", "b"),
    "mean": _mean_layout,
    "cat": _cat_layout,
}
