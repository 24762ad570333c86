"""AdaRound: learn, for each weight, whether it rounds up or down (Nagel et al. 2020).

Nearest rounding minimises each weight's own error, not the layer's output error: where the
layer's inputs are correlated, rounding some weights the other way cancels part of the
others' error. AdaRound ("Up or Down? Adaptive Rounding for Post-Training Quantization",
ICML 2020) learns that choice per weight from calibration data. Like bias correction, the
work is split into analysis on ``node.meta`` and a pass:

* :func:`record_adaround(observed_gm, data)` learns, layer by layer in graph order, the
  integer weights of every quantized conv/linear and writes them into
  ``node.meta["ptq.adaround"]``;
* :class:`AdaRound` (no options) writes each recorded rounding back into the float weight;
* :func:`adaround(observed_gm, data)` does both.

It runs between ``calibrate`` and ``convert`` (bias correction after it is possible, but on
the test model it undid part of the gain: AdaRound's objective already covers the mean)::

    gm = ptqpasses.prepare(model, example, config)
    ptqpasses.calibrate(gm, calib)
    adaround(gm, calib)
    q = ptqpasses.convert(gm)

Per layer, with ``s``/``z`` the weight grid ConvertToQDQ uses (:func:`weight_grid`: the weight
observer's per-channel scale, raised where the int32 bias needs it), it minimises over ``V``::

    || f(W~ x^ + b) - f(W x + b) ||^2 + reg_weight * sum(1 - |2 h(V) - 1|^beta)
    W~ = s * (clamp(floor(W / s) + z + h(V), q_lo, q_hi) - z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)        zeta = 1.1, gamma = -0.1

where ``f`` is the activation fused into the layer (ReLU, ReLU6, clamp; none otherwise), ``x``
the layer's float input and ``x^`` the input the quantized graph gives it
(``inputs="quantized"``: activations fake-quantized by their observers' qparams and earlier
layers on their learned weights, the paper's asymmetric reconstruction) or ``x`` itself
(``inputs="float"``). ``V`` starts where ``h(V)`` equals the fractional part of ``W / s``;
``beta`` anneals from 20 to 2 after a warm-up without the regulariser; Adam. Rows (conv
patches, linear rows) are sampled from the calibration data with a seeded generator. The
result is ``h >= 0.5``, kept unless it is worse than nearest rounding on the sampled rows.
(The error is summed over output channels and averaged over rows, as in the paper's code.)

How conversion reproduces it: each channel's smallest and largest weight keep nearest
rounding and their float value, and no learned integer lies beyond their nearest integers
(``q_lo``/``q_hi``),
so every channel keeps its range and the scale conversion recomputes from it is the same.
A weight whose rounding flips is written as ``s * (q - z)``, which conversion rounds back to
``q``; the others keep their float values. :class:`AdaRound` checks this with the
conversion's own :func:`weight_grid` and leaves a layer whose check fails at nearest rounding
(with a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptqpasses import meta
from ptqpasses.calibrate import _as_args
from ptqpasses.graph_utils import add_constant, get_attr_value, remove_unused_attributes
from ptqpasses.meta import QParams, Role
from ptqpasses.opsets import WEIGHTED, activation_bounds
from ptqpasses.passes.bias_correction import _layers
from ptqpasses.passes.convert_to_qdq import NotCalibratedError, weight_grid
from ptqpasses.pipeline import Pass, register_pass

aten, ptq = torch.ops.aten, torch.ops.ptq
log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, section 4)


@dataclass(frozen=True)
class AdaRoundConfig:
    """Options of :func:`record_adaround` (defaults: the paper's, fewer iterations).

    Attributes:
        iterations: Adam steps per layer.
        batch_rows: rows (conv patches / linear rows) per step.
        max_rows: rows of layer input kept per layer, sampled evenly from the batches.
        lr: Adam learning rate.
        reg_weight: lambda, the weight of the rounding regulariser.
        beta: the regulariser's exponent, annealed linearly from ``beta[0]`` to ``beta[1]``.
        warmup: fraction of the steps before the regulariser starts.
        inputs: ``"quantized"`` (the input the quantized graph gives the layer) or
            ``"float"`` (the float model's).
        seed: seeds the row sampling.
    """

    iterations: int = 1000
    batch_rows: int = 512
    max_rows: int = 32768
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    inputs: str = "quantized"
    seed: int = 0

    def __post_init__(self):
        if self.inputs not in ("quantized", "float"):
            raise ValueError(f"inputs must be 'quantized' or 'float', got {self.inputs!r}")
        if self.iterations < 0 or self.batch_rows < 1 or self.max_rows < 1:
            raise ValueError("iterations must be >= 0, batch_rows and max_rows >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")


# --- the layer ----------------------------------------------------------------------------


def _input_qparams(node: fx.Node) -> Optional[QParams]:
    """The qparams conversion gives the layer's input (through share ops to the observer);
    None when the input is not quantized. Raises when the observer has none."""
    x = node.args[0]
    while isinstance(x, fx.Node):
        q = meta.get_qspec(x)
        if q is None:
            return None
        if q.role == Role.OBSERVER:
            p = meta.get_qparams(x)
            if p is None:
                raise NotCalibratedError(
                    f"adaround: node {node.name!r}: the observer of its input "
                    f"{meta.observed_node(x)!r} has no qparams: run ptqpasses.calibrate(graph, "
                    "data) before adaround")
            return p
        if q.role != Role.SHARE or not x.args:
            return None
        x = x.args[0]
    return None


def _bias_node(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _grid(gm: fx.GraphModule, node: fx.Node, w: torch.Tensor):
    """``weight_grid`` with the same bias and input scale conversion will pass it."""
    b_node, xp = (node.args[2] if len(node.args) > 2 else None), _input_qparams(node)
    b = get_attr_value(gm, b_node) if isinstance(b_node, fx.Node) else None
    if b is None or xp is None:
        return weight_grid(node, w, meta.get_qspec(node).weight, warn=False)
    return weight_grid(node, w, meta.get_qspec(node).weight, b, xp.scale, warn=False)


class _Layer:
    """One conv/linear as a matrix product on rows ``[R, groups, K / groups]``."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.node = node
        self.w = get_attr_value(gm, node.args[1]).detach().float()
        self.spec = meta.get_qspec(node).weight
        self.scales, self.zps = _grid(gm, node, self.w)
        self.conv = node.target is aten.conv2d.default
        a = list(node.args) + [None] * (7 - len(node.args))
        self.stride, self.padding, self.dilation = a[3] or [1, 1], a[4] or [0, 0], a[5] or [1, 1]
        self.groups = (a[6] or 1) if self.conv else 1
        specs = [(u, meta.get_qspec(u)) for u in node.users]
        fused = [u for u, q in specs if q is not None and q.role == Role.FUSED
                 and q.fused_into == node.name]
        self.act = activation_bounds(fused[0]) if fused else None  # f in the objective

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return x.reshape(-1, 1, x.shape[-1])
        if x.dim() == 3:
            x = x[None]
        cols = F.unfold(x, self.w.shape[2:], self.dilation, self.padding, self.stride)
        return cols.transpose(1, 2).reshape(-1, self.groups, cols.shape[1] // self.groups)

    def apply(self, rows: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]):
        out = torch.einsum("rgk,gok->rgo", rows, w.reshape(self.groups, w.shape[0] // self.groups,
                                                           -1))
        out = out.reshape(rows.shape[0], -1)
        if b is not None:
            out = out + b
        if self.act is not None:
            lo, hi = self.act
            out = out.clamp(min=lo, max=None if hi == float("inf") else hi)
        return out

    def grid(self):
        """(ratio W / s, nearest integers, s and z shaped like W, per-channel q_lo / q_hi)."""
        shape = [-1] + [1] * (self.w.dim() - 1)
        s, z = self.scales.reshape(shape), self.zps.reshape(shape).float()
        qmin, qmax = self.spec.qrange
        ratio = self.w / s  # float32, as conversion divides
        nearest = (torch.round(ratio) + z).clamp(qmin, qmax)
        flat = nearest.reshape(nearest.shape[0], -1)
        return ratio, nearest, s, z, flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


def _learn(layer: _Layer, xq: torch.Tensor, y: torch.Tensor, b: Optional[torch.Tensor],
           cfg: AdaRoundConfig, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """The learned integer weights and their output error relative to nearest rounding."""
    ratio, nearest, s, z, q_lo, q_hi = layer.grid()
    base = torch.floor(ratio) + z
    flat = layer.w.reshape(layer.w.shape[0], -1)
    shape = [-1] + [1] * (layer.w.dim() - 1)
    pinned = (layer.w == flat.amax(1).reshape(shape)) | (layer.w == flat.amin(1).reshape(shape))
    # a pinned weight's only allowed integer is its nearest one
    lo = torch.where(pinned, nearest, q_lo.expand_as(nearest)) - z
    hi = torch.where(pinned, nearest, q_hi.expand_as(nearest)) - z
    base, free = base - z, (~pinned).float()
    p = ((ratio - torch.floor(ratio) - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    v = torch.log(p / (1 - p)).requires_grad_()  # h(V) = the fractional part

    def h():
        return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(r):
        return s * torch.clamp(base + r, lo, hi)

    opt = torch.optim.Adam([v], lr=cfg.lr)
    warm, total = int(cfg.warmup * cfg.iterations), cfg.iterations
    b0, b1 = cfg.beta
    n = min(cfg.batch_rows, xq.shape[0])
    for t in range(total):
        idx = torch.randint(xq.shape[0], (n,), generator=gen)
        hv = h()
        out = layer.apply(xq.index_select(0, idx), weight(hv), b)
        loss = ((out - y.index_select(0, idx)) ** 2).sum(1).mean()
        if t >= warm:
            beta = b1 + (b0 - b1) * (1 - (t - warm) / max(1, total - warm))
            loss = loss + cfg.reg_weight * ((1 - (2 * hv - 1).abs().pow(beta)) * free).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = torch.clamp(base + (h() >= 0.5).float(), lo, hi) + z

        def err(qq):
            return float(((layer.apply(xq, s * (qq - z), b) - y) ** 2).sum(1).mean())

        e_near = err(nearest)
        ratio_err = err(q) / e_near if e_near > 0 else 1.0
    if ratio_err > 1.0:  # never worse than nearest on the rows it learned from
        return nearest, 1.0
    return q, ratio_err


# --- running the graph node by node -------------------------------------------------------


def _fake_quant(x: torch.Tensor, p: QParams) -> torch.Tensor:
    q = ptq.quantize.default(x, p.scale, p.zero_point, p.qmin, p.qmax, p.torch_dtype)
    return ptq.dequantize.default(q, p.scale, p.zero_point)


def _eval(gm: fx.GraphModule, node: fx.Node, env: dict, inputs: tuple, placeholders: list,
          quantized: bool, weight: Optional[torch.Tensor] = None):
    """One node's value; observers are the identity (float) or fake-quantize (quantized)
    and never record; ``weight`` replaces a conv/linear's weight."""
    if node.op == "placeholder":
        return inputs[placeholders.index(node)]
    if node.op == "get_attr":
        return get_attr_value(gm, node)
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        if meta.observed_node(node) is not None:
            p = meta.get_qparams(node)
            return _fake_quant(args[0], p) if quantized and p is not None else args[0]
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if weight is not None:
        args = (args[0], weight) + tuple(args[2:])
    return node.target(*args, **kwargs)


def _sample_rows(layer: _Layer, xf: list, xq: list, per_batch: int, gen: torch.Generator):
    rf, rq = [], []
    for a, c in zip(xf, xq):
        rows_f = layer.rows(a)
        idx = torch.randperm(rows_f.shape[0], generator=gen)[:per_batch]
        rf.append(rows_f[idx])
        rq.append(rf[-1] if c is a else layer.rows(c)[idx])
    return torch.cat(rf).float(), torch.cat(rq).float()


def record_adaround(observed_gm: fx.GraphModule, data: Iterable[Any],
                    config: Optional[AdaRoundConfig] = None, *, progress: bool = False,
                    **options) -> int:
    """Learns the rounding of every quantized conv/linear; writes it on the node's meta.

    Args:
        observed_gm: a calibrated graph (after ``prepare`` and ``calibrate``); not modified.
        data: input batches (the calibration data).
        config: an :class:`AdaRoundConfig`, or its fields as keyword ``options``.
        progress: a tqdm bar over the layers.

    Returns the number of layers recorded.

    Raises:
        NotCalibratedError: a layer's input observer has no qparams (names the layer).
        ValueError: no quantized conv/linear in the graph, or no data.
    """
    if config is not None and options:
        raise TypeError("record_adaround: pass a config or keyword options, not both")
    cfg = config or AdaRoundConfig(**options)
    gm = observed_gm
    batches = [_as_args(b) for b in data]
    if not batches:
        raise ValueError("adaround: the data yielded zero batches")
    layers = [n for n in _layers(gm) if n.args[1].op == "get_attr"]
    if not layers:
        raise ValueError("adaround: the graph has no quantized conv/linear with a constant "
                         "weight: run ptqpasses.prepare and calibrate first")
    plans = {n: _Layer(gm, n) for n in layers}  # (an uncalibrated graph fails here)
    quantized = cfg.inputs == "quantized"
    gen = torch.Generator().manual_seed(cfg.seed)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    remaining = {n: len(n.users) for n in gm.graph.nodes}
    env_f: list[dict] = [{} for _ in batches]
    env_q: list[dict] = [{} for _ in batches] if quantized else env_f
    learned: dict[fx.Node, torch.Tensor] = {}
    bar = tqdm(total=len(layers), desc="adaround", unit="layer", disable=not progress)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            w_q = None
            if node in plans:
                layer = plans[node]
                x, b_node = node.args[0], _bias_node(node)
                xf, xq = [e[x] for e in env_f], [e[x] for e in env_q]
                rows_f, rows_q = _sample_rows(layer, xf, xq, -(-cfg.max_rows // len(batches)),
                                              gen)
                b = env_f[0][b_node].float() if isinstance(b_node, fx.Node) else None
                y = layer.apply(rows_f, layer.w, b)
                with torch.enable_grad():
                    q, rel = _learn(layer, rows_q, y, b, cfg, gen)
                learned[node] = q
                _, nearest, s, z, _, _ = layer.grid()
                w_q = s * (q - z)
                log.info("adaround %s: %d of %d weights rounded away from nearest; output "
                         "error %.3g x nearest's on the sampled rows", node.name,
                         int((q != nearest).sum()), q.numel(), rel)
                bar.update()
            for ef, eq, inputs in zip(env_f, env_q, batches):
                ef[node] = _eval(gm, node, ef, inputs, placeholders, False)
                if quantized:
                    eq[node] = _eval(gm, node, eq, inputs, placeholders, True, w_q)
            for inp in node.all_input_nodes:
                remaining[inp] -= 1
                if remaining[inp] == 0:
                    for ef, eq in zip(env_f, env_q):
                        ef.pop(inp, None)
                        eq.pop(inp, None)
    bar.close()
    for node, q in learned.items():
        meta.set_adaround_weight(node, q.to(plans[node].spec.torch_dtype))
    return len(learned)


# --- the pass -----------------------------------------------------------------------------


def _written_back(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    """``w`` with each weight whose integer differs from nearest moved to ``s * (q - z)``,
    inside its channel's range (so the range, and the scale taken from it, stay)."""
    shape = [-1] + [1] * (w.dim() - 1)
    s, z = scales.reshape(shape), zps.reshape(shape).float()
    nearest = (torch.round(w / s) + z).clamp(qmin, qmax)
    flat = w.reshape(w.shape[0], -1)
    moved = torch.minimum(torch.maximum(s * (q - z), flat.amin(1).reshape(shape)),
                          flat.amax(1).reshape(shape))
    return torch.where(q == nearest, w, moved)


@register_pass
class AdaRound(Pass):
    """Writes the integer weights :func:`record_adaround` learned into the float weights.

    Before::

        %conv = aten.conv2d(%obs, %w, %b)      # meta["ptq.adaround"] = q (int8, floor or
                                               # ceil of w / s per weight)
    After::

        %conv = aten.conv2d(%obs, %w_adaround, %b)   # w_adaround = s * (q - z) where q is
                                                     # not nearest, else w: converts to q
    """

    name = "adaround"

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for n in list(gm.graph.nodes):
            q = meta.adaround_weight(n)
            if q is None:
                continue
            meta.set_adaround_weight(n, None)
            spec = meta.get_qspec(n).weight if meta.get_qspec(n) is not None else None
            w = get_attr_value(gm, n.args[1]) if n.target in WEIGHTED else None
            if spec is None or w is None:
                raise ValueError(f"adaround: node {n.name!r} has recorded weights but is not a "
                                 "quantized conv/linear with a constant weight")
            w = w.detach().float()
            scales, zps = _grid(gm, n, w)
            qf = q.float()
            shape = [-1] + [1] * (w.dim() - 1)
            ratio = w / scales.reshape(shape) + zps.reshape(shape)
            qmin, qmax = spec.qrange
            down, up = ratio.floor().clamp(qmin, qmax), ratio.ceil().clamp(qmin, qmax)
            if q.shape != w.shape or not ((qf >= down) & (qf <= up)).all():
                raise ValueError(f"adaround: node {n.name!r}: the recorded integer weights are "
                                 "not a rounding of its current weights (changed since "
                                 "record_adaround?): record again")
            new_w = _written_back(w, qf, scales, zps, qmin, qmax)
            s2, z2 = _grid(gm, n, new_w)
            again = (torch.round(new_w / s2.reshape(shape)) + z2.reshape(shape)).clamp(qmin, qmax)
            if not (torch.equal(s2, scales) and torch.equal(z2, zps) and torch.equal(again, qf)):
                log.warning("adaround: node %r: conversion would not reproduce the learned "
                            "rounding (its weight grid moves); left at nearest rounding", n.name)
                continue
            args = list(n.args)
            args[1] = add_constant(gm, f"{n.name}_weight_adaround", new_w.to(w.dtype), n.args[1])
            n.args = tuple(args)
            modified = True
        if modified:
            remove_unused_attributes(gm)
        return modified


def adaround(observed_gm: fx.GraphModule, data: Iterable[Any],
             config: Optional[AdaRoundConfig] = None, *, progress: bool = False,
             **options) -> fx.GraphModule:
    """Learned weight rounding of a calibrated graph, in place (see the module docstring)."""
    record_adaround(observed_gm, data, config, progress=progress, **options)
    AdaRound()(observed_gm)
    return observed_gm


__all__ = ["AdaRound", "AdaRoundConfig", "adaround", "record_adaround"]
