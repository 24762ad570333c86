"""Sensitivity analysis and automatic mixed precision.

Everything here works on the *float* captured graph (after FoldBatchNorm and any
equalization pass, before Annotate) and a QuantConfig. Calibration runs once: the qparams
of every observed value are kept by the name of the node they observe, and each candidate
precision assignment is built by re-annotating a copy of the float graph with more nodes in
``keep_float``, inserting observers, copying the calibrated qparams in, and converting to
the QDQ reference graph. So a candidate is scored with exactly the quantize/dequantize
pairs its real integer graph will have (an output stays quantized when an int8 consumer asks
for it), without re-calibrating.

    sens = node_sensitivity(fgm, calib, evals, config)             # ranked, most damaging first
    amp = AutoMixedPrecision(target=30.0)                           # output SQNR >= 30 dB
    result = amp.search(fgm, calib, evals, config)
    q = ptqpasses.quantize(fgm, calib[0], calib, result.config)     # the mixed-precision graph
    print(result.to_markdown())

Precision raise: the node runs in float (``keep_float``), or stays an integer op with int16
activations (``raise_to="int16"``: a ``by_node_regex`` Scheme; the reference ops accumulate in
int64 for int16 operands).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.meta import Role
from ptqpasses.calibrate import _as_args, calibrate, observers
from ptqpasses.config import QuantConfig, Scheme
from ptqpasses.passes import Annotate, ConvertToQDQ, FoldBatchNorm, InsertObservers
from ptqpasses.report import _flat, sqnr_db

#: ``metric(float_outputs, quantized_outputs) -> score``, higher is better; both are lists
#: with one model output per evaluation batch.
Metric = Callable[[list, list], float]


def output_sqnr(ref: list, out: list) -> float:
    """Default metric: SQNR (dB) of all model outputs over all batches."""
    s = n = 0.0
    for r, o in zip(ref, out):
        for a, b in zip(_flat(r), _flat(o)):
            a, b = a.double(), b.double()
            s += float((a * a).sum())
            n += float(((a - b) ** 2).sum())
    return sqnr_db(s, n)


class _Evaluator:
    """Builds and scores the QDQ graph for a set of float nodes, sharing one calibration."""

    def __init__(self, float_gm: fx.GraphModule, calib: Iterable[Any], evals: Iterable[Any],
                 config: QuantConfig, metric: Metric, raise_to: str = "float",
                 observed: Optional[fx.GraphModule] = None, reference: Optional[list] = None):
        """``observed``: the graph ``config`` prepares, already calibrated on ``calib`` (read,
        not changed), saving a calibration; ``reference``: the float outputs on ``evals``."""
        if raise_to not in ("float", "int16"):
            raise ValueError(f"raise_to must be 'float' or 'int16', got {raise_to!r}")
        self.raise_to = raise_to
        self.float_gm = copy.deepcopy(float_gm)
        FoldBatchNorm()(self.float_gm)
        self.calib = [_as_args(b) for b in calib]
        self.evals = [_as_args(b) for b in evals]
        self.config, self.metric = config, metric
        if reference is None:
            with torch.no_grad():
                reference = [self.float_gm(*b) for b in self.evals]
        self.reference = reference
        if observed is None:
            observed = self._observed(config)
            calibrate(observed, self.calib, progress=False, distributed=False)
        self.observed = observed  # calibrated: qparams on every observer node
        self.stats = {meta.observed_node(n): ob for n, ob in observers(observed)}
        self.compute = [n.name for n in observed.graph.nodes
                        if getattr(meta.get_qspec(n), "role", None) == Role.COMPUTE]
        self.output_of = {c: c for c in self.compute}  # the node whose value c's op produces
        for n in observed.graph.nodes:
            q = meta.get_qspec(n)
            if q is not None and q.role == Role.FUSED and q.fused_into in self.output_of:
                self.output_of[q.fused_into] = n.name
        by_name = {n.name: n for n in observed.graph.nodes}
        self.inputs_of = {c: _observed_inputs(by_name, c) for c in self.compute}
        self.evaluations = 0

    def _observed(self, config: QuantConfig) -> fx.GraphModule:
        gm = copy.deepcopy(self.float_gm)
        Annotate(config)(gm)
        InsertObservers()(gm)
        return gm

    def with_float(self, names: Iterable[str]) -> QuantConfig:
        """The config with ``names`` raised (to float, or to int16 activations)."""
        names = tuple(names)
        if self.raise_to == "int16":
            if not names:
                return self.config
            # a node's input is quantized by the spec of the node that produces it: raise
            # the producers of its observed inputs too (a node's activations, both sides)
            names = tuple(dict.fromkeys(
                m for n in names for m in (n, *self.inputs_of.get(n, ()))))
            act = dataclasses.replace(self.config.activation.static(), dtype="int16",
                                      symmetric=True)
            pattern = "|".join(re.escape(n) for n in names)
            return dataclasses.replace(self.config, by_node_regex={
                pattern: Scheme(act, self.config.weight), **self.config.by_node_regex})
        keep = tuple(dict.fromkeys(tuple(self.config.keep_float) + names))
        return dataclasses.replace(self.config, keep_float=keep)

    def build(self, float_nodes: Iterable[str]) -> fx.GraphModule:
        gm = self._observed(self.with_float(float_nodes))
        obs = observers(gm)
        if not obs:
            return gm  # nothing quantized: the graph computes in float
        missing = False
        for node, ob in obs:
            stats = self.stats.get(meta.observed_node(node))
            if stats is None or stats.kind != ob.kind:
                missing = True
                continue
            # the same statistics, turned into qparams for this node's (maybe int16) spec
            meta.set_qparams(node, stats.qparams(meta.get_qspec(node).output))
        if missing:  # a value observed only under this assignment: calibrate this graph
            calibrate(gm, self.calib, progress=False, distributed=False)
        return ConvertToQDQ()(gm).graph_module

    def score(self, float_nodes: Iterable[str]) -> float:
        gm = self.build(float_nodes)
        self.evaluations += 1
        with torch.no_grad():
            out = [gm(*b) for b in self.evals]
        return float(self.metric(self.reference, out))


def _observed_inputs(by_name: dict[str, fx.Node], name: str) -> tuple[str, ...]:
    """Names of the compute nodes whose observed outputs ``name`` reads (through share-only
    nodes such as views): the nodes whose output spec quantizes its inputs."""
    node = by_name[name]
    out = []
    for a in node.all_input_nodes:
        while a.op != "call_module":
            q = meta.get_qspec(a)
            if q is None or q.role != Role.SHARE or not a.all_input_nodes:
                break
            a = a.all_input_nodes[0]
        if a.op == "call_module" and meta.observed_node(a) is not None:
            producer = by_name[meta.observed_node(a)]
            q = meta.get_qspec(producer)
            if producer.op == "call_function" and q is not None \
                    and q.role in (Role.COMPUTE, Role.FUSED):
                out.append(q.fused_into if q.role == Role.FUSED else producer.name)
    return tuple(out)


@dataclass
class NodeSensitivity:
    """Score of the model when ``node`` alone is quantized (everything else float)."""

    node: str
    op: str
    score: float
    output: str = ""  # node whose value the op produces (its fused activation, if any)


def _op_of(gm: fx.GraphModule, name: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == name)
    return getattr(node.target, "__name__", str(node.target))


def node_sensitivity(float_gm: fx.GraphModule, calib: Iterable[Any], evals: Iterable[Any],
                     config: Optional[QuantConfig] = None, *,
                     metric: Metric = output_sqnr) -> list[NodeSensitivity]:
    """Scores the model with each compute node alone quantized; most damaging first.

    Args:
        float_gm: captured float graph (``ptqpasses.capture``), not annotated.
        calib: calibration batches; evals: evaluation batches.
        config: the quantization config (its keep_float stays float throughout).
        metric: ``metric(float_outputs, quantized_outputs)``, higher is better; output SQNR
            in dB by default.
    """
    ev = _Evaluator(float_gm, calib, evals, config or QuantConfig(), metric)
    return _sensitivity(ev)


def _sensitivity(ev: _Evaluator) -> list[NodeSensitivity]:
    rows = []
    for name in ev.compute:
        others = [n for n in ev.compute if n != name]
        rows.append(NodeSensitivity(name, _op_of(ev.float_gm, name), ev.score(others),
                                    ev.output_of[name]))
    return sorted(rows, key=lambda r: r.score)


@dataclass
class MixedPrecisionResult:
    """What AutoMixedPrecision changed and what it achieved."""

    config: QuantConfig                   # the input config + keep_float for the raised nodes
    raised: list[NodeSensitivity]         # nodes moved to float, most damaging first
    sensitivity: list[NodeSensitivity]    # every compute node, most damaging first
    score_int8: float                     # metric with every compute node quantized
    score: float                          # metric with the raised nodes in float
    target: float
    evaluations: int = 0
    compute_nodes: int = 0
    raise_to: str = "float"

    @property
    def met(self) -> bool:
        return self.score >= self.target

    def to_markdown(self) -> str:
        lines = [f"Mixed precision: score {self.score_int8:.4g} (all int8) -> {self.score:.4g} "
                 f"with {len(self.raised)}/{self.compute_nodes} compute nodes in {self.raise_to}; "
                 f"target {self.target:.4g} {'met' if self.met else 'NOT met'} "
                 f"({self.evaluations} evaluations).", "",
                 "| node raised | op | score when alone quantized |", "|---|---|---:|"]
        lines += [f"| {r.node} | {r.op} | {r.score:.4g} |" for r in self.raised]
        return "\n".join(lines)

    __str__ = to_markdown


@dataclass(frozen=True)
class AutoMixedPrecision:
    """Raises the most sensitive nodes to float until the model meets ``target``.

    Nodes are ranked by the metric when each alone is quantized (:func:`node_sensitivity`);
    the search finds the shortest prefix of that ranking whose float execution meets the
    target (doubling, then bisection: ~2 log2(N) evaluations after the N of the ranking).

    Attributes:
        target: the minimum acceptable metric (dB of output SQNR by default).
        metric: ``metric(float_outputs, quantized_outputs)``, higher is better.
        max_drop: alternatively, the allowed drop from the float model's own metric value
            (``metric(ref, ref)``); overrides ``target`` when set.
        raise_to: ``"float"`` (the node runs in float: ``keep_float``) or ``"int16"`` (the
            node stays an integer op with int16 activations for its output and for inputs
            it observes itself: ``by_node_regex`` with an int16 Scheme).
    """

    target: float = 30.0
    metric: Metric = output_sqnr
    max_drop: Optional[float] = None
    raise_to: str = "float"

    def search(self, float_gm: fx.GraphModule, calib: Iterable[Any], evals: Iterable[Any],
               config: Optional[QuantConfig] = None) -> MixedPrecisionResult:
        ev = _Evaluator(float_gm, calib, evals, config or QuantConfig(), self.metric,
                        self.raise_to)
        target = self.target
        if self.max_drop is not None:
            target = float(self.metric(ev.reference, ev.reference)) - self.max_drop
        ranking = _sensitivity(ev)
        order = [r.node for r in ranking]
        cache: dict[int, float] = {}

        def score(k: int) -> float:
            if k not in cache:
                cache[k] = ev.score(order[:k])
            return cache[k]

        k = 0
        if score(0) < target:
            lo, hi = 0, 1
            while hi < len(order) and score(hi) < target:
                lo, hi = hi, min(2 * hi, len(order))
            while hi - lo > 1:  # score(lo) < target, score(hi) >= target (or hi == N)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if score(mid) >= target else (mid, hi)
            k = hi
        return MixedPrecisionResult(ev.with_float(order[:k]), ranking[:k], ranking, score(0),
                                    score(k), target, ev.evaluations, len(order), self.raise_to)


__all__ = ["AutoMixedPrecision", "MixedPrecisionResult", "NodeSensitivity", "node_sensitivity",
           "output_sqnr"]
