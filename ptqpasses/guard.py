"""The accuracy guard: ``quantize`` checks its own result and raises precision where it must.

``quantize`` sets aside the last slice of the calibration batches (:attr:`Guard.holdout`),
calibrates on the rest, and compares the integer graph's outputs with the float model's on
the slice set aside:

* output SQNR (dB) over every float output of every held-out batch, and
* the smallest per-sample cosine similarity (each output flattened per sample: dimension 0 is
  the batch), which is what matters for embeddings; outputs with fewer than 16 values per
  sample (class scores, boxes) are judged by the SQNR alone.

Where either is below its floor (defaults 20 dB / 0.99), the compute nodes are ranked by the
damage each does alone (the score with only that node quantized, as
:func:`ptqpasses.node_sensitivity`) per MAC it costs to raise (:func:`damage_per_cost`: the
most harmful first, unless others about as harmful are much cheaper), and the shortest prefix
of that ranking (less the nodes the floor turns out not to need) is raised, first
to int16 activations (the node stays an integer op), and, if even every ranked node at int16
misses the floor, to float (``keep_float``). Candidates are scored on the QDQ graph with one
shared calibration; the plan chosen is then built for real and measured again, and that
measurement is what the report gives. The search stops after :attr:`Guard.max_plans` candidate
plans, or at :attr:`Guard.budget_s` seconds, a safety net (it keeps
the best plan found so far and says so).

The graph returned is the one the guard measured: calibrated on the batches not set aside.
It carries a :class:`GuardReport` in ``gm.meta["ptq.guard"]``; the report is printed when
the guard changed the plan or could not meet the floor (and, with ``progress=True``, also
when the default plan met it), and a failure to meet the floor also warns.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.meta import Role
from ptqpasses.calibrate import _as_args, calibrate, observers
from ptqpasses.config import QuantConfig
from ptqpasses.observer_base import weight_qparams
from ptqpasses.opsets import VIEWS
from ptqpasses.report import _flat, sqnr_db
from ptqpasses.sensitivity import NodeSensitivity, _Evaluator, _op_of

GUARD_KEY = "ptq.guard"  # gm.meta: the GuardReport of the quantize call that made gm


#: The per-sample cosine is taken of outputs with at least this many values per sample
#: (embeddings, hidden states, logits over many classes); for fewer (two class scores, a
#: box) it is ill-conditioned, and only the SQNR judges them.
EMBEDDING_MIN_DIM = 16


@dataclass(frozen=True)
class Score:
    """How close the integer graph's outputs are to the float model's."""

    sqnr_db: float
    cosine: float  # smallest per-sample cosine similarity over all float outputs

    def __str__(self) -> str:
        return f"{self.sqnr_db:.1f} dB, min cosine {self.cosine:.4f}"


def score_outputs(reference: list, outputs: list) -> Score:
    """SQNR over all float outputs and batches, and the smallest per-sample cosine of the
    outputs with at least :data:`EMBEDDING_MIN_DIM` values per sample (1.0 if none)."""
    signal = noise = 0.0
    cos = 1.0
    for ref, out in zip(reference, outputs):
        for r, o in zip(_flat(ref), _flat(out)):
            if not r.is_floating_point():
                continue  # ids, masks, shapes: not a quantization result
            r, o = r.detach().double(), o.detach().double()
            signal += float((r * r).sum())
            noise += float(((r - o) ** 2).sum())
            if r.numel() == 0:
                continue
            rows = (r.reshape(r.shape[0], -1), o.reshape(o.shape[0], -1)) if r.dim() >= 2 \
                else (r.reshape(1, -1), o.reshape(1, -1))
            if rows[0].shape[1] < EMBEDDING_MIN_DIM:
                continue  # class scores, boxes: SQNR judges them, a cosine of 2-4 values not
            c = torch.nn.functional.cosine_similarity(*rows, dim=1, eps=1e-30)
            both_zero = (rows[0].abs().sum(1) == 0) & (rows[1].abs().sum(1) == 0)
            c = torch.where(both_zero, torch.ones_like(c), c)
            cos = min(cos, float(c.min()))
    return Score(sqnr_db(signal, noise), cos)


@dataclass(frozen=True)
class Guard:
    """Floors and limits of the accuracy guard (``quantize(..., guard=Guard(...))``).

    Attributes:
        sqnr_db: floor on output SQNR in dB (None: not checked).
        cosine: floor on the smallest per-sample cosine of the outputs (None: not checked).
        holdout: fraction of the calibration batches set aside to judge the result (at least
            one batch; with a single batch there is nothing to set aside and the guard judges
            on the calibration batch itself, which the report says).
        max_plans: candidate plans the search may score (the deterministic limit: the same
            model and data give the same plan on a busy machine and an idle one).
        sim_margin_db: the margin a plan must have in the QDQ simulation (which runs float
            kernels between the quantize/dequantize pairs) for the guard to build it; when
            the built integer graph still misses the floor, the search runs again asking
            the simulation for that shortfall plus 1 dB more.
        budget_s: wall-clock seconds the search (ranking and plans) may take, a safety net
            for very large models; past either limit the guard keeps the best plan found
            and reports which limit stopped it.
        steps: precision raises tried in order: ``"int16"`` (int16 activations, still an
            integer op) then ``"float"``.
        rank_samples: held-out samples the damage ranking runs on (one forward pass per
            compute node each); the candidate plans are scored on every held-out batch.
        refit: once the plan is chosen, calibrate the graph returned on every batch, the
            ones set aside included (as cross-validation refits on all the data); False:
            return the graph that was judged, calibrated without them.
    """

    sqnr_db: Optional[float] = 20.0
    cosine: Optional[float] = 0.99
    holdout: float = 0.25
    max_plans: int = 24
    sim_margin_db: float = 0.5
    budget_s: float = 600.0
    steps: tuple[str, ...] = ("int16", "float")
    refit: bool = True
    rank_samples: int = 8

    def __post_init__(self):
        if self.sqnr_db is None and self.cosine is None:
            raise ValueError("Guard needs a floor: sqnr_db, cosine or both")
        if self.cosine is not None and not -1.0 <= self.cosine < 1.0:
            raise ValueError(f"Guard.cosine must be in [-1, 1), got {self.cosine}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"Guard.holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.max_plans < 1:
            raise ValueError(f"Guard.max_plans must be >= 1, got {self.max_plans}")
        if self.rank_samples < 1:
            raise ValueError(f"Guard.rank_samples must be >= 1, got {self.rank_samples}")
        bad = [s for s in self.steps if s not in ("int16", "float")]
        if bad or not self.steps:
            raise ValueError(f"Guard.steps must be a non-empty sequence of 'int16' / 'float', "
                             f"got {self.steps!r}")

    def split(self, batches: list) -> tuple[list, list, bool]:
        """``(calibration, held_out, set_aside)``: the last ``holdout`` share is held out."""
        if len(batches) < 2:
            return batches, batches, False
        k = min(len(batches) - 1, max(1, round(len(batches) * self.holdout)))
        return batches[:-k], batches[-k:], True

    def margin(self, s: Score) -> float:
        """dB above the nearer floor (negative: below it). A cosine c counts as
        ``-10 log10(1 - c)`` dB, so both floors are on one scale."""
        m = math.inf
        if self.sqnr_db is not None:
            m = min(m, s.sqnr_db - self.sqnr_db)
        if self.cosine is not None:
            m = min(m, 10 * math.log10((1 - self.cosine) / max(1 - s.cosine, 1e-12)))
        return m

    def floor_text(self) -> str:
        parts = ([f"{self.sqnr_db:g} dB"] if self.sqnr_db is not None else []) + \
                ([f"min cosine {self.cosine:g}"] if self.cosine is not None else [])
        return " and ".join(parts)


@dataclass
class Raised:
    """A node the guard raised, and the evidence for it."""

    node: str
    op: str
    to: str               # "int16" or "float"
    alone_margin: float   # guard margin (dB) with only this node quantized
    where: str = ""       # module path and source line (meta.location)
    cost: int = 0         # MACs that read int16 once it is raised (raise_cost)


@dataclass
class GuardReport:
    """What the accuracy guard measured, and what it changed."""

    guard: Guard
    config: QuantConfig           # the plan returned (the input config where unchanged)
    calibrated: int               # the graph returned is calibrated on the first
                                  # ``calibrated`` batches given (all of them with refit)
    batches: int                  # batches the result was judged on (the last ``batches``)
    set_aside: bool               # False: judged on the calibration batch itself
    before: Score                 # the default plan, as built
    after: Score                  # the plan returned, as built
    raised: list[Raised] = field(default_factory=list)
    evaluations: int = 0          # candidate plans scored (QDQ graphs)
    elapsed_s: float = 0.0
    out_of_budget: bool = False
    compute_nodes: int = 0
    raised_share: float = 0.0     # share of the compute MACs that read a raised activation

    @property
    def changed(self) -> bool:
        return bool(self.raised)

    @property
    def met(self) -> bool:
        return self.guard.margin(self.after) >= 0

    def to_markdown(self) -> str:
        judged = (f"{self.batches} held-out calibration batch{'es' if self.batches > 1 else ''}"
                  if self.set_aside else
                  "the only calibration batch (nothing to set aside: pass 2+ batches)")
        head = (f"Accuracy guard (floor {self.guard.floor_text()}, judged on {judged}): "
                f"default plan {self.before}")
        if not self.changed:
            verdict = "floor met, plan unchanged" if self.met else "floor NOT met"
            lines = [f"{head}; {verdict}."]
        else:
            counts = {to: sum(r.to == to for r in self.raised) for to in ("int16", "float")}
            what = ", ".join(f"{n} to {to}" for to, n in counts.items() if n)
            share = (f" ({100 * self.raised_share:.0f}% of their MACs reading a raised "
                     "activation)") if self.raised_share else ""
            lines = [f"{head}; raised {what} of {self.compute_nodes} compute nodes{share} -> "
                     f"{self.after}; floor {'met' if self.met else 'NOT met'} "
                     f"({self.evaluations} candidate plans, {self.elapsed_s:.1f} s).", "",
                     "| node | op | raised to | margin when alone quantized (dB) | where |",
                     "|---|---|---|---:|---|"]
            lines += [f"| {r.node} | {r.op} | {r.to} | {r.alone_margin:.1f} | {r.where} |"
                      for r in self.raised]
        if self.guard.refit and self.set_aside:
            lines.append(f"The graph returned is calibrated on all {self.calibrated} batches "
                         "(refit); the scores above are of the same plan calibrated without "
                         "the held-out ones.")
        if self.out_of_budget:
            lines.append(f"The search stopped at its limit ({self.guard.max_plans} plans, "
                         f"{self.guard.budget_s:g} s); the best plan found is kept (raise "
                         "Guard.max_plans / budget_s to search further).")
        if not self.met:
            lines.append("The floor is not met: see ptqpasses.report(...) for per-node SQNR, "
                         "or quantize with a recipe / keep_float for the nodes at fault.")
        return "\n".join(lines)

    __str__ = to_markdown


def run_guard(guard: Guard, float_gm: fx.GraphModule, config: QuantConfig, batches: list,
              prepare: Callable[[QuantConfig], fx.GraphModule],
              convert: Callable[[fx.GraphModule], fx.GraphModule], *,
              progress: bool = True) -> fx.GraphModule:
    """Quantizes ``float_gm`` (the captured float graph, not annotated) with ``config`` and
    guards the result: ``prepare(plan)`` annotates a copy and inserts observers,
    ``convert(observed)`` lowers it.
    """
    start = time.perf_counter()
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise ValueError("quantize needs at least one calibration batch")
    calib, held, set_aside = guard.split(batches)
    refit = guard.refit and set_aside
    with torch.no_grad():
        reference = [float_gm(*b) for b in held]

    def build(plan: QuantConfig) -> tuple[fx.GraphModule, fx.GraphModule]:
        observed = prepare(plan)
        if observers(observed):  # (a plan that raised every node to float observes nothing)
            calibrate(observed, calib, progress=progress, distributed=False)
        return observed, convert(copy.deepcopy(observed))

    def measure(gm: fx.GraphModule) -> Score:
        with torch.no_grad():
            return score_outputs(reference, [gm(*b) for b in held])

    observed, q = build(config)
    base = observed  # calibrated under ``config``: what every search ranks and scores from
    before = measure(q)
    rep = GuardReport(guard, config, len(calib), len(held), set_aside, before, before)
    target, start_search, kept = guard.sim_margin_db, time.perf_counter(), []
    while guard.margin(rep.after) < 0:
        plan, raised, evaluations, rep.out_of_budget, rep.compute_nodes, share = _search(
            guard, float_gm, config, calib, held, start_search, base, reference, target,
            guard.max_plans - rep.evaluations)
        rep.evaluations += evaluations
        if not raised or any(p == plan for p in kept):
            break
        kept.append(plan)
        cand_observed, candidate = build(plan)
        after = measure(candidate)
        if guard.margin(after) > guard.margin(rep.after):
            observed, q, rep.after, rep.config, rep.raised, rep.raised_share = (
                cand_observed, candidate, after, plan, raised, share)
        if rep.out_of_budget or guard.margin(after) >= 0:
            break
        # the QDQ simulation promised more than the integer graph gave: ask it for more
        target += 1.0 - guard.margin(after)
    if refit and observers(observed):  # the same observers go on to see the held-out batches
        calibrate(observed, held, progress=False, distributed=False)
        q, rep.calibrated = convert(observed), len(batches)
    _mark_raised(q, rep.raised, guard, before)
    rep.elapsed_s = time.perf_counter() - start
    q.meta[GUARD_KEY] = rep
    if rep.changed or not rep.met or progress:
        print(rep.to_markdown(), file=sys.stderr)
    if not rep.met:
        warnings.warn(f"quantize: the accuracy guard could not meet its floor "
                      f"({guard.floor_text()}): {rep.after}", stacklevel=3)
    return q


def _search(guard: Guard, float_gm: fx.GraphModule, config: QuantConfig, calib: list,
            held: list, start: float, observed: fx.GraphModule, reference: list,
            target: float, max_plans: int
            ) -> tuple[QuantConfig, list[Raised], int, bool, int, float]:
    """The shortest prefix of the ranking (:func:`damage_per_cost`) whose raise meets the
    floor by ``target`` dB in the QDQ simulation, less the nodes it meets the floor without
    (tried the most costly first, while plans are left), scoring at most ``max_plans``
    plans."""
    ev = _Evaluator(float_gm, calib, held, config,
                    lambda ref, out: guard.margin(score_outputs(ref, out)),
                    observed=observed, reference=reference)
    few = _first_samples(held, guard.rank_samples)  # the ranking needs only relative damage
    with torch.no_grad():
        few_reference = [ev.float_gm(*b) for b in few]

    def out_of_time() -> bool:
        return time.perf_counter() - start > guard.budget_s or ev.evaluations >= max_plans

    ranking: list[NodeSensitivity] = []
    alone = _Alone(ev.observed)
    for name in ev.compute:
        if out_of_time():
            break
        with torch.no_grad():
            out = [alone.run_with(name, b) for b in few]
        ranking.append(NodeSensitivity(name, _op_of(ev.float_gm, name),
                                       guard.margin(score_outputs(few_reference, out)),
                                       ev.output_of[name]))
    nodes = {n.name: n for n in ev.float_gm.graph.nodes}
    readers = {r.node: _int16_readers(nodes[r.node], [nodes[p] for p in
                                                      ev.inputs_of.get(r.node, ()) if p in nodes])
               for r in ranking}
    cost = {name: sum(node_cost(n) for n in rs.values()) for name, rs in readers.items()}
    ranking.sort(key=lambda r: (-damage_per_cost(r.score, cost[r.node]), r.score))
    order = [r.node for r in ranking]
    met: Optional[tuple[str, int]] = None
    tried: list[tuple[float, str, int]] = []  # (margin, step, k) of every candidate scored
    for step in guard.steps if order else ():
        ev.raise_to = step
        cache: dict[int, float] = {}

        def score(k: int) -> float:
            if k not in cache:
                cache[k] = ev.score(order[:k])
                tried.append((cache[k], step, k))
            return cache[k]

        lo, hi, k = 0, None, 1  # doubling, then bisection: score(lo) < target <= score(hi)
        while not out_of_time():
            k = min(k, len(order))
            if score(k) >= target:
                hi = k
                break
            if k == len(order):
                break
            lo, k = k, 2 * k
        while hi is not None and hi - lo > 1 and not out_of_time():
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if score(mid) >= target else (mid, hi)
        if hi is not None:
            met = (step, hi)
            break
        if out_of_time():
            break
    if met is not None:
        step, k = met
    elif tried:  # the floor is out of reach: the best plan scored
        _, step, k = max(tried, key=lambda t: (t[0], -t[2]))
    else:
        step, k = guard.steps[0], 0
    ev.raise_to = step
    chosen = order[:k]
    if met is not None:  # drop what the floor does not need, the most costly node first
        margin_of = {r.node: r.score for r in ranking}
        for name in sorted(chosen, key=lambda n: (-cost[n], -margin_of[n])):
            if len(chosen) < 2 or out_of_time():
                break
            trial = [n for n in chosen if n != name]
            if ev.score(trial) >= target:
                chosen = trial
    plan = ev.with_float(chosen)
    raised = [Raised(r.node, r.op, step, r.score, meta.location(nodes[r.node]), cost[r.node])
              for r in ranking if r.node in chosen]
    limited = len(ranking) < len(ev.compute) or (met is None and out_of_time())
    total = sum(node_cost(nodes[name]) for name in ev.compute)
    touched = {k: n for name in chosen for k, n in readers[name].items()}
    share = sum(node_cost(n) for n in touched.values()) / total if total else 0.0
    return plan, raised, ev.evaluations, limited, len(ev.compute), share


def node_cost(node: fx.Node) -> int:
    """What raising ``node`` costs at run time, in multiply-accumulates: conv / linear /
    matmul their MACs (output elements x reduction length, from the shapes capture
    recorded), any other node its output elements (one table lookup or add each); 1 where
    the shapes are unknown."""
    def numel(v) -> int:
        shape = getattr(v, "shape", None)
        return math.prod(int(d) for d in shape) if shape is not None else 0

    def known(v) -> bool:
        return getattr(v, "shape", None) is not None and all(
            isinstance(d, int) or hasattr(d, "node") and d.node.hint is not None
            for d in v.shape)

    out = node.meta.get("val")
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    try:
        n_out = numel(out) if known(out) else 0
        op = getattr(node.target, "__name__", "")
        ins = [a.meta.get("val") for a in node.args if isinstance(a, fx.Node)]
        if op.startswith(("conv", "linear")) and len(ins) >= 2 and known(ins[1]):
            w = ins[1].shape  # (reduction: in channels per group x kernel, or in features)
            return max(1, n_out * math.prod(int(d) for d in w[1:]))
        if op.startswith(("matmul", "bmm")) and ins and known(ins[0]):
            return max(1, n_out * int(ins[0].shape[-1]))
        return max(1, n_out)
    except (TypeError, ValueError):  # (symbolic sizes without hints)
        return 1


def raise_cost(node: fx.Node, producers: list[fx.Node]) -> int:
    """What raising ``node`` to int16 costs: the MACs of the kernels that then read an int16
    activation. Its scheme makes its output int16 and, through the producers of its inputs
    (raised with it), its inputs: so ``node`` itself and every compute node reading the output
    of ``node`` or of one of those producers (through shape-only ops; other readers count
    their output elements), each by
    :func:`node_cost`. (Raising the GELU in front of a transformer's FFN output projection
    costs that projection's MACs, not a table lookup's.)"""
    return sum(node_cost(n) for n in _int16_readers(node, producers).values())


def _int16_readers(node: fx.Node, producers: list[fx.Node]) -> dict[str, fx.Node]:
    """``node`` and the nodes reading its output or its producers' (shape-only ops looked
    through): what reads a raised activation (raise_cost)."""
    readers: dict[str, fx.Node] = {node.name: node}
    stack = [node, *producers]
    while stack:
        for user in stack.pop().users:
            if user.op != "call_function":
                continue
            if user.target in VIEWS:
                stack.append(user)
            else:
                readers.setdefault(user.name, user)
    return readers


def damage_per_cost(margin_db: float, cost: int) -> float:
    """The ranking key of a node (larger: raised first): the output noise power it adds when
    it alone is quantized, relative to the floor's (``10^(-margin/10)``: quantization noise
    of the nodes adds up in power), per MAC it costs to raise. So the node that does the most
    harm comes first unless others of comparable harm are much cheaper to raise: the shortest
    prefix meeting the floor then raises few MACs, not just few nodes."""
    if math.isinf(margin_db):
        return 0.0 if margin_db > 0 else math.inf
    return 10.0 ** (-margin_db / 10.0) / max(cost, 1)


def _first_samples(batches: list, n: int) -> list:
    """At most ``n`` samples of ``batches``: whole batches, the last one cut along dimension
    0 (the batch dimension every tensor input shares; batches whose tensors disagree on it
    are kept whole)."""
    out, left = [], n
    for b in batches:
        sizes = {t.shape[0] for t in b if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(sizes) != 1:
            out.append(b)
            continue
        size = sizes.pop()
        out.append(b if size <= left else tuple(
            t[:left] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in b))
        left -= min(size, left)
        if left <= 0:
            break
    return out


def _fake_quant(x: torch.Tensor, p) -> torch.Tensor:
    return (torch.round(x / p.scale) + p.zero_point).clamp(p.qmin, p.qmax).sub(
        p.zero_point).mul(p.scale).to(x.dtype)


class _Alone(fx.Interpreter):
    """Runs the calibrated observed graph in float with only one node quantized: its
    activation inputs (and its output, where an observer watches it) rounded to their
    calibrated qparams, its weight to the weight spec's grid. One forward pass per node
    instead of a QDQ graph built per node: the damage ranking, not the plan's score."""

    def __init__(self, observed: fx.GraphModule):
        super().__init__(observed)
        self.target: Optional[str] = None

    def run_with(self, name: str, args: tuple):
        self.target = name
        return self.run(*args)

    def call_module(self, target, args, kwargs):
        return args[0]  # observers: identity, statistics untouched

    def _qparams(self, n: Any):
        """Calibrated qparams of the value ``n`` (through share-only nodes), or None."""
        while isinstance(n, fx.Node):
            if n.op == "call_module":
                return meta.get_qparams(n)
            q = meta.get_qspec(n)
            if q is None or q.role != Role.SHARE or not n.args:
                return None
            n = n.args[0]
        return None

    def run_node(self, n: fx.Node):
        if n.name != self.target:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        for i, a in enumerate(n.args):
            p = self._qparams(a)
            if p is not None and isinstance(args[i], torch.Tensor) and args[i].is_floating_point():
                args[i] = _fake_quant(args[i], p)
        spec = meta.get_qspec(n)
        if spec is not None and spec.dynamic:  # a per-token linear: its input row by row
            args[0] = torch.ops.ptq.fake_quantize_per_token(args[0])
        if spec is not None and spec.weight is not None and len(args) > 1:
            w, ws = args[1], spec.weight
            scale, zp = weight_qparams(w, ws)
            shape = [-1 if d == (ws.axis if ws.per_channel else 0) else 1 for d in range(w.dim())]
            scale, zp = scale.reshape(shape), zp.reshape(shape).to(w.dtype)
            qmin, qmax = ws.qrange
            args[1] = ((torch.round(w / scale) + zp).clamp(qmin, qmax) - zp) * scale
        out = n.target(*args, **kwargs)
        p = next((meta.get_qparams(u) for u in n.users if u.op == "call_module"), None)
        return _fake_quant(out, p) if p is not None and isinstance(out, torch.Tensor) else out


def _mark_raised(q: fx.GraphModule, raised: list[Raised], guard: Guard, before: Score) -> None:
    """Coverage names the guard as the reason a raised node runs in float."""
    why = {r.node: r for r in raised if r.to == "float"}
    for n in q.graph.nodes:
        r = why.get(n.name) or why.get(meta.source(n))
        if r is not None and meta.float_reason(n) is not None:
            meta.set_float_reason(n, f"accuracy guard: {before} is below the floor "
                                     f"({guard.floor_text()}); this node alone quantized "
                                     f"leaves {r.alone_margin:+.1f} dB of margin")


__all__ = ["GUARD_KEY", "Guard", "GuardReport", "Raised", "Score", "run_guard", "score_outputs"]
