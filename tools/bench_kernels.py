"""Single-kernel benchmark: TVM int8 untuned / fixed template / tuned against torch fp32 and
torch int8 (``torch.ao`` quantized modules, 'x86' engine), in one process, interleaved rounds.

    python -m tools.bench_kernels --trials 32 --database out/tvm-db --runs 30 --threads 1 2

Kernels: dense 128x768x768 and conv 1x64x56x56 3x3 64 filters (padding 1). Every TVM variant is
checked bit-exact against the integer reference before timing. Prints a markdown table (median
ms and ratio to torch int8) and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import ptqpasses.ops  # noqa: F401  (registers torch.ops.ptq)
from ptqpasses_tools.tables import markdown_table, write_json

P = torch.ops.ptq


def _graph(kind: str):
    """(integer fx graph, int8 input, float weight, float input) of one kernel."""
    from torch import fx

    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    if kind == "dense":
        w = torch.randint(-128, 128, (768, 768), generator=g).to(torch.int8)
        xin = torch.randint(-128, 128, (128, 768), generator=g).to(torch.int8)
        mult = torch.full((768,), 2.0 ** -10)
        root.register_buffer("w", w)
        root.register_buffer("m", mult)
        y = graph.call_function(P.linear.default, (x, 0, graph.get_attr("w"), None,
                                                   graph.get_attr("m"), 0, -128, 127,
                                                   torch.int8))
    else:
        w = torch.randint(-128, 128, (64, 64, 3, 3), generator=g).to(torch.int8)
        xin = torch.randint(-128, 128, (1, 64, 56, 56), generator=g).to(torch.int8)
        mult = torch.full((64,), 2.0 ** -12)
        root.register_buffer("w", w)
        root.register_buffer("m", mult)
        y = graph.call_function(P.conv2d.default, (x, 0, graph.get_attr("w"), None, [1, 1],
                                                   [1, 1], [1, 1], 1, graph.get_attr("m"), 0,
                                                   -128, 127, torch.int8))
    graph.output(y)
    return fx.GraphModule(root, graph), xin, w


def _torch_peers(kind: str, w: torch.Tensor, xin: torch.Tensor) -> dict:
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86"
    wf = w.float() * 0.01
    xf = xin.float() * 0.05
    if kind == "dense":
        fp = torch.nn.Linear(768, 768, bias=False)
        q = nnq.Linear(768, 768, bias_=False)
    else:
        fp = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
        q = nnq.Conv2d(64, 64, 3, padding=1, bias=False)
    with torch.no_grad():
        fp.weight.copy_(wf)
    fp.eval()
    q.set_weight_bias(torch.quantize_per_tensor(wf, 0.01, 0, torch.qint8), None)
    q.scale, q.zero_point = 0.5, 128
    xq = torch.quantize_per_tensor(xf, 0.05, 128, torch.quint8)

    def run_fp():
        with torch.no_grad():
            return fp(xf)

    return {"torch fp32": run_fp, "torch int8 (x86)": lambda: q(xq)}


def set_threads(n: int) -> None:
    """One thread count for torch and for TVM's thread pool."""
    import tvm

    torch.set_num_threads(n)
    tvm.get_global_func("runtime.config_threadpool")(0, n)  # affinity: big cores, n threads


def main(argv=None) -> None:
    import tvm

    import ptqpasses_backends.tvm as bt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", nargs="+", default=["dense", "conv"])
    ap.add_argument("--trials", type=int, default=32, help="tuning trials per kernel (0: skip)")
    ap.add_argument("--database", default=None, help="tuning database root")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    # TVM's pool starts at most TVM_NUM_THREADS workers (else its core-count guess, 1 on some
    # 2-vCPU VMs), and config_threadpool cannot add more: without this, 2 threads ran as 1.
    os.environ["TVM_NUM_THREADS"] = str(max(a.threads))

    rows = []
    for kind in a.kernels:
        gm, xin, w = _graph(kind)
        ref = gm(xin)
        variants = {}
        cm_u = bt.compile(gm, "host", example_inputs=[xin], dynamic_batch=False, schedule=False)
        variants["tvm int8 untuned"] = cm_u
        variants["tvm int8 template"] = bt.compile(gm, "host", example_inputs=[xin],
                                                   dynamic_batch=False)
        if a.trials > 0:
            res = bt.tune(gm, "host", trials=a.trials, database=a.database,
                          example_inputs=[xin])
            print(f"{kind}: tuned {res.trials} trials, "
                  f"{sum(t.seconds for t in res.tasks):.0f} s", flush=True)
            variants["tvm int8 tuned"] = bt.compile(gm, "host", example_inputs=[xin],
                                                    database=a.database)
        fns = {}
        for name, cm in variants.items():
            out = cm(xin)
            if not torch.equal(out, ref):
                raise AssertionError(f"{kind} {name} is not bit-exact")
            fns[name] = (lambda cm=cm: cm(xin))
        fns.update(_torch_peers(kind, w, xin))
        for nthreads in a.threads:
            set_threads(nthreads)
            times = {name: [] for name in fns}
            for f in fns.values():  # warm-up
                f()
                f()
            for _ in range(a.runs):  # interleaved rounds
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["torch int8 (x86)"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"kernel": kind, "threads": nthreads, "variant": name,
                             "median_ms": 1e3 * med, "vs_torch_int8": base / med})
    print(f"\nmachine: {platform.processor() or platform.machine()}, "
          f"cpu {bt.targets.system_cpu()}, tvm {tvm.__version__}, torch {torch.__version__}, "
          f"median of {a.runs} interleaved runs\n")
    print("\n".join(markdown_table(
        ["kernel", "threads", "variant", "median ms", "speed vs torch int8"],
        ([r["kernel"], r["threads"], r["variant"], f"{r['median_ms']:.3f}",
          f"{r['vs_torch_int8']:.2f}x"] for r in rows),
        right=["threads", "median ms", "speed vs torch int8"])))
    write_json(a.json, rows)

if __name__ == "__main__":
    main()
