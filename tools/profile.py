"""Where a compiled model's time goes: every kernel call of one inference, timed alone.

``python -m tools.profile --model minilm --config recipe`` (also ``ptq profile``) builds a bench
model (``tools.MODELS``) under a ptqpasses configuration (``defaults``, ``reduce_range``,
``recipe``), compiles it for the host with the fixed templates, and:

1. times whole calls of the compiled model (median, min);
2. runs it once with a ``relax.VirtualMachine`` instrument that records every PrimFunc call
   and a copy of its arguments as they were at the call (buffers are reused later, and float
   kernels are data dependent: denormals, masked softmax rows);
3. replays each call alone on its copied arguments (the minimum over several loops, each long
   enough to time) and prints the calls grouped by kind, with GMAC/s for the dot-product
   kernels, then the slowest calls.

Kinds: a ptq kernel's own (``ptq_conv2d3`` -> ``conv2d``); the functions TVM fused from the
glue and float islands by the op they are built around (``fused_softmax_...`` -> ``softmax``)
or else by their dtypes (float in, integer out: ``quantize``; all integer: ``integer glue``).
Replays run back to back, so each finds its weights in cache more often than inside the model;
the sum of replays is a little below the whole-model time. One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

#: Fused-function name fragments -> kind, first match wins (then the dtypes decide).
_GLUE_KINDS = (("softmax", "softmax"), ("layer_norm", "layer_norm"), ("matmul", "float matmul"),
               ("take", "table lookup"), ("lut", "table lookup"))


def kind_of(name: str, dtypes: list[str]) -> str:
    """The kind of a PrimFunc call from its name and argument dtypes (output last)."""
    m = re.match(r"ptq_([a-z0-9_]+?)\d*$", name)
    if m:
        return re.sub(r"_amx$", "", m.group(1))  # (ptq_conv2d_amx: the AMX variant's kernel)
    low = name.lower()
    kind = next((kind for frag, kind in _GLUE_KINDS if frag in low), None)
    if kind is not None:
        return kind
    if not dtypes:
        return "other"
    is_int = [d.startswith(("int", "uint")) for d in dtypes]
    if all(is_int):
        return "layout" if "transpose" in low or "reshape" in low else "integer glue"
    if is_int[-1]:
        return "quantize"
    return "dequantize / float glue" if any(is_int[:-1]) else "float glue"


def macs(kind: str, shapes: list[tuple]) -> int:
    """Multiply-accumulates of one ptq dot-product call from its argument shapes (inputs...,
    output), or 0 for other kinds."""
    if len(shapes) < 2:
        return 0
    x, w, out = shapes[0], shapes[1], shapes[-1]
    n_out = 1
    for d in out:
        n_out *= d
    if kind in ("dense", "matmul"):
        return n_out * x[-1]
    if kind == "conv2d":
        # packed weights hold (output-channel blocks) x reduction x (lanes): [O/l, R, S, C/d, l,
        # d], grouped [G, Og/l, R, S, Cg/d, l, d], AMX [O/16, ..., 16, 4]; the reduction is
        # counted as packed (channels padded to the block), whatever the activation layout
        size = 1
        for d in w:
            size *= d
        blocks = w[0] * w[1] if len(w) == 7 else w[0]
        return n_out * size // (blocks * w[-2])
    if kind in ("conv2d_depthwise", "conv2d_wide"):
        if len(w) == 3:  # NHWC depthwise [R, S, O]: one tap per (r, s) and output channel
            return n_out * w[0] * w[1]
        return n_out * w[1] * w[2] * w[3]  # OIHW [O, C/g, R, S]
    if kind == "dense_wide":
        return n_out * x[-1]
    return 0


def _best_seconds(fn: Callable[[], object], budget: float = 0.02, loops: int = 7) -> float:
    """The minimum over ``loops`` loops of the mean time of ``fn`` (each loop >= budget/loops)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(budget / loops / once))
    best = float("inf")
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def profile(compiled, inputs, runs: int = 20) -> dict:
    """Profile a CPU ``CompiledModule`` on ``inputs`` (torch tensors): whole-call latency and
    one row per kernel call (name, kind, shapes, dtypes, replayed microseconds, MACs)."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    args = [tvm.runtime.tensor(t.detach().contiguous().numpy(), dev) for t in inputs]
    lat = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        compiled(*inputs)
        if i >= 3:
            lat.append(time.perf_counter() - t0)

    calls: list = []

    def record(func, sym, before, _ret, *cargs):
        name = str(sym)
        if before and not name.startswith("vm.builtin"):
            calls.append((name, func, [tvm.runtime.tensor(a.numpy(), dev)
                                       if isinstance(a, tvm.runtime.Tensor) else a
                                       for a in cargs]))
        return 0

    vm = relax.VirtualMachine(compiled.executable, dev)
    vm.set_instrument(record)
    vm["main"](*args)
    rows = []
    for name, func, cargs in calls:
        tensors = [a for a in cargs if isinstance(a, tvm.runtime.Tensor)]
        shapes = [tuple(int(d) for d in a.shape) for a in tensors]
        dtypes = [str(a.dtype) for a in tensors]
        kind = kind_of(name, dtypes)
        rows.append(dict(name=name, kind=kind, shapes=shapes, dtypes=dtypes,
                         us=_best_seconds(lambda: func(*cargs)) * 1e6, macs=macs(kind, shapes)))
    return dict(median_ms=statistics.median(lat) * 1e3, min_ms=min(lat) * 1e3, runs=runs,
                kernel_ms=sum(r["us"] for r in rows) / 1e3, rows=rows)


def by_kind(rows: list[dict]) -> list[dict]:
    """Rows summed per kind, slowest kind first."""
    agg: dict = collections.OrderedDict()
    for r in rows:
        a = agg.setdefault(r["kind"], dict(kind=r["kind"], calls=0, us=0.0, macs=0))
        a["calls"] += 1
        a["us"] += r["us"]
        a["macs"] += r["macs"]
    return sorted(agg.values(), key=lambda a: -a["us"])


def to_text(title: str, result: dict, top: int = 15) -> str:
    total = result["kernel_ms"]
    lines = [f"{title}: whole call median {result['median_ms']:.2f} ms (min "
             f"{result['min_ms']:.2f}, {result['runs']} runs); {len(result['rows'])} kernel "
             f"calls, replayed alone {total:.2f} ms", "",
             f"{'kind':24s} {'calls':>5s} {'ms':>8s} {'share':>6s} {'GMAC/s':>7s}"]
    for a in by_kind(result["rows"]):
        g = f"{a['macs'] / (a['us'] * 1e3):7.1f}" if a["macs"] else ""
        lines.append(f"{a['kind']:24s} {a['calls']:5d} {a['us'] / 1e3:8.3f} "
                     f"{a['us'] / 1e3 / total:6.1%} {g}")
    lines += ["", f"slowest {top} calls (us, GMAC/s, function, argument shapes):"]
    for r in sorted(result["rows"], key=lambda r: -r["us"])[:top]:
        g = f"{r['macs'] / (r['us'] * 1e3):6.1f}" if r["macs"] else " " * 6
        lines.append(f"{r['us']:9.1f} {g}  {r['name'][:44]:44s} {r['shapes']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptqpasses_tools.bench_models import MODELS
    from ptqpasses_tools.bench_peers import CONFIGS

    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--config", default="defaults", help=f"one of {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1, help="TVM thread pool size")
    p.add_argument("--runs", type=int, default=20, help="timed whole calls (median)")
    p.add_argument("--top", type=int, default=15, help="slowest calls listed")
    p.add_argument("--json", type=Path, help="also write every row here")


def run(args) -> int:
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before the first TVM thread pool use
    import torch

    import ptqpasses_backends.tvm as bt
    from ptqpasses_tools.bench_models import MODELS, Skip
    from ptqpasses_tools.bench_peers import CONFIGS, int8_graph
    from ptqpasses_tools.inputs import UsageError

    torch.set_num_threads(args.threads)
    for what, value, known in (("model", args.model, MODELS),
                               ("configuration", args.config, CONFIGS)):
        if value not in known:
            raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(known)}")
    try:
        case = MODELS[args.model][0](args.batch)
        qgraph, note = int8_graph(case, args.config)
    except Skip as e:
        raise UsageError(f"{args.model} / {args.config}: {e}") from None
    compiled = bt.compile(qgraph, "host", example_inputs=list(case.inputs), dynamic_batch=False)
    result = profile(compiled, list(case.inputs), args.runs)
    title = f"{case.name}, {args.config}, {args.threads} thread(s)"
    print(f"# {note}")
    print(to_text(title, result, args.top))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(title=title, **result), indent=1) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from ptqpasses_tools.cli import main as cli_main

    return cli_main(["profile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
