"""SmoothQuant: move activation outliers into the weights of the linears they feed.

Like bias correction this needs data, split the same way: :func:`record_input_absmax` runs
the float graph on calibration batches and writes ``max |x_j|`` per input channel of every
linear into ``node.meta["ptq.input_absmax"]``; :class:`SmoothQuant` (option ``alpha``) reads
it; :func:`smooth_quant(gm, data, alpha)` does both. Run after FoldBatchNorm, before Annotate.
Inside torch.distributed the maxima are taken over every rank's batches (an all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from ptqpasses import distributed as dist_
from ptqpasses import meta
from ptqpasses.calibrate import _as_args
from ptqpasses.graph_utils import (add_constant, first_user_position, get_attr_value, is_call,
                                   remove_unused_attributes)
from ptqpasses.opsets import COMPUTE, SHARE
from ptqpasses.pipeline import Pass, register_pass

aten = torch.ops.aten


class _AbsMax(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.absmax: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        if is_call(n, aten.linear.default):
            x = self.env[n.args[0]]
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            old = self.absmax.get(n.name)
            self.absmax[n.name] = m if old is None else torch.maximum(old, m)
        return super().run_node(n)


def record_input_absmax(gm: fx.GraphModule, data: Iterable[Any], *, distributed: bool = True,
                        group=None) -> int:
    """Writes ``max |x_j|`` (per input channel j, over all batches) on every linear node.

    Inside an initialized torch.distributed process group (``group``; ``distributed=False``
    to stay local) ``data`` is this rank's shard and the maxima are taken over every rank's
    (an all-reduce: exact), so every rank records the same values. Every rank must call it.

    Returns the number of linears recorded.
    """
    rec = _AbsMax(gm)
    batches = 0
    with torch.no_grad():
        for b in data:
            rec.run(*_as_args(b))
            batches += 1
    if distributed and dist_.active(group):
        linears = [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]
        mine = [rec.absmax.get(n.name, torch.zeros(_in_features(gm, n))) for n in linears]
        # every |x| is >= 0, so a rank without batches adds zeros; [0] says any rank had one
        both = dist_.all_reduce(torch.cat([torch.tensor([float(batches)]), *mine]), "max",
                                group)
        rec.absmax = {} if both[0] == 0 else dict(zip(
            [n.name for n in linears], both[1:].split([m.numel() for m in mine])))
    for n in gm.graph.nodes:
        if n.name in rec.absmax:
            meta.set_input_absmax(n, rec.absmax[n.name])
    return len(rec.absmax)


def _in_features(gm: fx.GraphModule, linear: fx.Node) -> int:
    x = linear.args[0]
    if isinstance(x, fx.Node) and "val" in x.meta:
        return int(x.meta["val"].shape[-1])
    return get_attr_value(gm, linear.args[1]).shape[1]


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Options.

    Attributes:
        alpha: migration strength; ``s_j = max|x_j|**alpha / max|w_j|**(1 - alpha)``.
            0 leaves activations alone, 1 moves all their range into the weights.
        insert_scale: where ``1/s`` cannot be folded into the producer (a LayerNorm whose
            output also feeds a residual add, a GELU), insert ``aten.div(x, s)`` before the
            linears. It runs in float right after a float op (a backend fuses it into that
            op); it is only inserted after producers that are float anyway.
    """

    alpha: float = 0.5
    insert_scale: bool = True


@register_pass
class SmoothQuant(Pass):
    """Per-channel smoothing ``X W^T = (X diag(s)^-1) (W diag(s))^T`` (Xiao et al. 2022).

    Linears sharing one input (q/k/v) share ``s`` (max of their weight ranges). ``1/s`` is
    folded into the producer when it is a LayerNorm (its weight and bias) used only by
    these linears, or a linear (optionally through a ReLU) used only by them; otherwise it
    becomes an explicit float ``div`` after a float producer (see ``insert_scale``).

    Before::

        %ln = aten.layer_norm(%x, [384], %g, %b)    # channel 17 of %ln reaches 40
        %q = aten.linear(%ln, %wq, %bq)             # meta: input_absmax
        %k = aten.linear(%ln, %wk, %bk)

    After (LayerNorm used only by the linears)::

        %ln = aten.layer_norm(%x, [384], %g / s, %b / s)
        %q = aten.linear(%ln, %wq * s, %bq)
        %k = aten.linear(%ln, %wk * s, %bk)

    After (LayerNorm also feeds a residual add)::

        %ln = aten.layer_norm(%x, [384], %g, %b)
        %ln_s = aten.div(%ln, %s)                   # float, fused into the LayerNorm
        %q = aten.linear(%ln_s, %wq * s, %bq)
    """

    name = "smooth-quant"
    Config = SmoothQuantConfig

    def run(self, gm: fx.GraphModule) -> bool:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if is_call(n, aten.linear.default) and meta.input_absmax(n) is not None \
                    and isinstance(n.args[0], fx.Node) and get_attr_value(gm, n.args[1]) is not None:
                groups.setdefault(n.args[0], []).append(n)
        modified = False
        for x, linears in groups.items():
            modified |= self._smooth(gm, x, linears)
        for n in gm.graph.nodes:
            meta.set_input_absmax(n, None)  # stale once weights moved
        if modified:
            remove_unused_attributes(gm)
        return modified

    def _smooth(self, gm: fx.GraphModule, x: fx.Node, linears: list[fx.Node]) -> bool:
        alpha = self.config.alpha
        a = torch.stack([meta.input_absmax(n) for n in linears]).amax(0).double()
        ws = [get_attr_value(gm, n.args[1]) for n in linears]
        w_max = torch.stack([w.detach().abs().amax(0) for w in ws]).amax(0).double()
        ok = (a > 0) & (w_max > 0)
        s = torch.where(ok, a.clamp(min=1e-12) ** alpha / w_max.clamp(min=1e-12) ** (1 - alpha),
                        torch.ones_like(a)).clamp(min=1e-5, max=1e5)
        exclusive = set(x.users) == set(linears)
        if exclusive and is_call(x, aten.layer_norm.default) and self._fold_layer_norm(gm, x, s):
            pass
        elif exclusive and self._fold_linear(gm, x, s):
            pass
        elif self.config.insert_scale and x.op == "call_function" \
                and x.target not in COMPUTE and x.target not in SHARE:
            const = add_constant(gm, f"{x.name}_smooth_scale", s.float(), first_user_position(gm))
            with gm.graph.inserting_after(x):
                div = gm.graph.call_function(aten.div.Tensor, (x, const))
            if "val" in x.meta:
                div.meta["val"] = x.meta["val"]
            div.meta["nn_module_stack"] = x.meta.get("nn_module_stack", {})
            for n in linears:
                n.replace_input_with(x, div)
        else:
            return False
        for n, w in zip(linears, ws):
            new_w = (w.double() * s[None, :]).to(w.dtype)
            args = list(n.args)
            args[1] = add_constant(gm, f"{n.name}_weight_smooth", new_w, n.args[1])
            n.args = tuple(args)
        return True

    @staticmethod
    def _fold_layer_norm(gm, ln: fx.Node, s: torch.Tensor) -> bool:
        args = list(ln.args) + [None] * max(0, 4 - len(ln.args))
        g, b = (get_attr_value(gm, a) if isinstance(a, fx.Node) else None for a in args[2:4])
        if g is None or (args[3] is not None and b is None):
            return False
        args[2] = add_constant(gm, f"{ln.name}_weight_smooth", (g.double() / s).to(g.dtype), ln)
        if b is not None:
            args[3] = add_constant(gm, f"{ln.name}_bias_smooth", (b.double() / s).to(b.dtype), ln)
        ln.args = tuple(args)
        return True

    @staticmethod
    def _fold_linear(gm, x: fx.Node, s: torch.Tensor) -> bool:
        if is_call(x, aten.relu.default) and len(x.users) >= 1:
            prev = x.args[0]
            if not (isinstance(prev, fx.Node) and len(prev.users) == 1):
                return False
            x = prev
        if not is_call(x, aten.linear.default):
            return False
        w = get_attr_value(gm, x.args[1])
        b = get_attr_value(gm, x.args[2]) if len(x.args) > 2 and x.args[2] is not None else None
        if w is None or (len(x.args) > 2 and x.args[2] is not None and b is None):
            return False
        args = list(x.args)
        args[1] = add_constant(gm, f"{x.name}_weight_smooth_out",
                               (w.double() / s[:, None]).to(w.dtype), x)
        if b is not None:
            args[2] = add_constant(gm, f"{x.name}_bias_smooth_out", (b.double() / s).to(b.dtype), x)
        x.args = tuple(args)
        return True


def smooth_quant(gm: fx.GraphModule, data: Iterable[Any], alpha: float = 0.5,
                 insert_scale: bool = True, *, distributed: bool = True,
                 group=None) -> fx.GraphModule:
    """Records input ranges on ``data`` (merged across the ranks inside torch.distributed)
    and applies :class:`SmoothQuant` (in place)."""
    record_input_absmax(gm, data, distributed=distributed, group=group)
    SmoothQuant(alpha=alpha, insert_scale=insert_scale)(gm)
    return gm


__all__ = ["SmoothQuant", "SmoothQuantConfig", "record_input_absmax", "smooth_quant"]
