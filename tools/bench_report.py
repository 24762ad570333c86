"""The benchmark's report: ``bench.md`` (machine, peaks, one row per model, threads and peer)
and ``bench.png`` (speed against torch eager)."""

from __future__ import annotations

from pathlib import Path

from ptqpasses_tools.machine import peak_kernels
from ptqpasses_tools.tables import markdown_table

def _cells(r: dict, runs: int) -> list:
    """One row of the table: a measured peer, or a failed / skipped one with its status."""
    if r["status"] != "ok":
        return [r["model"], r["threads"], r["label"], r["status"], "", "", "", "", ""]
    if r["exact"]:
        acc = "exact"
    else:
        acc = f"{r['accuracy']:.4f}" if r["metric"] == "cosine" else f"{r['accuracy']:.1f} dB"
    return [r["model"], r["threads"], r["label"],
            f"{r['median_ms']:.2f}" + ("*" if r["runs"] < runs else ""),
            f"{r['vs_eager']:.2f}x" if r["vs_eager"] else "", f"{r['gmacs']:.1f}",
            f"{r['pct_peak']:.1f}%" if r["pct_peak"] is not None else "", acc,
            r["busy_threads"] or ""]


def to_markdown(result: dict) -> str:
    m, pk = result["machine"], result["peak"]
    lines = [f"Machine: {m['cpu']} ({m.get('llvm_cpu', '?')}), {m['cores']} cores, flags "
             f"{' '.join(m['flags']) or 'none'}; load average at start {m.get('loadavg')}.",
             f"ptqpasses host strategy: {m.get('strategy', '?')}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
             f"One-core peak (tools/peak.py): fp32 {pk.get('fp32') or 0:.1f} GMAC/s, int8 "
             f"{pk.get('int8') or 0:.1f} GMAC/s (every int8 instruction measured: "
             f"{peak_kernels(pk, 'int8')}); % of peak is against threads x the best.",
             f"Median of {result['args']['runs']} interleaved rounds after "
             f"{result['args']['warmup']} warm-up calls (peers slower than "
             f"{result['args']['slow_s']} s a call: {result['args']['slow_runs']} rounds, "
             "marked *); accuracy against fp32 on held-out "
             "inputs (SQNR dB; MiniLM: mean cosine of mean-pooled embeddings).", "",
             "Busy: OS threads that did >= 1/4 of the busiest thread's CPU work during the "
             "timed calls (checks that a peer really uses the threads it was given).", ""]
    lines += markdown_table(
        ["model", "thr", "peer", "median ms", "vs eager", "GMAC/s", "% peak", "accuracy", "busy"],
        (_cells(r, result["args"]["runs"]) for r in result["rows"]),
        right=["thr", "median ms", "vs eager", "GMAC/s", "% peak", "accuracy", "busy"])
    notes = {}
    for r in result["rows"]:
        if r["status"] != "ok":
            notes.setdefault(f"{r['model']}, {r['label']}", r["reason"])
    peers_used = {r["label"]: r["note"] for r in result["rows"] if r.get("note")}
    lines += ["", "Peers:"] + [f"- {k}: {v}" for k, v in peers_used.items()]
    if notes:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar chart: speed relative to torch eager, one panel per model and thread count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            groups.setdefault((r["model"], r["threads"]), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.35 * sum(len(g) for g in groups.values())
                                            + 1.1 * n), squeeze=False)
    for ax, ((model, threads), rows) in zip(axes[:, 0], groups.items()):
        vals = [r["vs_eager"] or 0.0 for r in rows]
        colors = ["tab:orange" if r["precision"] == "int8" else "tab:blue" for r in rows]
        ax.barh([r["label"] for r in rows], vals, color=colors)
        ax.axvline(1.0, color="grey", lw=0.8)
        if min(vals) > 0 and max(vals) / min(vals) > 30:
            ax.set_xscale("log")
        for i, r in enumerate(rows):
            ax.text(vals[i], i, f" {r['median_ms']:.2f} ms", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{model}, {threads} thread(s): speed vs torch eager (higher is faster; "
                     "blue fp32, orange int8)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
