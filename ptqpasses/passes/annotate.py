"""Annotate: write each node's quantization intent (a NodeQuant) from a QuantConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.config import QuantConfig
from ptqpasses.graph_utils import is_tensor_node
from ptqpasses.meta import NodeQuant, QSpec, Role
from ptqpasses.opsets import (ACTIVATIONS, COMPUTE, FLOAT_OUTPUT, FUSES_ACTIVATION, SHARE,
                              WEIGHTED, activation_bounds, activation_inputs, op_name,
                              unsupported)
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
                problem = _non_float(node) or unsupported(gm, node)
                if problem:
                    _float(node, problem)
                    continue
                self._annotate_compute(gm, node, scheme.activation, scheme.weight, cfg)
            elif node.target in SHARE:
                src = node.args[0] if node.args else None
                if scheme is not None and _is_quantized(src):
                    meta.set_qspec(node, NodeQuant(Role.SHARE))
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
        # a linear over tokens with a dynamic spec quantizes its input per token at run time:
        # nothing is requested of the producer; any other op reads the spec as the static one
        dynamic = act.dynamic and _over_tokens(node)
        act = act.static()
        if not dynamic:
            for x in activation_inputs(node):
                _request(x, act)
        nq = NodeQuant(Role.COMPUTE, output=act, dynamic=dynamic,
                       weight=weight if node.target in WEIGHTED else None)
        users = list(node.users)
        if node.target in FUSES_ACTIVATION and len(users) == 1:
            user = users[0]
            if (user.op == "call_function" and user.target in ACTIVATIONS
                    and activation_bounds(user) is not None and cfg.resolve(user)[0] is not None):
                meta.set_qspec(user, NodeQuant(Role.FUSED, output=act, fused_into=node.name))
                nq = nq.replace(output=None)
        meta.set_qspec(node, nq)


def _over_tokens(node: fx.Node) -> bool:
    """A linear whose input is a sequence of tokens, ``[..., tokens, features]`` (rank 3 or
    more): what per-token quantization is for. A linear over ``[batch, features]`` (a
    classifier head after a pool) stays static, so the integer chain in front of it does."""
    x = node.args[0] if node.args else None
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return node.target is aten.linear.default and isinstance(val, torch.Tensor) and val.dim() >= 3


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
        if q.role == Role.COMPUTE:
            fused = next((u for u in node.users if _role(u) == Role.FUSED), None)
            if needed.get(fused, False) if fused is not None else need:
                needed[node] = True
                continue
            needed[node] = False
            if node.target in FLOAT_OUTPUT:
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
        if q.role == Role.SHARE and not need:
            meta.set_qspec(node, NodeQuant(Role.FLOAT, reason="no integer op reads it (cost "
                                                           "policy)"))
        elif q.role in (Role.INPUT, Role.FLOAT) and q.output is not None and not need:
            meta.set_qspec(node, q.replace(output=None))


def _role(node: fx.Node) -> str:
    q = meta.get_qspec(node)
    return "" if q is None else q.role


def _reads_integer(user: fx.Node, node: fx.Node, needed: dict) -> bool:
    """Whether ``user`` (decided) reads ``node``'s output as an integer tensor."""
    role = _role(user)
    if role == Role.COMPUTE:
        return node in activation_inputs(user) and not meta.get_qspec(user).dynamic
    return role in (Role.SHARE, Role.FUSED) and needed.get(user, False)


def _float(node: fx.Node, reason: str, observed: bool = True) -> None:
    """Role "float" with ``reason``; its output stays observed (an integer op reads it) unless
    ``observed`` is False."""
    old = meta.get_qspec(node)
    meta.set_qspec(node, NodeQuant(Role.FLOAT, output=old.output if old and observed else None,
                                   reason=reason))


def _is_quantized(node) -> bool:
    q = meta.get_qspec(node) if isinstance(node, fx.Node) else None
    return q is not None and (q.output is not None
                              or q.role in (Role.SHARE, Role.COMPUTE, Role.FUSED))


def _request(node: fx.Node, spec: QSpec) -> None:
    """Makes ``node``'s output quantized: observe it, or look through a shape op."""
    q = meta.get_qspec(node)
    if q is not None and (q.role in (Role.COMPUTE, Role.FUSED, Role.SHARE)
                          or q.output is not None):
        return
    if node.op == "call_function" and node.target in SHARE and node.target not in ACTIVATIONS \
            and q is None and is_tensor_node(node.args[0]):
        meta.set_qspec(node, NodeQuant(Role.SHARE))
        _request(node.args[0], spec)
        return
    if q is None:
        role = Role.INPUT if node.op in ("placeholder", "get_attr") else Role.FLOAT
        meta.set_qspec(node, NodeQuant(role, output=spec,
                                       reason="" if role == Role.INPUT else "not annotated"))
    else:
        meta.set_qspec(node, q.replace(output=spec))


def _non_float(node: fx.Node) -> str:
    """Why ``node`` computes on integer or boolean tensors (ids, masks, position arithmetic),
    which pass through untouched, or "" when its tensors are float."""
    for n in [node, *activation_inputs(node)]:
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            which = "its output" if n is node else f"input {n.name!r}"
            return f"{which} is a {str(val.dtype).replace('torch.', '')} tensor (left as is)"
    return ""
