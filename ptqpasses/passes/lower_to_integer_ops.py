"""LowerToIntegerOps: turn ``dequantize -> op -> quantize`` patterns into ``ptq`` ops."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.graph_utils import add_constant, get_attr_value, remove_unused_attributes
from ptqpasses.meta import QParams, Role
from ptqpasses.opsets import COMPUTE, IDENTITY_VIEWS, VIEWS, in_coverage, op_name
from ptqpasses.pipeline import Pass, register_pass

aten, ptq = torch.ops.aten, torch.ops.ptq
ADD_COMMON_BITS = 14  # add: inputs are put on a common scale with integer factors <= 2**14


def f32(x: float) -> float:
    """Rounds a Python float to the nearest float32 value (multipliers are float32)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _f32_tensor(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).to(torch.float32)


def _is_dq(n) -> bool:
    return isinstance(n, fx.Node) and n.target is ptq.dequantize.default


def _dq_params(dq: fx.Node) -> QParams:
    return meta.get_qparams(dq.args[0])


def _value_shape(dq: fx.Node):
    """Shape of the float value a dequantize node stands for (from export's meta)."""
    val = dq.meta.get("val")
    return None if val is None else tuple(val.shape)


def _qvalue(v: float, p: QParams) -> int:
    """The integer a real value ``v`` quantizes to (ptq.quantize semantics), unclamped."""
    if math.isinf(v):
        return p.qmax if v > 0 else p.qmin
    s = torch.tensor(p.scale, dtype=torch.float32)
    return int(torch.round(torch.tensor(v, dtype=torch.float32) / s)) + p.zero_point


def clamp_bounds(act: Optional[fx.Node], p: QParams) -> tuple[int, int]:
    """Integer clamp that reproduces ``quantize(act(y))`` on ``quantize(y)``."""
    if act is None:
        return p.qmin, p.qmax
    t, args = act.target, act.args
    if t in (aten.relu.default, aten.relu_.default):
        lo, hi = 0.0, math.inf
    elif t is aten.relu6.default:
        lo, hi = 0.0, 6.0
    elif t in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = args[1] if len(args) > 1 else act.kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else act.kwargs.get("max_val", 1.0)
    else:  # clamp
        lo = args[1] if len(args) > 1 else act.kwargs.get("min")
        hi = args[2] if len(args) > 2 else act.kwargs.get("max")
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
    return (max(p.qmin, min(p.qmax, _qvalue(float(lo), p))),
            min(p.qmax, max(p.qmin, _qvalue(float(hi), p))))


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _pool_geometry(op: fx.Node) -> tuple[list[int], ...]:
    """(kernel, stride, padding, dilation) of an ATen 2-d pooling call, as pairs."""
    def pair(v):
        v = list(v)
        return v * 2 if len(v) == 1 else v

    kernel = pair(op.args[1])
    stride = pair(_arg(op, 2, "stride", []) or kernel)
    dilation = [1, 1] if op.target is aten.avg_pool2d.default else pair(_arg(op, 4, "dilation", [1]))
    return kernel, stride, pair(_arg(op, 3, "padding", [0])), dilation


class _Lowering:
    """Builds integer ops for one graph; each ``lower_*`` returns the new node or a reason."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def call(self, target, args) -> fx.Node:
        return self.gm.graph.call_function(target, tuple(args))

    def const(self, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        return add_constant(self.gm, hint, value, before)

    def weighted(self, op: fx.Node, act, out: QParams, q: fx.Node):
        x, w_dq = op.args[0], op.args[1]
        b_dq = _arg(op, 2, "bias", None)
        if isinstance(x, fx.Node) and x.target is ptq.fake_quantize_per_token.default:
            return self.per_token(op, act, out, q)
        if not _is_dq(x) or w_dq.target is not ptq.dequantize_per_channel.default:
            return "input or weight is not quantized"
        wq, ws, wz = (get_attr_value(self.gm, n) for n in w_dq.args[:3])
        if bool((wz != 0).any()):
            return "asymmetric weights (non-zero weight zero point) are not in the integer set"
        xp = _dq_params(x)
        mult = _f32_tensor(torch.tensor(xp.scale, dtype=torch.float64) * ws.double() / out.scale)
        bias = None
        if b_dq is not None:
            if b_dq.target is not ptq.dequantize_per_channel.default:
                return "bias is not quantized"
            bias = b_dq.args[0]
        lo, hi = clamp_bounds(act, out)
        m = self.const(f"{op.name}_multiplier", mult, q)
        if op.target is aten.conv2d.default:
            stride = list(_arg(op, 3, "stride", [1, 1]))
            padding = list(_arg(op, 4, "padding", [0, 0]))
            dilation = list(_arg(op, 5, "dilation", [1, 1]))
            groups = _arg(op, 6, "groups", 1)
            stride, padding, dilation = (v * 2 if len(v) == 1 else v
                                         for v in (stride, padding, dilation))
            return self.call(ptq.conv2d.default,
                             [x.args[0], xp.zero_point, w_dq.args[0], bias, stride, padding,
                              dilation, groups, m, out.zero_point, lo, hi, out.torch_dtype])
        return self.call(ptq.linear.default,
                         [x.args[0], xp.zero_point, w_dq.args[0], bias, m, out.zero_point, lo,
                          hi, out.torch_dtype])

    def per_token(self, op: fx.Node, act, out: QParams, q: fx.Node):
        """``linear(fake_quantize_per_token(x), w, b)``: ``ptq.linear_dynamic`` (float out),
        then the float bias added, then (where an integer op reads it) a ``quantize`` that
        carries a fused ReLU's clamp."""
        x, w_dq = op.args[0], op.args[1]
        b = _arg(op, 2, "bias", None)
        if op.target is not aten.linear.default:
            return "per-token activations are for linear only"
        if w_dq.target is not ptq.dequantize_per_channel.default:
            return "weight is not quantized"
        if bool((get_attr_value(self.gm, w_dq.args[2]) != 0).any()):
            return "asymmetric weights (non-zero weight zero point) are not in the integer set"
        if isinstance(b, fx.Node) and b.target is ptq.dequantize_per_channel.default:
            return "bias of a per-token linear is quantized"
        y = self.call(ptq.linear_dynamic.default, [x.args[0], w_dq.args[0], w_dq.args[1]])
        meta.copy_location(y, op)
        if b is not None:
            y = self.call(aten.add.Tensor, [y, b])
            meta.set_qspec(y, meta.NodeQuant(Role.FLOAT, reason=(
                f"{meta.PER_TOKEN_BIAS} {op.name!r} (its scale is known at run time only)")))
            meta.copy_location(y, op)
        if out.torch_dtype == torch.float32:
            return y
        lo, hi = clamp_bounds(act, out)
        return self.call(ptq.quantize.default,
                         [y, out.scale, out.zero_point, lo, hi, out.torch_dtype])

    def binary(self, op: fx.Node, act, out: QParams, q: fx.Node):
        a, b = op.args[:2]
        if isinstance(b, (int, float)):  # x * c or x / c: only the scale changes
            if not _is_dq(a):
                return "input is not quantized"
            pa = _dq_params(a)
            c = 1.0 / b if op.target is aten.div.Tensor else float(b)
            return self.call(ptq.requantize.default,
                             [a.args[0], pa.zero_point, f32(pa.scale * c / out.scale),
                              out.zero_point, out.qmin, out.qmax, out.torch_dtype])
        if not (_is_dq(a) and _is_dq(b)):
            return "an input is not quantized"
        pa, pb = _dq_params(a), _dq_params(b)
        lo, hi = clamp_bounds(act, out)
        if op.target is aten.add.Tensor:
            common = max(pa.scale, pb.scale) / 2**ADD_COMMON_BITS
            ka, kb = round(pa.scale / common), round(pb.scale / common)
            return self.call(ptq.add.default,
                             [a.args[0], pa.zero_point, ka, b.args[0], pb.zero_point, kb,
                              f32(common / out.scale), out.zero_point, lo, hi, out.torch_dtype])
        target = ptq.mul.default if op.target is aten.mul.Tensor else ptq.matmul.default
        return self.call(target, [a.args[0], pa.zero_point, b.args[0], pb.zero_point,
                                  f32(pa.scale * pb.scale / out.scale), out.zero_point, lo, hi,
                                  out.torch_dtype])

    def cat(self, op: fx.Node, act, out: QParams, q: fx.Node):
        xs = list(op.args[0])
        if not all(_is_dq(x) for x in xs):
            return "an input is not quantized"
        ps = [_dq_params(x) for x in xs]
        return self.call(ptq.cat.default,
                         [[x.args[0] for x in xs], [p.zero_point for p in ps],
                          [f32(p.scale / out.scale) for p in ps], _arg(op, 1, "dim", 0),
                          out.zero_point, out.qmin, out.qmax, out.torch_dtype])

    def pool(self, op: fx.Node, act, out: QParams, q: fx.Node):
        x = op.args[0]
        if not _is_dq(x):
            return "input is not quantized"
        xp = _dq_params(x)
        if op.target is aten.avg_pool2d.default:
            kernel, stride, padding, _ = _pool_geometry(op)
            return self.call(ptq.avg_pool2d.default,
                             [x.args[0], xp.zero_point, kernel, stride, padding,
                              f32(xp.scale / (out.scale * kernel[0] * kernel[1])),
                              out.zero_point, out.qmin, out.qmax, out.torch_dtype])
        shape = _value_shape(x)
        if shape is None:
            return "input shape unknown"
        if op.target is aten.adaptive_avg_pool2d.default:
            dims, keepdim = [-2, -1], True
        else:
            dims, keepdim = list(op.args[1]), _arg(op, 2, "keepdim", False)
        count = 1
        for d in dims:
            if not isinstance(shape[d], int):
                return "mean over a dynamic dimension"
            count *= shape[d]
        return self.call(ptq.mean.default,
                         [x.args[0], xp.zero_point, dims, keepdim,
                          f32(xp.scale / (out.scale * count)), out.zero_point, out.qmin,
                          out.qmax, out.torch_dtype])

    def lookup(self, op: fx.Node, act, out: QParams, q: fx.Node):
        x = op.args[0]
        if not _is_dq(x) or any(isinstance(a, fx.Node) for a in (*op.args[1:], *op.kwargs.values())):
            return "input is not quantized, or the function has tensor arguments"
        xp = _dq_params(x)
        if xp.qmax - xp.qmin > 255:
            return "table lookup needs an 8-bit input"
        codes = torch.arange(xp.qmin, xp.qmax + 1, dtype=torch.int32)
        real = ptq.dequantize(codes, xp.scale, xp.zero_point)
        y = op.target(real, *op.args[1:], **op.kwargs)
        table = ptq.quantize(y, out.scale, out.zero_point, out.qmin, out.qmax, out.torch_dtype)
        t = self.const(f"{op.name}_table", table, q)
        return self.call(ptq.lut.default, [x.args[0], t, xp.qmin])

    def share(self, op: fx.Node, act, out: QParams, q: fx.Node):
        x = op.args[0]
        if not _is_dq(x) or _dq_params(x) != out:
            return "input is not quantized with the same parameters"
        xq = x.args[0]
        if op.target in IDENTITY_VIEWS:
            return xq
        if op.target is aten.view.default:  # the same, on any layout our ops give it
            return self.call(aten.reshape.default, [xq, *op.args[1:]])
        if op.target in VIEWS:
            return self.call(op.target, [xq, *op.args[1:]])
        if op.target is aten.max_pool2d.default:
            kernel, stride, pad, dil = _pool_geometry(op)
            return self.call(ptq.max_pool2d.default,
                             [xq, kernel, stride, pad, dil, _arg(op, 5, "ceil_mode", False)])
        lo, hi = clamp_bounds(op, out)
        return self.call(ptq.clamp.default, [xq, lo, hi])


_RULES: dict[str, Callable] = {
    "conv2d": _Lowering.weighted, "linear": _Lowering.weighted, "add": _Lowering.binary,
    "mul": _Lowering.binary, "matmul": _Lowering.binary, "cat": _Lowering.cat,
    "avg_pool2d": _Lowering.pool, "mean": _Lowering.pool, "lut": _Lowering.lookup,
}


@register_pass
class LowerToIntegerOps(Pass):
    """Replaces each quantize(op(dequantize(...))) with the integer op from ``ptq``.

    Before::

        %dq = ptq.dequantize(%xq, 0.02, 128)
        %w = ptq.dequantize_per_channel(%w_int8, %w_scale, %w_zp, 0)
        %conv = aten.conv2d(%dq, %w, %b, [1, 1], [1, 1])
        %relu = aten.relu(%conv)
        %q = ptq.quantize(%relu, 0.05, 0, 0, 255, uint8)

    After::

        %q = ptq.conv2d(%xq, 128, %w_int8, %b_int32, [1, 1], [1, 1], [1, 1], 1,
                        %multiplier, 0, 0, 255, uint8)

    Ops that could not be lowered stay in float between dequantize and quantize, with the
    reason in their NodeQuant (``meta.float_reason``). Finally ``quantize(dequantize(x))``
    pairs become
    ``x`` (same parameters) or ``ptq.requantize``, and a requantize that is the identity on
    every value its input can hold (same zero point and dtype, a multiplier within float32
    rounding of 1: attention scores scaled by ``1 / sqrt(d)`` into a scale that absorbed it)
    is dropped.
    """

    name = "lower-to-integer-ops"

    def run(self, gm: fx.GraphModule) -> bool:
        lowering = _Lowering(gm)
        modified = False
        for q in list(gm.graph.nodes):
            if q.target is not ptq.quantize.default:
                continue
            x = q.args[0]
            if not isinstance(x, fx.Node) or x.op != "call_function":
                continue
            spec = meta.get_qspec(x)
            act, op = None, x
            if spec is not None and spec.role == Role.FUSED:
                act, op = x, x.args[0]
                spec = meta.get_qspec(op)
            if spec is None or spec.role not in (Role.COMPUTE, Role.SHARE):
                continue
            rule = _Lowering.share if spec.role == Role.SHARE else _RULES[COMPUTE[op.target]]
            out = meta.get_qparams(q)
            with gm.graph.inserting_before(q):
                new = rule(lowering, op, act, out, q)
            if isinstance(new, str):
                meta.set_float_reason(op, f"not lowered: {new}")
                continue
            if new is not q:
                meta.set_qparams(new, out)
                meta.set_source(new, meta.source(q))
                meta.copy_location(new, op)
                if meta.get_qspec(new) is None:  # (a per-token linear's float bias add has one)
                    meta.set_qspec(new, spec)
                q.replace_all_uses_with(new)
                gm.graph.erase_node(q)
            modified = True
        modified |= _lower_float_outputs(gm, lowering)
        modified |= _fold_quantize_dequantize(gm)
        modified |= _drop_identity_requantize(gm)
        if modified:
            gm.graph.eliminate_dead_code()
            remove_unused_attributes(gm)
        _record_float_reasons(gm)
        return modified


def _lower_float_outputs(gm: fx.GraphModule, lowering: _Lowering) -> bool:
    """Float-output ops (``NodeQuant.float_output``): ``op(dequantize(...))`` read by float
    consumers becomes the integer op with a float32 output, ``float32(acc) * s_x * s_w``
    (``meta.FLOAT_OUTPUT``: scale 1)."""
    modified = False
    for op in list(gm.graph.nodes):
        spec = meta.get_qspec(op)
        if (op.op != "call_function" or spec is None or spec.role != Role.COMPUTE
                or not spec.float_output):
            continue
        with gm.graph.inserting_before(op):
            new = _RULES[COMPUTE[op.target]](lowering, op, None, meta.FLOAT_OUTPUT, op)
        if isinstance(new, str):
            meta.set_float_reason(op, f"not lowered: {new}")
            continue
        meta.set_source(new, meta.source(op))
        meta.copy_location(new, op)
        if meta.get_qspec(new) is None:
            meta.set_qspec(new, spec)
        if "val" in op.meta:
            new.meta["val"] = op.meta["val"]
        op.replace_all_uses_with(new)
        modified = True
    return modified


def _fold_quantize_dequantize(gm: fx.GraphModule) -> bool:
    modified = False
    for q in list(gm.graph.nodes):
        if q.target is not ptq.quantize.default or not _is_dq(q.args[0]):
            continue
        dq, out = q.args[0], meta.get_qparams(q)
        src = _dq_params(dq)
        if src == out:
            q.replace_all_uses_with(dq.args[0])
        else:
            with gm.graph.inserting_before(q):
                new = gm.graph.call_function(
                    ptq.requantize.default,
                    (dq.args[0], src.zero_point, f32(src.scale / out.scale), out.zero_point,
                     out.qmin, out.qmax, out.torch_dtype))
            meta.set_qparams(new, out)
            meta.set_source(new, meta.source(q))
            q.replace_all_uses_with(new)
        gm.graph.erase_node(q)
        modified = True
    return modified


def _record_float_reasons(gm: fx.GraphModule) -> None:
    """Every float node the coverage report counts gets its reason (Annotate's, or "not in the
    integer operator set")."""
    for node in gm.graph.nodes:
        if not in_coverage(node):
            continue
        spec = meta.get_qspec(node)
        if spec is None or spec.role is not Role.FLOAT or not spec.reason:
            meta.set_float_reason(node, spec.reason if spec is not None and spec.reason else (
                f"{op_name(node)} is not in the integer operator set"))


def _drop_identity_requantize(gm: fx.GraphModule) -> bool:
    """Remove ``requantize(x, zp, m, zp, qmin, qmax, dtype)`` nodes that return ``x`` for every
    ``x`` in its own range ``[lo, hi]``: ``[lo, hi]`` inside ``[qmin, qmax]``, and
    ``D * |m - 1| < 1/4`` with ``D = max |x - zp|``, so ``round((x - zp) * m)`` is ``x - zp``
    (the product is off an integer by less than 1/4 plus a rounding of it)."""
    modified = False
    for r in list(gm.graph.nodes):
        if r.target is not ptq.requantize.default or len(r.args) < 7:
            continue
        x, zp, m, out_zp, qmin, qmax, dtype = r.args[:7]
        src = meta.get_qparams(x) if isinstance(x, fx.Node) else None
        if src is None or src.torch_dtype != dtype or zp != out_zp or src.zero_point != zp:
            continue
        if not (qmin <= src.qmin and src.qmax <= qmax):
            continue
        reach = max(abs(src.qmin - zp), abs(src.qmax - zp))
        if reach * abs(float(m) - 1.0) >= 0.25:
            continue
        r.replace_all_uses_with(x)
        gm.graph.erase_node(r)
        modified = True
    return modified
