"""CrossLayerEqualization: equalize per-channel weight ranges of consecutive layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ptqpasses.graph_utils import add_constant, get_attr_value, is_call, remove_unused_attributes
from ptqpasses.pipeline import Pass, register_pass

aten = torch.ops.aten
_LAYERS = (aten.conv2d.default, aten.linear.default)
_RELU = (aten.relu.default, aten.relu_.default)
_RELU6 = (aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default)


@dataclass(frozen=True)
class CrossLayerEqualizationConfig:
    """Options.

    Attributes:
        relu6: what to do with a ReLU6 between two layers. ReLU6 is not positively
            homogeneous (``relu6(x / s) != relu6(x) / s``), so equalizing across it changes
            the function. ``"replace"`` replaces it by ReLU where a pair is equalized (what
            Nagel et al. do for MobileNetV2; the float model changes wherever a
            pre-activation exceeds 6), ``"skip"`` leaves such pairs alone (exact).
        iterations: sweeps over all pairs (a layer in two pairs, e.g. a depthwise conv
            between two 1x1 convs, converges over repeated sweeps).
        min_range: channels whose weight range is below this are left unscaled.
    """

    relu6: str = "replace"
    iterations: int = 20
    min_range: float = 1e-8

    def __post_init__(self):
        if self.relu6 not in ("replace", "skip"):
            raise ValueError(f"relu6 must be 'replace' or 'skip', got {self.relu6!r}")


@register_pass
class CrossLayerEqualization(Pass):
    """Rescales channel i of a layer by ``1/s_i`` and the matching input channel of the next
    layer by ``s_i`` (Nagel et al. 2019, "Data-Free Quantization"), with
    ``s_i = sqrt(r1_i / r2_i)`` so both per-channel weight ranges become ``sqrt(r1_i r2_i)``.

    Matches ``conv/linear -> [ReLU | ReLU6] -> conv/linear`` where each intermediate value has
    a single user; the second layer may be a regular or a depthwise conv, the first any conv
    or linear (depthwise included). ReLU commutes with a positive per-channel scale; ReLU6
    does not (see ``relu6``). Run it after FoldBatchNorm, before Annotate.

    Before::

        %c1 = aten.conv2d(%x, %w1, %b1)      # channel 7 of w1 spans +-40
        %r = aten.relu(%c1)
        %c2 = aten.conv2d(%r, %w2, %b2)      # input channel 7 of w2 spans +-0.01

    After::

        %c1 = aten.conv2d(%x, %w1 / s, %b1 / s)
        %r = aten.relu(%c1)
        %c2 = aten.conv2d(%r, %w2 * s, %b2)  # s per channel: both now span +-0.63
    """

    name = "cross-layer-equalization"
    Config = CrossLayerEqualizationConfig

    def run(self, gm: fx.GraphModule) -> bool:
        pairs = [p for p in (_match(gm, n, self.config) for n in gm.graph.nodes) if p]
        if not pairs:
            return False
        weights = {}  # layer node -> [weight, bias] (float64), written back at the end
        for first, _, second in pairs:
            for layer in (first, second):
                if layer not in weights:
                    w = get_attr_value(gm, layer.args[1]).detach().double()
                    b = layer.args[2] if len(layer.args) > 2 else None
                    b = get_attr_value(gm, b).detach().double() if b is not None else None
                    weights[layer] = [w, b]
        for _ in range(self.config.iterations):
            for first, _, second in pairs:
                _equalize(weights[first], weights[second], _is_depthwise(second),
                          self.config.min_range)
        for first, act, second in pairs:
            if act is not None and act.target in _RELU6:
                act.target, act.args, act.kwargs = aten.relu.default, (act.args[0],), {}
        for layer, (w, b) in weights.items():
            dtype = get_attr_value(gm, layer.args[1]).dtype
            args = list(layer.args)
            args[1] = add_constant(gm, f"{layer.name}_weight_cle", w.to(dtype), args[1])
            if b is not None:
                args[2] = add_constant(gm, f"{layer.name}_bias_cle", b.to(dtype), args[2])
            layer.args = tuple(args)
        remove_unused_attributes(gm)
        return True


def _is_depthwise(conv: fx.Node) -> bool:
    if conv.target is not aten.conv2d.default:
        return False
    groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
    return groups > 1


def _groups(conv: fx.Node) -> int:
    if conv.target is not aten.conv2d.default:
        return 1
    return conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)


def _match(gm: fx.GraphModule, second: fx.Node, cfg: CrossLayerEqualizationConfig):
    """(first layer, activation or None, second layer) ending at ``second``, or None."""
    if not is_call(second, *_LAYERS) or get_attr_value(gm, second.args[1]) is None:
        return None
    x = second.args[0]
    act = None
    if isinstance(x, fx.Node) and is_call(x, *_RELU, *_RELU6):
        if x.target in _RELU6:
            if cfg.relu6 == "skip" or not _is_relu6(x):
                return None
        act, x = x, x.args[0]
        if len(act.users) != 1:
            return None
    if not (isinstance(x, fx.Node) and is_call(x, *_LAYERS) and len(x.users) == 1):
        return None
    w1, w2 = get_attr_value(gm, x.args[1]), get_attr_value(gm, second.args[1])
    if w1 is None:
        return None
    if len(x.args) > 2 and x.args[2] is not None and get_attr_value(gm, x.args[2]) is None:
        return None
    g2, c = _groups(second), w1.shape[0]
    if g2 == 1 and w2.shape[1] != c:
        return None
    if g2 > 1 and not (g2 == c and w2.shape[0] == c and w2.shape[1] == 1):
        return None  # grouped convs other than depthwise are not handled
    return x, act, second


def _is_relu6(node: fx.Node) -> bool:
    if node.target is aten.relu6.default:
        return True
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return lo == 0 and hi == 6


def _equalize(first: list, second: list, depthwise: bool, min_range: float) -> None:
    w1, b1 = first
    w2 = second[0]
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
    if depthwise:
        r2 = w2.abs().reshape(w2.shape[0], -1).amax(1)
    else:
        r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
    ok = (r1 > min_range) & (r2 > min_range)
    s = torch.where(ok, torch.sqrt(r1 / r2.clamp(min=min_range)), torch.ones_like(r1))
    shape1 = [-1] + [1] * (w1.dim() - 1)
    first[0] = w1 / s.reshape(shape1)
    if b1 is not None:
        first[1] = b1 / s
    if depthwise:
        second[0] = w2 * s.reshape([-1] + [1] * (w2.dim() - 1))
    else:
        second[0] = w2 * s.reshape([1, -1] + [1] * (w2.dim() - 2))
