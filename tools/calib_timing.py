"""Calibration wall time in one process against N local ranks (torch.distributed, gloo).

    python -m tools.calib_timing                      # ResNet-18, 224x224, 16 batches of 8
    python -m tools.calib_timing --ranks 1 2 --repeats 3 --json timing.json

A fixed data set: ResNet-18 (random weights, BatchNorm statistics randomized, seed 0), the
default QuantConfig (MSE activation observer), ``--batches`` seeded random batches. Timed:
``ptqpasses.calibrate`` from the moment every rank has its prepared graph and its shard
(batches ``r, r + N, ...``) to the moment the last rank has its qparams, the merge across
ranks included; each repeat calibrates a fresh copy. One process runs with every core's
thread and with one thread; N ranks each with ``cores / N`` threads (as torchrun). The merge
alone (its collectives) is timed once more on its own. Not timed: starting the processes and
capturing the model (``launch_s`` in the JSON: the whole launch). Medians, as markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _batches(n: int, batch: int, size: int, which) -> list[tuple[torch.Tensor]]:
    """Batches ``which`` of the fixed data set (batch i from its own seed)."""
    return [(torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(i)),)
            for i in which]


def _observed(size: int):
    import ptqpasses
    from ptqpasses_tools.models import randomize_bn_stats, resnet18
    torch.manual_seed(0)
    model = randomize_bn_stats(resnet18().eval(), seed=0)
    return ptqpasses.prepare(model, (torch.randn(2, 3, size, size),))


def _times(observed, data, repeats: int, barrier=lambda: None) -> list[float]:
    import ptqpasses
    ptqpasses.calibrate(copy.deepcopy(observed), data[:1], progress=False, distributed=False)
    out = []  # (after a batch untimed: kernels chosen, memory allocated)
    for _ in range(repeats):
        gm = copy.deepcopy(observed)
        barrier()
        start = time.perf_counter()
        ptqpasses.calibrate(gm, data, progress=False)
        barrier()
        out.append(time.perf_counter() - start)
    return out


def _rank(args, out: str) -> None:
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    observed = _observed(args.size)
    data = _batches(args.batches, args.batch_size, args.size, range(rank, args.batches, world))
    times = _times(observed, data, args.repeats, dist.barrier)
    # the merge alone: on a copy calibrated on this rank's shard only
    import ptqpasses
    from ptqpasses.calibrate import observers
    from ptqpasses.distributed import merge_observers
    gm = copy.deepcopy(observed)
    ptqpasses.calibrate(gm, data, progress=False, distributed=False)
    dist.barrier()
    start = time.perf_counter()
    merge_observers([ob for _, ob in observers(gm)], len(data))
    dist.barrier()
    merge_s = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "threads": torch.get_num_threads(),
                                         "merge_s": merge_s}))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(args) -> dict:
    from ptqpasses.distributed import launch
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in args.ranks:
        if n == 1:
            observed = _observed(args.size)
            data = _batches(args.batches, args.batch_size, args.size, range(args.batches))
            before = torch.get_num_threads()
            for threads in sorted({cores, 1}, reverse=True):
                torch.set_num_threads(threads)
                rows.append({"ranks": 1, "threads": threads,
                             "times": _times(observed, data, args.repeats)})
            torch.set_num_threads(before)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            start = time.perf_counter()
            launch(_rank, n, (args, out), timeout_s=args.timeout)
            got = json.loads(Path(out).read_text())
            rows.append({"ranks": n, "threads": got["threads"], "times": got["times"],
                         "merge_s": got["merge_s"], "launch_s": time.perf_counter() - start})
    for r in rows:
        r["median_s"] = statistics.median(r["times"])
    result = {"cpu": _cpu(), "cores": cores, "torch": torch.__version__,
              "model": "resnet18", "size": args.size, "batches": args.batches,
              "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows}
    return result


def markdown(result: dict) -> str:
    base = next((r["median_s"] for r in result["rows"] if r["ranks"] == 1), None)
    lines = [f"ResNet-18, {result['batches']} batches of {result['batch_size']}x3x"
             f"{result['size']}x{result['size']}, default observer (MSE); {result['cpu']}, "
             f"{result['cores']} cores; median of {result['repeats']}",
             "", "| ranks | threads per rank | calibrate (s) | runs (s) | of which merge (s) |",
             "| ---: | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        speed = f" ({base / r['median_s']:.2f}x)" if base and r is not result["rows"][0] else ""
        runs = ", ".join(f"{t:.2f}" for t in r["times"])
        merge = f"{r['merge_s']:.3f}" if "merge_s" in r else "-"
        lines.append(f"| {r['ranks']} | {r['threads']} | {r['median_s']:.2f}{speed} | {runs} "
                     f"| {merge} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.calib_timing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800, help="seconds for a launch")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
