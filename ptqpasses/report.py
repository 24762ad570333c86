"""Coverage (which nodes run as integer ops, which stay float and why) and per-node SQNR."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from ptqpasses import meta
from ptqpasses.calibrate import _as_args
from ptqpasses.capture import capture
from ptqpasses.opsets import in_coverage

ptq = torch.ops.ptq
_CONVERSIONS = {"quantize", "dequantize", "dequantize_per_channel", "requantize",
                "fake_quantize_per_token"}


@dataclass(frozen=True)
class CoverageEntry:
    node: str
    op: str
    integer: bool
    reason: str = ""
    where: str = ""  # module path and source line in the user's model (meta.location)


def _is_ptq(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "ptq"


def _ptq_name(node: fx.Node) -> str:
    return node.target._schema.name.split("::")[1]


def coverage(qgraph: fx.GraphModule) -> list[CoverageEntry]:
    """Every compute node of a lowered graph: integer op, or float with the reason."""
    out = []
    for node in qgraph.graph.nodes:
        if node.op != "call_function":
            continue
        if _is_ptq(node):
            if _ptq_name(node) not in _CONVERSIONS:
                spec = meta.get_qspec(node)
                rule = spec.reason if spec is not None and spec.float_output else ""
                out.append(CoverageEntry(node.name, f"ptq.{_ptq_name(node)}", True, rule,
                                         where=meta.location(node)))
        elif in_coverage(node) and meta.float_reason(node) is not None:
            out.append(CoverageEntry(node.name, str(node.target), False, meta.float_reason(node),
                                     meta.location(node)))
    return out


def float_nodes(qgraph: fx.GraphModule) -> list[CoverageEntry]:
    return [c for c in coverage(qgraph) if not c.integer]


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10 * math.log10(signal_power / noise_power)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    r, a = reference.detach().double(), approx.detach().double()
    return sqnr_db(float((r * r).sum()), float(((r - a) ** 2).sum()))


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        result = super().run_node(n)
        if n.name in self.wanted and isinstance(result, torch.Tensor):
            self.values[n.name] = result
        return result


@dataclass
class NodeSQNR:
    node: str
    op: str
    source: str
    sqnr_db: float
    precision: str = ""  # the integer type of the node's output (uint8, int8, int16), or
                         # how a float output is computed


@dataclass
class Report:
    nodes: list[NodeSQNR]
    coverage: list[CoverageEntry]
    output_sqnr_db: float
    batches: int = 0

    def worst(self, k: int = 10) -> list[NodeSQNR]:
        return sorted(self.nodes, key=lambda r: r.sqnr_db)[:k]

    def to_markdown(self) -> str:
        n_int = sum(c.integer for c in self.coverage)
        lines = [f"Output SQNR: {self.output_sqnr_db:.2f} dB over {self.batches} batches; "
                 f"{n_int}/{len(self.coverage)} compute nodes run as integer ops.", "",
                 "| node | op | float source | SQNR (dB) |", "|---|---|---|---:|"]
        lines += [f"| {r.node} | {r.op} | {r.source} | {r.sqnr_db:.2f} |" for r in self.nodes]
        floats = [c for c in self.coverage if not c.integer]
        if floats:
            lines += ["", "Nodes left in float:", "", "| node | op | where | reason |",
                      "|---|---|---|---|"]
            lines += [f"| {c.node} | {c.op} | {c.where} | {c.reason} |" for c in floats]
        return "\n".join(lines)

    __str__ = to_markdown

    def ranked_markdown(self, sensitivity: Optional[Iterable] = None, title: str = "") -> str:
        """The answer to "which layer breaks accuracy": nodes ranked by damage.

        Integer nodes are ranked by SQNR (lowest first); float nodes are listed with their
        reason. ``sensitivity`` (``ptqpasses.sensitivity.node_sensitivity`` rows, or a
        ``MixedPrecisionResult``) adds the score each node gets when it alone is quantized,
        and marks the nodes a mixed-precision search raised to float.
        """
        raised, alone = set(), {}
        if sensitivity is not None and hasattr(sensitivity, "sensitivity"):
            raised = {r.node for r in sensitivity.raised}
            sensitivity = sensitivity.sensitivity
        for r in sensitivity or ():
            alone[r.node] = r.score
            alone.setdefault(getattr(r, "output", "") or r.node, r.score)
        n_int = sum(c.integer for c in self.coverage)
        lines = ([f"## {title}", ""] if title else []) + [
            f"Output SQNR {self.output_sqnr_db:.2f} dB over {self.batches} batches; coverage "
            f"{n_int}/{len(self.coverage)} compute nodes as integer ops "
            f"({100.0 * n_int / max(1, len(self.coverage)):.0f}%).", "",
            "### Integer nodes, ranked by damage (lowest SQNR first)", "",
            "| rank | node | op | float source | precision | SQNR (dB) |"
            + (" alone-quantized score |" if alone else ""),
            "|---:|---|---|---|---|---:|" + ("---:|" if alone else "")]
        for i, r in enumerate(self.worst(len(self.nodes)), 1):
            extra = f" {alone[r.source]:.4g} |" if r.source in alone else (" - |" if alone else "")
            lines.append(f"| {i} | {r.node} | {r.op} | {r.source} | {r.precision or 'int'} | "
                         f"{r.sqnr_db:.2f} |" + extra)
        floats = [c for c in self.coverage if not c.integer]
        if floats:
            lines += ["", "### Nodes in float (not int8) and why", "",
                      "| node | op | precision | reason |", "|---|---|---|---|"]
            for c in floats:
                why = c.reason + (" (raised by mixed precision)" if c.node in raised else "")
                lines.append(f"| {c.node} | {c.op} | float32 | {why} |")
        return "\n".join(lines)

    def save_png(self, path, title: str = "", top: int = 40) -> None:
        """Bar chart of per-node SQNR, worst ``top`` nodes first (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("save_png needs matplotlib (pip install matplotlib, or the "
                              "'accuracy' extra)") from e
        rows = self.worst(top)
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
        ops = sorted({r.op for r in rows})
        colours = {op: plt.cm.tab10(i % 10) for i, op in enumerate(ops)}
        ax.barh(range(len(rows)), [max(r.sqnr_db, -10.0) for r in rows],
                color=[colours[r.op] for r in rows])
        ax.set_yticks(range(len(rows)), [f"{r.node} ({r.precision or 'int'})" for r in rows],
                    fontsize=7)
        ax.invert_yaxis()
        ax.axvline(self.output_sqnr_db, color="k", linestyle="--", linewidth=1,
                   label=f"model output {self.output_sqnr_db:.1f} dB")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[op]) for op in ops]
        ax.legend(handles + ax.get_legend_handles_labels()[0],
                  ops + ax.get_legend_handles_labels()[1], fontsize=7, loc="lower right")
        n_int = sum(c.integer for c in self.coverage)
        ax.set_xlabel("SQNR vs float (dB), worst first")
        ax.set_title((title + ": " if title else "") + f"{n_int}/{len(self.coverage)} compute "
                     "nodes integer", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, folder, name: str = "report", sensitivity=None, title: str = "") -> list:
        """Writes ``{name}.md`` (ranked by damage) and ``{name}.png``; returns the paths."""
        from pathlib import Path
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, png = folder / f"{name}.md", folder / f"{name}.png"
        md.write_text(self.ranked_markdown(sensitivity, title)
                      + f"\n\n![per-node SQNR]({png.name})\n")
        self.save_png(png, title)
        return [md, png]


def report(qgraph: fx.GraphModule, float_model: Any, data: Iterable[Any],
           **capture_options) -> Report:
    """Per-node SQNR of the integer graph against the float model on ``data``, and coverage.

    Args:
        qgraph: the lowered graph from ``convert``/``quantize``.
        float_model: the float ``nn.Module`` (captured here again, without batch-norm
            folding: folded convs are compared with the batch norm output they replace) or
            its captured GraphModule.
        data: input tuples.
        capture_options: for capturing ``float_model`` (``dynamic_dims=``, ...), as given
            to ``quantize``.
    """
    batches = [_as_args(b) for b in data]
    if not batches:
        raise ValueError("report needs at least one batch of data")
    fgm = float_model if isinstance(float_model, fx.GraphModule) else capture(
        float_model, batches[0], **capture_options)
    int_nodes = {n.name: n for n in qgraph.graph.nodes if _compared(n)}
    float_names = {n.name for n in fgm.graph.nodes}
    pairs = {name: meta.source(n) for name, n in int_nodes.items() if meta.source(n) in float_names}
    power = {name: [0.0, 0.0] for name in pairs}
    out_power = [0.0, 0.0]
    with torch.no_grad():
        for args in batches:
            frec = _Recorder(fgm, set(pairs.values()))
            f_out = frec.run(*args)
            qrec = _Recorder(qgraph, set(pairs))
            q_out = qrec.run(*args)
            for name, src in pairs.items():
                value, p = qrec.values[name], meta.get_qparams(int_nodes[name])
                deq = value if value.is_floating_point() else (  # (a float-output op)
                    value.to(torch.int32) - p.zero_point).float() * p.scale
                ref = frec.values[src].double()
                power[name][0] += float((ref * ref).sum())
                power[name][1] += float(((ref - deq.double()) ** 2).sum())
            for fo, qo in zip(_flat(f_out), _flat(q_out)):
                out_power[0] += float((fo.double() ** 2).sum())
                out_power[1] += float(((fo.double() - qo.double()) ** 2).sum())
    rows = [NodeSQNR(name, _op_label(int_nodes[name]), src, sqnr_db(*power[name]),
                     _precision(int_nodes[name])) for name, src in pairs.items()]
    return Report(rows, coverage(qgraph), sqnr_db(*out_power), len(batches))


def _compared(n: fx.Node) -> bool:
    """Whether the per-node SQNR covers ``n``: an integer op that is not a conversion (with
    an integer or a float output), or the bias add that completes a per-token linear (the
    float linear it stands for includes the bias)."""
    if meta.is_per_token_bias(n):
        return True
    if not _is_ptq(n) or _ptq_name(n) in _CONVERSIONS | {"quantize"}:
        return False
    if any(meta.is_per_token_bias(u) for u in n.users):
        return False  # (its bias add is compared)
    q = meta.get_qparams(n)
    return q is not None or _ptq_name(n) == "linear_dynamic" or (
        n.args and n.args[-1] == torch.float32)


def _op_label(n: fx.Node) -> str:
    if meta.is_per_token_bias(n):
        n = n.args[0]
    return f"ptq.{_ptq_name(n)}"


def _precision(n: fx.Node) -> str:
    """The integer type of ``n``'s output, or how its float output is computed."""
    if meta.is_per_token_bias(n) or _ptq_name(n) == "linear_dynamic":
        return "float32 (per-token uint8 in)"
    q = meta.get_qparams(n)
    return "float32" if q is None else q.dtype


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _flat(item)]
    return []
