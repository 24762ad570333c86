"""BiasCorrection: cancel the mean output error that weight/activation quantization causes.

Empirical bias correction needs data, and a pass is a plain ``GraphModule -> PassResult``,
so the work is split the usual way in this package (analysis on ``node.meta``, then a pass):

* :func:`record_bias_shift(observed_gm, data, reference)` runs the calibrated graph's QDQ
  simulation on ``data`` and writes, on each conv/linear, ``E[float out] - E[quantized out]``
  per output channel into ``node.meta["ptq.bias_shift"]``;
* :class:`BiasCorrection` (no options) adds each recorded shift to the layer's float bias
  (ConvertToQDQ quantizes the corrected bias);
* :func:`bias_correction(observed_gm, data)` does both.

Layers are corrected in graph order: each layer's error is measured with all earlier layers
already corrected (all batches move through the QDQ graph together, node by node), so an
upstream error is never compensated twice. Inside torch.distributed each layer's mean is over
every rank's batches (sums and counts all-reduced before the layer's shift is applied).

It runs between ``calibrate`` and ``convert``::

    gm = ptqpasses.prepare(model, example, config)
    ptqpasses.calibrate(gm, calib)
    bias_correction(gm, calib)
    q = ptqpasses.convert(gm)
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from ptqpasses import distributed as dist_
from ptqpasses import meta
from ptqpasses.meta import Role
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
                and q.role == Role.COMPUTE and q.weight is not None:
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

    def means(self, reduce: Optional[Callable] = None,
              channels: Optional[dict[str, int]] = None) -> dict[str, torch.Tensor]:
        """Per-channel means; with ``reduce`` (a sum over the ranks) of every rank's values
        (``channels``: the size of each, for a rank without batches)."""
        if reduce is not None:
            for name, c in channels.items():
                both = reduce(torch.cat([torch.zeros(c, dtype=torch.float64)
                                         + self.sums.get(name, 0.0),
                                         torch.tensor([float(self.counts.get(name, 0))],
                                                      dtype=torch.float64)]))
                self.sums[name], self.counts[name] = both[:-1], int(both[-1])
        return {k: v / self.counts[k] for k, v in self.sums.items()}


def _channel_means(gm: fx.GraphModule, names: dict[str, int], data: list[tuple],
                   reduce: Optional[Callable] = None):
    rec = _ChannelMeans(gm, names)
    with torch.no_grad():
        for args in data:
            rec.run(*args)
    return rec.means(reduce, _channels(gm) if reduce is not None else None)


def _wanted(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: (1 if n.target is aten.conv2d.default else -1) for n in _layers(gm)}


def _channels(gm: fx.GraphModule) -> dict[str, int]:
    """Output channels of each layer (the weight's dimension 0), in graph order."""
    out = {}
    for n in _layers(gm):
        w = get_attr_value(gm, n.args[1])
        out[n.name] = int(w.shape[0] if w is not None else
                          n.meta["val"].shape[1 if n.target is aten.conv2d.default else -1])
    return out


def _reducer(batches: int, distributed: bool, group) -> Optional[Callable]:
    """A sum over the ranks inside torch.distributed, else None; raises (on every rank)
    when no rank has a batch."""
    if not (distributed and dist_.active(group)):
        return None
    if dist_.all_reduce(torch.tensor([float(batches)]), "sum", group)[0] == 0:
        raise ValueError("bias correction: no batches on any rank")
    return lambda t: dist_.all_reduce(t, "sum", group)


def layer_output_means(observed_gm: fx.GraphModule, data: Iterable[Any], *,
                       distributed: bool = True, group=None) -> dict[str, torch.Tensor]:
    """Per-channel output means of each quantized conv/linear, computed in float (over
    every rank's batches inside torch.distributed)."""
    batches = [_as_args(b) for b in data]
    return _channel_means(observed_gm, _wanted(observed_gm), batches,
                          _reducer(len(batches), distributed, group))


def record_bias_shift(observed_gm: fx.GraphModule, data: Iterable[Any],
                      reference: Optional[dict[str, torch.Tensor]] = None,
                      mode: str = "weight", *, distributed: bool = True, group=None) -> int:
    """Writes ``E[float] - E[quantized]`` per output channel on each quantized conv/linear.

    Args:
        observed_gm: a calibrated graph (after InsertObservers and ``calibrate``).
        data: input batches (the calibration data is fine: the correction is a mean).
        reference: float means per layer (:func:`layer_output_means` of the graph before
            any correction); computed from ``observed_gm`` when omitted (mode "output").
        mode: ``"weight"``: the mean error the weight rounding causes on the layer's actual
            (quantized) input, ``E[(W - Wq) x]`` (Nagel et al.'s quantity, measured);
            ``"output"``: the whole mean error of the layer output, including what upstream
            activation clipping causes. Clipping errors are sparse (a few large values), so
            cancelling their mean with a constant adds error everywhere else: on
            MobileNetV2 "output" loses dB, "weight" does not.
        distributed: inside an initialized torch.distributed process group (``group``),
            ``data`` is this rank's shard: each mean is over every rank's batches (sums and
            counts all-reduced, layer by layer), so every rank records the same shifts.
            Every rank must call it. False: this process's data alone.

    Returns the number of layers with a recorded shift.
    """
    from ptqpasses.passes.convert_to_qdq import ConvertToQDQ

    if mode not in ("weight", "output"):
        raise ValueError(f"mode must be 'weight' or 'output', got {mode!r}")
    batches = [_as_args(b) for b in data]
    reduce = _reducer(len(batches), distributed, group)
    wanted = _wanted(observed_gm)
    weights = None
    if mode == "output":
        if reference is None:
            reference = _channel_means(observed_gm, wanted, batches, reduce)
    else:
        weights = {n.name: get_attr_value(observed_gm, n.args[1]) for n in _layers(observed_gm)}
        reference = {}
    qdq = ConvertToQDQ()(copy.deepcopy(observed_gm)).graph_module
    shifts = _sequential_shifts(qdq, batches, reference, wanted, weights, reduce,
                                _channels(observed_gm))
    for n in _layers(observed_gm):
        if n.name in shifts:
            meta.set_bias_shift(n, shifts[n.name].float())
    return len(shifts)


def _weight_error(node: fx.Node, x: torch.Tensor, w_err: torch.Tensor) -> torch.Tensor:
    """The layer applied to its input with the weight error ``W - Wq`` (no bias)."""
    import torch.nn.functional as F
    if node.target is aten.conv2d.default:
        a = list(node.args) + [None] * (7 - len(node.args))
        stride, padding, dilation, groups = (a[3] or [1, 1], a[4] or [0, 0], a[5] or [1, 1],
                                             a[6] or 1)
        return F.conv2d(x, w_err, None, stride, padding, dilation, groups)
    return F.linear(x, w_err)


def _sequential_shifts(qdq: fx.GraphModule, batches: list[tuple],
                       reference: dict[str, torch.Tensor], wanted: dict[str, int],
                       weights: Optional[dict[str, torch.Tensor]] = None,
                       reduce: Optional[Callable] = None,
                       channels: Optional[dict[str, int]] = None):
    """Runs the QDQ graph node by node over all batches at once; at each layer the mean
    error is measured *with every earlier layer already corrected* and cancelled before
    later layers run (correcting all layers from one uncorrected run would compensate
    upstream errors twice). ``reduce`` sums each layer's totals over the ranks."""
    interp = fx.Interpreter(qdq)
    envs: list[dict] = [{} for _ in batches]
    remaining = {n: len(n.users) for n in qdq.graph.nodes}
    placeholders = [n for n in qdq.graph.nodes if n.op == "placeholder"]
    shifts = {}
    with torch.no_grad():
        for node in qdq.graph.nodes:
            if node.op == "output":
                break
            for env, args in zip(envs, batches):
                if node.op == "placeholder":
                    env[node] = args[placeholders.index(node)]
                elif node.op == "get_attr":
                    env[node] = interp.fetch_attr(node.target)
                else:
                    a = fx.node.map_arg(node.args, lambda x: env[x])
                    kw = fx.node.map_arg(node.kwargs, lambda x: env[x])
                    fn = node.target if node.op == "call_function" else (
                        qdq.get_submodule(node.target) if node.op == "call_module"
                        else getattr(a[0], node.target))
                    env[node] = fn(*a, **kw) if node.op != "call_method" else fn(*a[1:], **kw)
            dim = wanted.get(node.name)
            if dim is not None and (node.name in reference or weights is not None):
                total, count = 0.0, 0
                for env in envs:
                    y = env[node]
                    if weights is not None:  # E[(W - Wq) x] on the layer's actual input
                        w_q = env[node.args[1]]
                        y = _weight_error(node, env[node.args[0]], weights[node.name] - w_q)
                    d = dim % y.dim()
                    flat = y.double().movedim(d, 0).reshape(y.shape[d], -1)
                    total, count = total + flat.sum(1), count + flat.shape[1]
                if reduce is not None:  # every rank reaches every layer, in graph order
                    both = reduce(torch.cat([
                        torch.zeros(channels[node.name], dtype=torch.float64) + total,
                        torch.tensor([float(count)], dtype=torch.float64)]))
                    total, count = both[:-1], int(both[-1])
                mean = total / count
                shift = mean if weights is not None else reference[node.name] - mean
                shifts[node.name] = shift
                for env in envs:
                    y = env[node]
                    shape = [1] * y.dim()
                    shape[dim % y.dim()] = -1
                    env[node] = y + shift.to(y.dtype).reshape(shape)
            for inp in node.all_input_nodes:
                remaining[inp] -= 1
                if remaining[inp] == 0:
                    for env in envs:
                        env.pop(inp, None)
    return shifts


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
                    iterations: int = 1, mode: str = "weight", distributed: bool = True,
                    group=None) -> fx.GraphModule:
    """Empirical bias correction of a calibrated graph, in place (see the module docstring).

    Each iteration measures the remaining mean error of every quantized conv/linear
    against the *original* float outputs (layer by layer) and folds it into the bias; a
    second iteration only picks up the rounding of the corrected int32 biases. Inside
    torch.distributed the means are over every rank's batches (see
    :func:`record_bias_shift`).
    """
    batches = [_as_args(b) for b in data]
    kw = {"distributed": distributed, "group": group}
    reference = layer_output_means(observed_gm, batches, **kw) if mode == "output" else None
    for _ in range(iterations):
        if record_bias_shift(observed_gm, batches, reference, mode, **kw) == 0:
            break
        BiasCorrection()(observed_gm)
    return observed_gm


__all__ = ["BiasCorrection", "bias_correction", "layer_output_means", "record_bias_shift"]
