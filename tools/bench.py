"""Whole-model benchmark of ptqpasses' TVM builds against PyTorch and ONNX Runtime peers.

    python -m tools.bench --runs 30 --threads 1 2 --out out/bench      # everything (~see README)
    ptq bench --models resnet18 --peers eager tvm-int8 --runs 5 --threads 1 --out out/bench
    ptq bench --database out/tvm-db --tune-trials 64 ...               # + tuned int8 rows

One process; for each model and thread count every peer is built, checked against fp32 on
held-out inputs, warmed up, then timed in interleaved rounds (A B C A B C ...) and reported as
the median of ``--runs`` rounds. Threads: ``torch.set_num_threads`` (torch, inductor, FX),
TVM's runtime thread pool (``runtime.config_threadpool``) and ORT ``intra_op_num_threads``;
the whole process is pinned to the first N allowed cores. Inductor peers are compiled again
for each thread count (inductor bakes the thread count into its kernels).

Per row: median latency, speed relative to torch eager, GMAC/s (MACs of conv/linear/matmul
counted on the captured fp32 graph), that rate as % of the measured one-core peak
(tools.peak: fp32 FMA for fp32 rows, the int8 dot product for int8 rows) times the thread
count, and accuracy against fp32 on held-out inputs: SQNR (dB) of the outputs for the CNNs and
the BERT-like encoder, mean cosine of the mean-pooled sentence embeddings for MiniLM.
Calibration: 16 photo crops (CNNs), 16 sentences of tools/data/sentences.txt (MiniLM), 16
random token sequences (BERT-like); every int8 peer sees the same batches.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` under ``--out``. A peer that fails on a
model is recorded as failed with its reason; the run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from ptqpasses_tools.bench_models import DEFAULT_MODELS, MODELS, Case, Skip, count_macs
from ptqpasses_tools.bench_peers import PEERS, Built, Context
from ptqpasses_tools.bench_report import plot, to_markdown
from ptqpasses_tools.inputs import UsageError
from ptqpasses_tools.machine import busy_threads, machine, measure_peak, set_threads, thread_ticks
from ptqpasses_tools.tables import error_line


def _first(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def bench_case(case: Case, peer_names: list[str], args, peak: dict, log) -> list[dict]:
    """All rows of one case: every peer at every thread count."""
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="ptq_bench_"))
    ctx = Context(case, args, folder)
    macs = count_macs(ctx.float_graph)
    with torch.no_grad():
        ref = [_first(case.model(*b)) for b in case.eval]
    built: dict[str, Built] = {}
    base = {"model": case.name, "batch": case.batch, "macs": macs, "metric": case.metric}
    failed: dict[str, str] = {}
    build_s: dict[str, float] = {}
    for name in peer_names:
        t0 = time.perf_counter()
        try:
            built[name] = PEERS[name].build(ctx)
        except Skip as e:
            failed[name] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001  (a peer failing is a result)
            failed[name] = f"failed to build: {error_line(e)}"
            if args.verbose:
                traceback.print_exc()
        build_s[name] = time.perf_counter() - t0
        log(f"  {name}: {'built' if name in built else failed[name]} "
            f"({build_s[name]:.1f} s)")
    accuracy: dict[str, float] = {}
    for threads in args.threads:
        torch._dynamo.reset()
        cores = set_threads(threads, args.cores)
        fns, make_s, runs = {}, {}, {}
        for name, b in built.items():
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    fn = b.make(threads)
                    if name not in accuracy:
                        out = [_first(fn(*x)) for x in case.eval]
                        accuracy[name] = case.score(ref, out)
                    runs[name] = args.runs
                    for i in range(args.warmup):
                        t1 = time.perf_counter()
                        fn(*case.inputs)
                        if time.perf_counter() - t1 > args.slow_s:  # seconds a call: fewer runs
                            runs[name] = min(args.runs, args.slow_runs)
                            break
                fns[name] = fn
            except Exception as e:  # noqa: BLE001
                failed[name] = f"failed to run: {error_line(e)}"
                if args.verbose:
                    traceback.print_exc()
            make_s[name] = time.perf_counter() - t0
        times = {name: [] for name in fns}
        ticks = {name: {} for name in fns}  # CPU ticks per OS thread during the timed calls
        probe = threads > 1 and os.path.isdir("/proc/self/task")
        with torch.no_grad():
            for r in range(args.runs):
                for name, fn in fns.items():
                    if r >= runs[name]:
                        continue
                    before = thread_ticks() if probe else None
                    t0 = time.perf_counter()
                    fn(*case.inputs)
                    times[name].append(time.perf_counter() - t0)
                    if probe:
                        for tid, t in thread_ticks().items():
                            ticks[name][tid] = ticks[name].get(tid, 0) + t - before.get(tid, 0)
        eager = statistics.median(times["eager"]) if "eager" in times else None
        for name in peer_names:
            p = PEERS[name]
            row = dict(base, peer=name, label=p.label, precision=p.precision, threads=threads,
                       cores=cores, build_s=round(build_s.get(name, 0.0), 2),
                       warmup_s=round(make_s.get(name, 0.0), 2),
                       note=built[name].note if name in built else "")
            if name not in fns:
                row.update(status="failed" if "failed" in failed[name] else "skipped",
                           reason=failed[name])
                rows.append(row)
                continue
            med = statistics.median(times[name])
            q = statistics.quantiles(times[name], n=10) if len(times[name]) > 1 else [med] * 9
            gmacs = macs / med / 1e9
            key = "int8" if p.precision == "int8" else "fp32"
            acc = accuracy[name]
            row.update(busy_threads=busy_threads(ticks[name]) if probe else None)
            row.update(status="ok", runs=len(times[name]), median_ms=1e3 * med,
                       p10_ms=1e3 * q[0], p90_ms=1e3 * q[-1],
                       vs_eager=(eager / med) if eager else None, gmacs=gmacs,
                       pct_peak=100 * gmacs / (peak[key] * threads) if peak.get(key) else None,
                       # an output equal to fp32 has infinite SQNR: JSON has no inf
                       accuracy=acc if acc != float("inf") else None,
                       exact=acc == float("inf"))
            rows.append(row)
        log(f"  {threads} thread(s): " + ", ".join(
            f"{n} {1e3 * statistics.median(t):.2f} ms" for n, t in times.items()))
    return rows


def _names(values: list[str], known: dict, what: str) -> list[str]:
    out = []
    for v in values:
        for name in v.split(","):
            if name not in known:
                raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
            if name not in out:
                out.append(name)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m tools.bench`` and ``ptq bench``)."""
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                   help=f"of {', '.join(MODELS)} (digits: tiny, for tests); "
                   f"default {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--peers", nargs="+", default=None, metavar="PEER",
                   help=f"of {', '.join(PEERS)}; default all (tvm-int8-tuned only with "
                   "--database)")
    p.add_argument("--runs", type=int, default=30, help="timed interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per peer first")
    p.add_argument("--slow-s", type=float, default=1.0,
                   help="a peer whose warm-up call takes longer than this many seconds ...")
    p.add_argument("--slow-runs", type=int, default=5, help="... is timed in only this many "
                   "rounds (its row says how many)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts, each measured separately (pinned to that many cores)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json/.md/.png")
    p.add_argument("--database", help="tuning database for the tvm-int8-tuned rows")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="tune the int8 kernels first with this many trials per kernel")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing peers")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY",
                   help="time the ptqpasses int8 builds on a remote device instead (a TVM RPC "
                        "tracker and key; needs --target; no local peers): tools/bench_remote.py")
    p.add_argument("--target", help="with --rpc: the device's target (e.g. aarch64-dotprod)")


def run_bench(args) -> int:
    """Runs the benchmark described by parsed ``args``; writes the report files."""
    model_names = _names(args.models, MODELS, "model")
    if args.peers is None:
        peer_names = [p for p in PEERS if p != "tvm-int8-tuned" or args.database]
    else:
        peer_names = _names(args.peers, PEERS, "peer")
    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    if getattr(args, "rpc", None):
        from ptqpasses_tools.bench_remote import run_remote

        return run_remote(args, model_names, Path(args.out),
                          lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.tune_trials and not args.database:
        raise UsageError("--tune-trials needs --database (where the records go)")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if any(t < 1 or (allowed and t > len(allowed)) for t in args.threads):
        raise UsageError(f"--threads must be between 1 and {len(allowed)} (allowed cores)")
    args.cores = allowed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    before = torch.get_num_threads()
    try:
        return _run(args, model_names, peer_names, out, log)
    finally:  # leave the process as it was (the test suite runs this in-process)
        set_threads(before, allowed)
        if hasattr(os, "sched_setaffinity"):
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), allowed)
                except OSError:
                    pass


def _save(out: Path, info: dict, peak: dict, rows: list, args, model_names, peer_names,
          t_start: float) -> dict:
    """Writes bench.json (after every model, so a long run that dies keeps what it measured)."""
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"machine": info, "peak": peak, "rows": rows,
              "args": {"models": model_names, "peers": peer_names, "runs": args.runs,
                       "warmup": args.warmup, "threads": args.threads,
                       "slow_s": args.slow_s, "slow_runs": args.slow_runs,
                       "database": args.database, "tune_trials": args.tune_trials},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    return result


def _run(args, model_names: list[str], peer_names: list[str], out: Path, log) -> int:
    t_start = time.perf_counter()
    # TVM's pool starts at most TVM_NUM_THREADS workers (else its own core count guess, 1 on
    # some 2-vCPU VMs); config_threadpool then picks N of them per thread count.
    os.environ["TVM_NUM_THREADS"] = str(max(args.threads))
    info = machine()
    peak = measure_peak()
    log(f"peak (one core, GMAC/s): fp32 {peak.get('fp32')}, int8 {peak.get('int8')}")
    rows = []
    for mname in model_names:
        builder, batches = MODELS[mname]
        for batch in batches:
            t0 = time.perf_counter()
            try:
                case = builder(batch)
            except Skip as e:
                log(f"{mname} b{batch}: skipped: {e}")
                rows.append({"model": f"{mname} b{batch}", "batch": batch, "threads": 0,
                             "peer": "", "label": "(all)", "status": "skipped",
                             "reason": str(e)})
                continue
            log(f"{case.name}:")
            rows += bench_case(case, peer_names, args, peak, log)
            log(f"  {time.perf_counter() - t0:.0f} s")
            del case
            _save(out, info, peak, rows, args, model_names, peer_names, t_start)
    result = _save(out, info, peak, rows, args, model_names, peer_names, t_start)
    md = to_markdown(result)
    (out / "bench.md").write_text(md)
    plot(result, out / "bench.png")
    print(md)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} "
          f"({result['wall_s']:.0f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_bench(args)
    except UsageError as e:
        print(f"tools.bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
