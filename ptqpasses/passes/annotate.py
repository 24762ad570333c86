"""Annotate: write each node's quantization intent (a NodeQuant) from a QuantConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.config import QuantConfig
from ptqpasses.graph_utils import get_attr_value, is_tensor_node
from ptqpasses.meta import NodeQuant, QSpec
from ptqpasses.opsets import (ACTIVATIONS, COMPUTE, FUSES_ACTIVATION, SHARE, WEIGHTED,
                              activation_bounds, op_name)
from ptqpasses.pipeline import Pass, register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class AnnotateConfig:
    config: QuantConfig = field(default_factory=QuantConfig)


@register_pass
class Annotate(Pass):
    """Decides, per node, what is quantized and how; writes ``node.meta["ptq.qspec"]``.

    Compute ops in the integer set get role "compute" and ask for their activation inputs
    to be quantized (which marks the producer's output as observed, looking through
    shape ops). A ReLU/ReLU6 that is the only user of a conv/linear/add is "fused". Shape
    ops and max pooling on quantized tensors "share" their input's qparams. Everything
    else is "float" with the reason recorded for the coverage report.

    Before::

        %conv = aten.conv2d(%x, %w, %b)     %relu = aten.relu(%conv)

    After (meta only)::

        %x: NodeQuant(role="input", output=uint8)  %conv: compute, weight=int8 per-channel
        %relu: fused(into=conv, output=uint8)
    """

    name = "annotate"
    Config = AnnotateConfig

    def __init__(self, config: QuantConfig | AnnotateConfig | None = None):
        super().__init__(AnnotateConfig(config) if isinstance(config, QuantConfig) else config)

    def run(self, gm: fx.GraphModule) -> bool:
        cfg = self.config.config
        cfg.validate(gm.graph)
        for node in gm.graph.nodes:
            node.meta.pop(meta.QSPEC, None)
        for node in gm.graph.nodes:
            if node.op != "call_function" or meta.get_qspec(node) is not None:
                continue
            scheme, why = cfg.resolve(node)
            if node.target in COMPUTE:
                if scheme is None:
                    _float(node, f"kept in float by {why}")
                    continue
                problem = _non_float(node) or _unsupported(gm, node)
                if problem:
                    _float(node, problem)
                    continue
                self._annotate_compute(gm, node, scheme.activation, scheme.weight, cfg)
            elif node.target in SHARE:
                src = node.args[0] if node.args else None
                if scheme is not None and _is_quantized(src):
                    meta.set_qspec(node, NodeQuant("share"))
            else:
                _float(node, f"{op_name(node)} is not in the integer operator set")
        for node in gm.graph.nodes:
            if node.op == "call_function" and meta.get_qspec(node) is None:
                _float(node, "input is not quantized" if node.target in SHARE
                       else f"{op_name(node)} is not in the integer operator set")
        if cfg.policy == "cost":
            _cost_policy(gm)
        return True

    def _annotate_compute(self, gm, node, act: QSpec, weight: QSpec, cfg: QuantConfig):
        inputs = _activation_inputs(node)
        for x in inputs:
            _request(x, act)
        nq = NodeQuant("compute", output=act,
                       weight=weight if node.target in WEIGHTED else None)
        users = list(node.users)
        if node.target in FUSES_ACTIVATION and len(users) == 1:
            user = users[0]
            if (user.op == "call_function" and user.target in ACTIVATIONS
                    and activation_bounds(user) is not None and cfg.resolve(user)[0] is not None):
                meta.set_qspec(user, NodeQuant("fused", output=act, fused_into=node.name))
                nq = nq.replace(output=None)
        meta.set_qspec(node, nq)


#: Integer ops that can hand a float consumer their dequantized accumulator.
FLOAT_OUTPUT_OPS = {aten.conv2d.default, aten.linear.default, aten.matmul.default,
                aten.bmm.default}


def _cost_policy(gm: fx.GraphModule) -> None:
    """``QuantConfig.policy == "cost"``: an output is quantized only where an integer op reads
    it. Walks the graph users first, so every user's decision is final when its producer is
    decided. A conv / linear / matmul that no integer op reads gets a float output (its
    integer inputs and weights stay); any other integer-set op (add, mul, cat, pools, mean,
    tables) that no integer op reads stays float, and no longer asks for its inputs; an
    observed float or input tensor that no integer op reads is not observed. Every such
    decision writes its rule into the node's reason (coverage report).

    Before (annotated for "all")::

        %lin = linear(%x)            compute, output uint8
        %add = add(%lin, %h)         compute, output uint8 (asks %h quantized)
        %ln = layer_norm(%add)       float

    After::

        %lin: compute, float output   %add: float   %h: not observed
    """
    needed: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        q = meta.get_qspec(node)
        if q is None:
            continue
        need = any(_reads_integer(user, node, needed) for user in node.users)
        if q.role == "compute":
            fused = next((u for u in node.users if _role(u) == "fused"), None)
            if needed.get(fused, False) if fused is not None else need:
                needed[node] = True
                continue
            needed[node] = False
            if node.target in FLOAT_OUTPUT_OPS:
                meta.set_qspec(node, q.replace(output=None, float_output=True, reason=(
                    "float output: its consumers are float (cost policy)")))
                after = f"float, after {node.name!r}'s float output"
            else:
                _float(node, f"no integer op reads its output: an integer {op_name(node)} "
                       "would add a conversion, not remove one (cost policy)", observed=False)
                after = f"float, after {node.name!r} (float by the cost policy)"
            if fused is not None:
                _float(fused, after, observed=False)
            continue
        needed[node] = need
        if q.role == "share" and not need:
            meta.set_qspec(node, NodeQuant("float", reason="no integer op reads it (cost "
                                                           "policy)"))
        elif q.role in ("input", "float") and q.output is not None and not need:
            meta.set_qspec(node, q.replace(output=None))


def _role(node: fx.Node) -> str:
    q = meta.get_qspec(node)
    return "" if q is None else q.role


def _reads_integer(user: fx.Node, node: fx.Node, needed: dict) -> bool:
    """Whether ``user`` (decided) reads ``node``'s output as an integer tensor."""
    role = _role(user)
    if role == "compute":
        return node in _activation_inputs(user)
    return role in ("share", "fused") and needed.get(user, False)


def _float(node: fx.Node, reason: str, observed: bool = True) -> None:
    """Role "float" with ``reason``; its output stays observed (an integer op reads it) unless
    ``observed`` is False."""
    old = meta.get_qspec(node)
    meta.set_qspec(node, NodeQuant("float", output=old.output if old and observed else None,
                                   reason=reason))


def _is_quantized(node) -> bool:
    q = meta.get_qspec(node) if isinstance(node, fx.Node) else None
    return q is not None and (q.output is not None or q.role in ("share", "compute", "fused"))


def _request(node: fx.Node, spec: QSpec) -> None:
    """Makes ``node``'s output quantized: observe it, or look through a shape op."""
    q = meta.get_qspec(node)
    if q is not None and (q.role in ("compute", "fused", "share") or q.output is not None):
        return
    if node.op == "call_function" and node.target in SHARE and node.target not in ACTIVATIONS \
            and q is None and is_tensor_node(node.args[0]):
        meta.set_qspec(node, NodeQuant("share"))
        _request(node.args[0], spec)
        return
    if q is None:
        role = "input" if node.op in ("placeholder", "get_attr") else "float"
        meta.set_qspec(node, NodeQuant(role, output=spec,
                                       reason="" if role == "input" else "not annotated"))
    else:
        meta.set_qspec(node, q.replace(output=spec))


def _activation_inputs(node: fx.Node) -> list[fx.Node]:
    if node.target in WEIGHTED:
        return [node.args[0]]
    if node.target is aten.cat.default:
        return list(node.args[0])
    if node.target in (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.matmul.default,
                       aten.bmm.default):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return [node.args[0]]


def _non_float(node: fx.Node) -> str:
    """Why ``node`` computes on integer or boolean tensors (ids, masks, position arithmetic),
    which pass through untouched, or "" when its tensors are float."""
    for n in [node, *_activation_inputs(node)]:
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            which = "its output" if n is node else f"input {n.name!r}"
            return f"{which} is a {str(val.dtype).replace('torch.', '')} tensor (left as is)"
    return ""


def _unsupported(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why ``node`` cannot become an integer op, or "" when it can."""
    t, args = node.target, node.args
    if t in WEIGHTED:
        w = get_attr_value(gm, args[1])
        if w is None:
            return "weight is not a constant"
        if len(args) > 2 and args[2] is not None and get_attr_value(gm, args[2]) is None:
            return "bias is not a constant"
        if t is aten.conv2d.default and w.dim() != 4:
            return "conv2d weight is not 4-D"
        if t is aten.conv2d.default and len(args) > 4 and isinstance(args[4], str):
            return f"string padding {args[4]!r} (capture with explicit padding)"
        return ""
    if t is aten.cat.default:
        return "" if all(is_tensor_node(x) for x in args[0]) else "cat of non-tensors"
    if t in (aten.mul.Tensor, aten.div.Tensor) and isinstance(args[1], (int, float)) \
            and is_tensor_node(args[0]) and args[1] != 0:
        return ""  # scaling by a constant: a requantize
    if t is aten.div.Tensor:
        return "division by a tensor"
    if t in (aten.add.Tensor, aten.mul.Tensor, aten.matmul.default, aten.bmm.default):
        if not all(is_tensor_node(x) for x in args[:2]):
            return f"{op_name(node)} with a scalar operand"
        if node.kwargs.get("alpha", 1) != 1:
            return "add with alpha != 1"
        return ""
    if t is aten.avg_pool2d.default:
        ceil = args[4] if len(args) > 4 else node.kwargs.get("ceil_mode", False)
        include_pad = args[5] if len(args) > 5 else node.kwargs.get("count_include_pad", True)
        divisor = args[6] if len(args) > 6 else node.kwargs.get("divisor_override")
        padding = args[3] if len(args) > 3 else [0, 0]
        if ceil or divisor is not None or (not include_pad and any(padding)):
            return "avg_pool2d with ceil_mode, divisor_override or count_include_pad=False"
        return ""
    if t is aten.adaptive_avg_pool2d.default:
        return "" if list(args[1]) == [1, 1] else f"adaptive_avg_pool2d to {list(args[1])} (only 1x1)"
    if t is aten.mean.dim:
        val = args[0].meta.get("val") if isinstance(args[0], fx.Node) else None
        if val is None:
            return "mean over an input of unknown shape"
        dims = [d % val.dim() for d in args[1]]
        if not all(isinstance(val.shape[d], int) for d in dims):
            return "mean over a dynamic dimension"
        return ""
    return ""
