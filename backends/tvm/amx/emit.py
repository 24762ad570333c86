"""Relax emission of the AMX kernels (``Variant.kernels`` of the ``amx`` variant): pack the
weights for the kernel's plan, add the hand-written PrimFunc to the module, ``call_tir`` it.

The PrimFuncs are marked ``tir.is_scheduled`` (``ApplyPtqSchedules`` and tuning leave them
as they are) and carry the ``ptq.kernel`` / ``ptq.variant`` / ``ptq.layout`` attributes of
every ptq kernel.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from ptqpasses_backends.tvm.amx import kernels

_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves ptq kernels alone.

#: Kernels of fewer multiply-accumulates (per sample) run serially: with a 2-thread pool a
#: parallel launch cost more than it saved (one Emerald Rapids VM, us, parallel vs serial:
#: dense 8x768x768 10.9 vs 8.4, 1x512x1000 10.3 vs 6.6, 1x1 stride-2 conv 64@56 -> 128
#: 31 vs 23; dense 128x768x768 52 vs 91).
PARALLEL_MACS = 8_000_000


def _static(dim):
    return int(dim) if isinstance(dim, tirx.IntImm) else None


def _call(em, func: tirx.PrimFunc, kind: str, variant: str, args: list, shape: list,
          dtype: str):
    func = func.without_attr("global_symbol").with_attrs({
        "ptq.kernel": kind, "ptq.variant": variant, "ptq.layout": "NHWC",
        "op_pattern": _OPAQUE, "tir.is_scheduled": True})
    gv = em.bb.add_func(func, f"ptq_{kind}_{variant}")
    return em.bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))


def emit_dense(em, x, w: np.ndarray, corr: np.ndarray, mult: np.ndarray, *, variant: str,
               n_out: int, k_in: int, shift: int, act_dtype: str, out_zp: int, qmin: int,
               qmax: int, out_dtype: str, per_token=None):
    """``x [..., K]`` (leading dims flattened into the GEMM's rows) times ``w [N, K]``.
    ``per_token``: ``(params [..., 3], colsum)`` of ``ptq.linear_dynamic``, whose per-row
    correction and scales then run in the epilogue (``kernels.TokenDequant``; ``mult``: the
    weight scales)."""
    del act_dtype  # (uint8: the kernel re-encodes)
    lead = list(x.ty.shape.values[:-1])
    rows = 1
    for d in lead:
        rows = None if rows is None or _static(d) is None else rows * _static(d)
    flat = x
    if len(lead) != 1:
        flat = em.bb.emit(relax.op.reshape(x, [-1, k_in]))
    m = flat.ty.shape.values[0]
    macs = (rows or _static(lead[-1]) or 1) * k_in * n_out
    func = kernels.dense_amx(rows, k_in, n_out, in_dtype=str(x.ty.dtype), shift=shift,
                             out_zp=out_zp, qmin=qmin, qmax=qmax, out_dtype=out_dtype,
                             parallel=macs >= PARALLEL_MACS, per_token=per_token is not None)
    args = [flat, relax.const(kernels.pack_dense_amx(w)), relax.const(corr), relax.const(mult)]
    if per_token is not None:
        params, colsum = per_token
        if len(lead) != 1:
            params = em.bb.emit(relax.op.reshape(params, [-1, 3]))
        args += [params, relax.const(colsum)]
    y = _call(em, func, "dense", variant, args, [m, n_out], out_dtype)
    if len(lead) != 1:
        y = em.bb.emit(relax.op.reshape(y, [*lead, n_out]))
    return y


def emit_conv2d(em, x, w: np.ndarray, corr: np.ndarray, mult: np.ndarray, *, variant: str,
                groups: int, c_in: int, c_out: int, kernel: tuple, stride: tuple,
                padding: tuple, dilation: tuple, shift: int, zp_enc: int, act_dtype: str,
                in_layout: str, out_layout: str, out_zp: int, qmin: int, qmax: int,
                out_dtype: str):
    """An NHWC implicit-GEMM conv (``kernels.conv2d_amx``; groups == 1): an NCHW input is
    transposed first, an NCHW output after."""
    del act_dtype
    if groups != 1:
        raise ValueError("the AMX conv kernel takes groups == 1 (strategy.choose)")
    if in_layout == "NCHW":
        x = em.bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    n, h, w_in, _ = x.ty.shape.values
    plan = kernels.conv_plan(int(h), int(w_in), c_in, c_out, kernel, stride, padding,
                             dilation)
    macs = plan.oh * plan.ow * c_out * c_in * kernel[0] * kernel[1]

    def build(**epilogue):
        return kernels.conv2d_amx(_static(n), int(h), int(w_in), c_in, c_out, kernel, stride,
                                  padding, dilation, in_dtype=str(x.ty.dtype), shift=shift,
                                  zp_enc=zp_enc, out_zp=out_zp, qmin=qmin, qmax=qmax,
                                  out_dtype=out_dtype, parallel=macs >= PARALLEL_MACS,
                                  **epilogue)

    func = build()
    args = [x, relax.const(kernels.pack_conv_amx(w, plan)), relax.const(corr),
            relax.const(mult)]
    shape = [n, plan.oh, plan.ow, c_out]
    y = _call(em, func, "conv2d", variant, args, shape, out_dtype)
    if out_layout == "NCHW":
        return em.bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))

    def with_residual(add: dict, res, res_dtype: str):
        """The same conv with the ``add`` that is its only consumer in its epilogue (``add``:
        the conv's side ``a_zp``/``a_mult``, the residual's ``b_zp``/``b_mult``, the add's
        ``multiplier``, ``out_zp``, ``qmin``, ``qmax``, ``out_dtype``): a new call; the
        plain one is left unused (``emit_relax`` removes it)."""
        residual = kernels.ResidualAdd(
            a_zp=add["a_zp"], a_mult=add["a_mult"], b_zp=add["b_zp"], b_mult=add["b_mult"],
            multiplier=add["multiplier"], out=kernels.Requant(
                add["out_zp"], add["qmin"], add["qmax"], add["out_dtype"]))
        fused = build(residual=residual, res_dtype=res_dtype)
        return _call(em, fused, "conv2d", variant, args + [res], shape, residual.out_dtype)

    em.epilogue_fusions[y] = with_residual
    return y


def emit_matmul(em, x, y, *, a_zp: int, b_zp: int, multiplier: float, out_zp: int, qmin: int,
                qmax: int, out_dtype: str):
    """``ptq.matmul`` of two 8-bit activations on tiles (``kernels.matmul_amx``), both packed
    per call, where the shapes fill tiles: static M >= ``MIN_ROWS``, N >= ``MIN_COLS`` and K
    (at most ``MATMUL_MAX_K``), equal batch dims (leading dims flattened into the kernel's
    batch loop). None otherwise: the strategy's VNNI block form.

    Returns ``(value, variant, why)``."""
    from ptqpasses_backends.tvm import amx

    dts = (str(x.ty.dtype), str(y.ty.dtype))
    if any(d not in ("int8", "uint8") for d in dts) or x.ty.ndim != y.ty.ndim or x.ty.ndim < 2:
        return None
    xs, ys = list(x.ty.shape.values), list(y.ty.shape.values)
    m, k_in, n_out = _static(xs[-2]), _static(xs[-1]), _static(ys[-1])
    if (None in (m, k_in, n_out) or m < amx.MIN_ROWS or n_out < amx.MIN_COLS
            or k_in > kernels.MATMUL_MAX_K
            or not all(em.analyzer.can_prove_equal(a, b) for a, b in zip(xs[:-2], ys[:-2]))):
        return None
    lead = xs[:-2]
    batch = 1
    for d in lead:
        batch = None if batch is None or _static(d) is None else batch * _static(d)
    if len(lead) != 1:
        x = em.bb.emit(relax.op.reshape(x, [-1, m, k_in]))
        y = em.bb.emit(relax.op.reshape(y, [-1, k_in, n_out]))
    func = kernels.matmul_amx(batch, m, k_in, n_out, a_dtype=dts[0], b_dtype=dts[1],
                              a_zp=a_zp, b_zp=b_zp, multiplier=multiplier, out_zp=out_zp,
                              qmin=qmin, qmax=qmax, out_dtype=out_dtype,
                              parallel=batch is None or batch > 1)
    out = _call(em, func, "matmul", "amx", [x, y], [x.ty.shape.values[0], m, n_out],
                out_dtype)
    if len(lead) != 1:
        out = em.bb.emit(relax.op.reshape(out, [*lead, m, n_out]))
    return out, "amx", (f"AMX tiles: {m} x {n_out} x {k_in} per batch entry, operands packed "
                        "per call")
