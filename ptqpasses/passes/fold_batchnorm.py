"""FoldBatchNorm: merge eval-mode batch norm into the conv/linear that feeds it."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.graph_utils import add_constant, get_attr_value, is_call, remove_unused_attributes
from ptqpasses.pipeline import Pass, register_pass

aten = torch.ops.aten
_PRODUCERS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
              aten.linear.default)


@register_pass
class FoldBatchNorm(Pass):
    """Folds ``batch_norm(conv(x, W, b))`` into ``conv(x, W * s, (b - mean) * s + beta)``.

    ``s = gamma / sqrt(var + eps)``, computed in float64. Works whether the conv is a module
    or a functional call (e.g. after an explicit ``F.pad``), as long as its weight is a
    constant and the conv has no other user.

    Before::

        %conv = aten.conv2d(%x, %w, %b, ...)
        %bn   = aten.batch_norm(%conv, %gamma, %beta, %mean, %var, False, 0.1, 1e-5, ...)

    After::

        %conv = aten.conv2d(%x, %w_folded, %b_folded, ...)
    """

    name = "fold-batchnorm"

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for bn in list(gm.graph.nodes):
            match = _match(gm, bn)
            if match is None:
                continue
            producer, result, out, (gamma, beta, mean, var, eps) = match
            w = get_attr_value(gm, producer.args[1]).double()
            b = (get_attr_value(gm, producer.args[2]).double()
                 if len(producer.args) > 2 and producer.args[2] is not None
                 else torch.zeros(w.shape[0], dtype=torch.float64))
            s = gamma.double() / torch.sqrt(var.double() + eps)
            new_w = (w * s.reshape(-1, *[1] * (w.dim() - 1))).to(get_attr_value(gm, producer.args[1]).dtype)
            new_b = ((b - mean.double()) * s + beta.double()).to(new_w.dtype)
            anchor = producer.args[1]
            w_node = add_constant(gm, f"{producer.name}_weight_folded", new_w, anchor)
            b_node = add_constant(gm, f"{producer.name}_bias_folded", new_b, anchor)
            args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
            args[1], args[2] = w_node, b_node
            producer.args = tuple(args)
            meta.set_source(producer, meta.source(out))
            out.replace_all_uses_with(result)
            if out is not bn:
                gm.graph.erase_node(out)
            gm.graph.erase_node(bn)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            remove_unused_attributes(gm)
        return modified


def _match(gm: fx.GraphModule, bn: fx.Node):
    """Returns (producer, the node that replaces the batch norm's output, the node whose
    uses to replace, bn params) or None."""
    if is_call(bn, aten.batch_norm.default):
        x, gamma, beta, mean, var, training, _, eps = bn.args[:8]
        if training:
            return None
        out = bn
    elif is_call(bn, aten._native_batch_norm_legit_no_training.default):
        x, gamma, beta, mean, var, _, eps = bn.args[:7]
        getitems = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if len(getitems) != 1:
            return None
        out = getitems[0]
    else:
        return None
    result, x = x, _through_layout(x)
    if not (isinstance(x, fx.Node) and is_call(x, *_PRODUCERS) and len(x.users) == 1):
        return None
    if get_attr_value(gm, x.args[1]) is None:
        return None
    if len(x.args) > 2 and x.args[2] is not None and get_attr_value(gm, x.args[2]) is None:
        return None
    values = [get_attr_value(gm, p) if isinstance(p, fx.Node) else None
              for p in (gamma, beta, mean, var)]
    if values[2] is None or values[3] is None:
        return None
    n = values[2].numel()
    gamma_v = values[0] if values[0] is not None else torch.ones(n)
    beta_v = values[1] if values[1] is not None else torch.zeros(n)
    if gamma is not None and values[0] is None or beta is not None and values[1] is None:
        return None
    return x, result, out, (gamma_v, beta_v, values[2], values[3], float(eps))


def _through_layout(x):
    """The conv / linear behind the layout op capture writes a ``conv1d`` with (the squeeze
    of a height-1 ``conv2d``; the permute back after a pointwise ``linear``), whose output
    channel is the batch norm's channel; ``x`` itself otherwise."""
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return x
    if is_call(x, aten.squeeze.dim) and x.args[1] == 2 \
            and is_call(x.args[0], aten.conv2d.default):
        return x.args[0]
    if is_call(x, aten.permute.default) and list(x.args[1]) == [0, 2, 1] \
            and is_call(x.args[0], aten.linear.default):
        return x.args[0]
    return x
