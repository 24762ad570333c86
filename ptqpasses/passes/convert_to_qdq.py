"""ConvertToQDQ: replace observers by quantize/dequantize; quantize weights and biases."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.graph_utils import add_constant, get_attr_value, remove_unused_attributes
from ptqpasses.meta import QParams, Role
from ptqpasses.observers import weight_qparams
from ptqpasses.opsets import WEIGHTED
from ptqpasses.pipeline import Pass, register_pass

ptq = torch.ops.ptq
log = logging.getLogger(__name__)


class NotCalibratedError(RuntimeError):
    """ConvertToQDQ found an observer without qparams."""


class IntegerRangeError(ValueError):
    """A node whose int32 accumulation cannot be guaranteed (every backend would refuse it)."""


@register_pass
class ConvertToQDQ(Pass):
    """Produces the reference simulation: explicit quantize/dequantize with constant params.

    Before::

        %obs = call_module[ptq_observer_0](%x)
        %conv = aten.conv2d(%obs, %w, %b, ...)

    After::

        %q = ptq.quantize(%x, 0.02, 128, 0, 255, uint8)
        %dq = ptq.dequantize(%q, 0.02, 128)
        %wq = ptq.dequantize_per_channel(%w_int8, %w_scale, %w_zp, 0)
        %bq = ptq.dequantize_per_channel(%b_int32, %x_scale * %w_scale, 0, 0)
        %conv = aten.conv2d(%dq, %wq, %bq, ...)

    Shape ops and max pooling marked "share" get a quantize/dequantize pair with their
    input's parameters, so every integer op is bracketed by explicit conversions. A linear
    quantizing its input per token reads ``ptq.fake_quantize_per_token(%x)`` and keeps a
    float bias.
    """

    name = "convert-to-qdq"

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            q = meta.get_qspec(node)
            if q is None:
                continue
            if q.role == Role.OBSERVER:
                params = meta.get_qparams(node)
                if params is None:
                    raise NotCalibratedError(
                        f"observer of node {meta.observed_node(node)!r} has no qparams: run "
                        "ptqpasses.calibrate(graph, data) before ConvertToQDQ")
                _replace_with_qdq(gm, node, node.args[0], params)
                modified = True
            elif q.role == Role.SHARE:
                src = node.args[0]
                if _is_dequantize(src):
                    _insert_qdq_after(gm, node, meta.get_qparams(src.args[0]))
                    modified = True
            elif q.role == Role.COMPUTE and node.target in WEIGHTED and q.weight is not None:
                if q.dynamic:
                    _fake_quantize_per_token(gm, node)
                _quantize_weight_and_bias(gm, node, q.weight)
                modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            remove_unused_attributes(gm)
        return modified


def _is_dequantize(node) -> bool:
    return isinstance(node, fx.Node) and node.target is ptq.dequantize.default


def _qdq_nodes(gm: fx.GraphModule, x: fx.Node, params: QParams) -> tuple[fx.Node, fx.Node]:
    q = gm.graph.call_function(ptq.quantize.default, (x, params.scale, params.zero_point,
                                                     params.qmin, params.qmax,
                                                     params.torch_dtype))
    meta.set_qparams(q, params)
    meta.set_source(q, meta.source(x))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(ptq.dequantize.default, (q, params.scale, params.zero_point))
    meta.set_source(dq, meta.source(x))
    if "val" in x.meta:
        dq.meta["val"] = x.meta["val"]
    return q, dq


def _replace_with_qdq(gm, obs: fx.Node, x: fx.Node, params: QParams) -> None:
    """The observer's readers read ``dequantize(quantize(x))``, except float ops reading a
    float tensor (an input, or a float op's output, that an integer op wants quantized):
    those read ``x`` itself, so a tensor is not rounded to 8 bits on its way to a float op.
    (The output of an integer op is an integer tensor for every reader.)"""
    with gm.graph.inserting_before(obs):
        _, dq = _qdq_nodes(gm, x, params)
    source = meta.get_qspec(x)
    if source is not None and source.role in (Role.FLOAT, Role.INPUT):
        obs.replace_all_uses_with(dq, delete_user_cb=lambda u: not _is_float_op(u))
        obs.replace_all_uses_with(x)
    else:
        obs.replace_all_uses_with(dq)
    gm.graph.erase_node(obs)


def _is_float_op(user: fx.Node) -> bool:
    """A reader of float tensors: a float op, or a linear quantizing its input per token."""
    q = meta.get_qspec(user)
    return q is not None and (q.role == Role.FLOAT or q.dynamic)


def _fake_quantize_per_token(gm: fx.GraphModule, node: fx.Node) -> None:
    """A per-token linear (``NodeQuant.dynamic``) reads ``fake_quantize_per_token(x)``: its
    input quantized row by row at run time (its bias stays float: its scale is not known
    before the data is)."""
    x = node.args[0]
    with gm.graph.inserting_before(node):
        fq = gm.graph.call_function(ptq.fake_quantize_per_token.default, (x,))
    meta.set_source(fq, meta.source(x))
    if isinstance(x, fx.Node) and "val" in x.meta:
        fq.meta["val"] = x.meta["val"]
    node.args = (fq, *node.args[1:])


def _insert_qdq_after(gm, node: fx.Node, params: QParams) -> None:
    with gm.graph.inserting_after(node):
        _, dq = _qdq_nodes(gm, node, params)
    node.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not dq.args[0])


#: Largest int32 bias magnitude lowering stores: 2^30 leaves the backends room to fold the
#: zero-point term ``-z_x * sum(w_q)`` and to accumulate ``sum(x_q * w_q)`` on top (each below
#: 255 * 127 * K < 2^29 for 8-bit operands and K < 16,000) without leaving int32.
BIAS_BOUND = 2**30


def _fit_bias(node: fx.Node, b: torch.Tensor, x_scale: torch.Tensor, scales: torch.Tensor,
              zps: torch.Tensor, warn: bool = True) -> torch.Tensor:
    """Weight scales raised, per channel, until the channel's int32 bias fits ``BIAS_BOUND``.

    A channel whose weights are (nearly) dead but whose bias is not (e.g. a folded batchnorm's
    shift) gets a tiny weight scale, so ``b / (s_x * s_w)`` overflows int32 (as do tiny input
    and weight ranges together, found by tools/fuzz.py). Dead weights quantize to (nearly)
    zero at the raised scale as they did at the tiny one, and the bias stays exact to within
    ``s_x * s_w / 2``: the raise costs nothing measurable (46 dB against 0.26 dB saturated:
    tests/backends/test_end_to_end.py); live weights lose precision, where a saturated bias
    would be wrong by its excess. As ONNX Runtime's quantizer does; PyTorch floors every
    weight scale instead.
    Each raise is logged with the node and the channels.
    """
    need = (b.abs() / (x_scale * BIAS_BOUND)).float()
    low = (scales < need) & (zps == 0)
    if not low.any():
        return scales
    raised = torch.where(low, need * (1 + 2**-16), scales)  # (margin: s_x * s_w in float32)
    if not warn:
        return raised
    channels = low.nonzero().flatten().tolist()
    log.warning("node %r: weight scale raised on channel(s) %s (max x%.3g) so that their "
                "int32 bias fits (the bias is large against input scale x weight scale: "
                "near-dead weights, or tiny input and weight ranges)",
                node.name, channels[:8] + (["..."] if len(channels) > 8 else []),
                float((raised / scales)[low].max()))
    return raised


def _check_int32(node: fx.Node, b_q: torch.Tensor, w_q: torch.Tensor) -> None:
    """The contract every backend relies on (docs/integer_ops.md): with 8-bit activations,
    ``|bias| + 255 * sum|w|`` fits int32 per channel, so the folded zero-point term and the
    accumulation never overflow. Refused here, naming the node, rather than by a backend."""
    bound = b_q.abs() + 255 * w_q.reshape(w_q.shape[0], -1).double().abs().sum(1)
    if bound.max() >= 2**31:
        c = int(bound.argmax())
        raise IntegerRangeError(
            f"node {node.name!r}: channel {c}'s int32 accumulation may overflow (|bias| "
            f"{int(b_q.abs()[c])} + 255 x sum|w| {int(bound[c] - b_q.abs()[c])} >= 2^31); keep "
            f"the node float (QuantConfig.keep_float) or quantize its input to 16 bits")


def weight_grid(node: fx.Node, w: torch.Tensor, spec, b: Optional[torch.Tensor] = None,
                x_scale: Optional[float] = None, warn: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and zero points (one per output channel) ConvertToQDQ quantizes the weight
    ``w`` of ``node`` with: the weight observer's, raised where the int32 bias ``b`` (on the
    input scale ``x_scale``) would not fit. AdaRound computes its grid with this too."""
    scales, zps = weight_qparams(w.detach().float(), spec)
    if scales.numel() == 1:
        scales, zps = scales.expand(w.shape[0]).clone(), zps.expand(w.shape[0]).clone()
    if b is not None and x_scale is not None:
        x_scale = torch.tensor(x_scale, dtype=torch.float64)
        scales = _fit_bias(node, b.detach().double(), x_scale, scales, zps, warn)
    return scales, zps


def _quantize_weight_and_bias(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    w_node = node.args[1]
    w = get_attr_value(gm, w_node).detach().float()
    qmin, qmax = spec.qrange
    shape = [-1] + [1] * (w.dim() - 1)
    args = list(node.args)
    b_node = args[2] if len(args) > 2 else None
    x = args[0]
    x_scale = b = None
    if b_node is not None and _is_dequantize(x):
        x_scale = torch.tensor(meta.get_qparams(x.args[0]).scale, dtype=torch.float64)
        b = get_attr_value(gm, b_node).detach().double()
    scales, zps = weight_grid(node, w, spec, b, None if x_scale is None else float(x_scale))
    w_q = (torch.round(w / scales.reshape(shape)) + zps.reshape(shape)).clamp(qmin, qmax)
    w_q = w_q.to(spec.torch_dtype)
    anchor = w_node
    wq = add_constant(gm, f"{node.name}_weight_int8", w_q, anchor)
    ws = add_constant(gm, f"{node.name}_weight_scale", scales, anchor)
    wz = add_constant(gm, f"{node.name}_weight_zp", zps, anchor)
    with gm.graph.inserting_before(node):
        w_dq = gm.graph.call_function(ptq.dequantize_per_channel.default, (wq, ws, wz, 0))
    args[1] = w_dq
    if x_scale is not None:
        b_scale = (x_scale * scales.double()).float()
        b_q = torch.round(b / b_scale.double())
        if meta.get_qparams(x.args[0]).dtype in ("int8", "uint8"):
            _check_int32(node, b_q, w_q)
        b_q = b_q.to(torch.int32)
        bq = add_constant(gm, f"{node.name}_bias_int32", b_q, anchor)
        bs = add_constant(gm, f"{node.name}_bias_scale", b_scale, anchor)
        bz = add_constant(gm, f"{node.name}_bias_zp", torch.zeros_like(zps), anchor)
        with gm.graph.inserting_before(node):
            args[2] = gm.graph.call_function(ptq.dequantize_per_channel.default, (bq, bs, bz, 0))
    node.args = tuple(args)
