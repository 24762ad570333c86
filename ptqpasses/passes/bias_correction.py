"""BiasCorrection: cancel the mean output error that weight/activation quantization causes.

Empirical bias correction needs data, and a pass is a plain ``GraphModule -> PassResult``,
so the work is split the usual way in this package (analysis on ``node.meta``, then a pass):

* :func:`record_bias_shift(observed_gm, data, reference)` runs the calibrated graph's QDQ
  simulation on ``data`` and writes, on each conv/linear, ``E[float out] - E[quantized out]``
  per output channel into ``node.meta["ptq.bias_shift"]``;
* :class:`BiasCorrection` (no options) adds each recorded shift to the layer's float bias
  (ConvertToQDQ quantizes the corrected bias);
* :func:`bias_correction(observed_gm, data, iterations=2)` does both, repeatedly: correcting
  an early layer changes what later layers see, so a second round corrects the rest.

It runs between ``calibrate`` and ``convert``::

    gm = ptqpasses.prepare(model, example, config)
    ptqpasses.calibrate(gm, calib)
    bias_correction(gm, calib)
    q = ptqpasses.convert(gm)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.calibrate import _as_args
from ptqpasses.graph_utils import add_constant, get_attr_value
from ptqpasses.opsets import WEIGHTED
from ptqpasses.pipeline import Pass, register_pass

aten = torch.ops.aten


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Quantized conv/linear nodes (role compute with a weight spec)."""
    out = []
    for n in gm.graph.nodes:
        q = meta.get_qspec(n)
        if n.op == "call_function" and n.target in WEIGHTED and q is not None \
                and q.role == "compute" and q.weight is not None:
            out.append(n)
    return out


class _ChannelMeans(fx.Interpreter):
    """Runs a graph, accumulating per-channel sums of the named nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, int]):
        super().__init__(gm)
        self.wanted = wanted  # name -> channel dim
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n):
        result = super().run_node(n)
        dim = self.wanted.get(n.name)
        if dim is not None and isinstance(result, torch.Tensor):
            d = dim % result.dim()
            flat = result.detach().double().movedim(d, 0).reshape(result.shape[d], -1)
            self.sums[n.name] = self.sums.get(n.name, 0) + flat.sum(1)
            self.counts[n.name] = self.counts.get(n.name, 0) + flat.shape[1]
        return result

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


def _channel_means(gm: fx.GraphModule, names: dict[str, int], data: list[tuple]):
    rec = _ChannelMeans(gm, names)
    with torch.no_grad():
        for args in data:
            rec.run(*args)
    return rec.means()


def _wanted(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: (1 if n.target is aten.conv2d.default else -1) for n in _layers(gm)}


def layer_output_means(observed_gm: fx.GraphModule, data: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per-channel output means of each quantized conv/linear, computed in float."""
    return _channel_means(observed_gm, _wanted(observed_gm), [_as_args(b) for b in data])


def record_bias_shift(observed_gm: fx.GraphModule, data: Iterable[Any],
                      reference: Optional[dict[str, torch.Tensor]] = None) -> int:
    """Writes ``E[float] - E[quantized]`` per output channel on each quantized conv/linear.

    Args:
        observed_gm: a calibrated graph (after InsertObservers and ``calibrate``).
        data: input batches (the calibration data is fine: the correction is a mean).
        reference: float means per layer (:func:`layer_output_means` of the graph before
            any correction); computed from ``observed_gm`` when omitted.

    Returns the number of layers with a recorded shift.
    """
    from ptqpasses.passes.convert_to_qdq import ConvertToQDQ

    batches = [_as_args(b) for b in data]
    wanted = _wanted(observed_gm)
    if reference is None:
        reference = _channel_means(observed_gm, wanted, batches)
    qdq = ConvertToQDQ()(copy.deepcopy(observed_gm)).graph_module
    quant = _channel_means(qdq, wanted, batches)
    count = 0
    for n in _layers(observed_gm):
        if n.name in reference and n.name in quant:
            meta.set_bias_shift(n, (reference[n.name] - quant[n.name]).float())
            count += 1
    return count


@register_pass
class BiasCorrection(Pass):
    """Adds the shift recorded by :func:`record_bias_shift` to each layer's float bias.

    Before::

        %conv = aten.conv2d(%obs, %w, %b)      # meta["ptq.bias_shift"] = delta
                                               # (E[float] - E[int8] per channel)
    After::

        %conv = aten.conv2d(%obs, %w, %b + delta)
    """

    name = "bias-correction"

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for n in list(gm.graph.nodes):
            shift = meta.bias_shift(n)
            if shift is None or n.op != "call_function" or n.target not in WEIGHTED:
                continue
            w_node = n.args[1]
            w = get_attr_value(gm, w_node)
            b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            b = get_attr_value(gm, b_node) if isinstance(b_node, fx.Node) else None
            if b_node is not None and b is None:
                continue  # a bias computed in the graph: nothing to fold into
            new_b = (b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64))
            new_b = (new_b + shift.double()).to(w.dtype)
            args = list(n.args) + [None] * max(0, 3 - len(n.args))
            args[2] = add_constant(gm, f"{n.name}_bias_corrected", new_b, w_node)
            n.args = tuple(args)
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "bias"}
            meta.set_bias_shift(n, None)
            modified = True
        return modified


def bias_correction(observed_gm: fx.GraphModule, data: Iterable[Any], *,
                    iterations: int = 2) -> fx.GraphModule:
    """Empirical bias correction of a calibrated graph, in place (see the module docstring).

    Each iteration measures the remaining mean error of every quantized conv/linear
    against the *original* float outputs and folds it into the bias.
    """
    batches = [_as_args(b) for b in data]
    reference = layer_output_means(observed_gm, batches)
    for _ in range(iterations):
        if record_bias_shift(observed_gm, batches, reference) == 0:
            break
        BiasCorrection()(observed_gm)
    return observed_gm


__all__ = ["BiasCorrection", "bias_correction", "layer_output_means", "record_bias_shift"]
