"""Tuning wall time with 1 and 2 RPC servers: ``tune(..., rpc=...)`` of one model on this
machine, through a local tracker.

    python -m tools.rpc_timing                                # native x86 servers
    python -m tools.rpc_timing --device aarch64 --target aarch64-dotprod --trials 8
    python -m tools.rpc_timing --json timing.json

For each server count: a fresh tracker and that many servers under one key (``native``: TVM's
``rpc_server`` in this Python, for a target that runs here; ``aarch64``: the emulated board of
``tools.aarch64_device``), then ``ptqpasses_backends.tvm.tune`` of the model's dense/conv kernels with
``--trials`` per kernel into a fresh database, timed from the call to its return (the
servers are up and registered before). The model: the digits CNN (``tools.digits``, width
16), quantized with the defaults on seeded random batches. Markdown table; ``--json`` too.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from ptqpasses_tools.tables import markdown_table, write_json


def _model():
    import ptqpasses
    from ptqpasses_tools.digits import DigitsCNN

    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)),)
            for i in range(4)]
    return ptqpasses.quantize(DigitsCNN(width=16).eval(), data[0], data, progress=False,
                              guard=False), [data[0][0]]


def time_tuning(servers: int, device: str, target: str, trials: int) -> dict:
    import ptqpasses_backends.tvm as bt
    from ptqpasses_tools import aarch64_device, rpc_cluster

    q, inputs = _model()
    with rpc_cluster.start_tracker(port=rpc_cluster.free_port()) as tracker:
        addr, key = f"127.0.0.1:{tracker.port}", f"timing-{device}"
        started = []
        try:
            for _ in range(servers):
                if device == "aarch64":
                    started.append(aarch64_device.start_server(port=rpc_cluster.free_port(), tracker=addr,
                                                               key=key))
                else:
                    started.append(rpc_cluster.start_server(tracker=addr, key=key,
                                                            port=rpc_cluster.free_port()))
            rpc_cluster.wait_for_servers(addr, key, servers)
            with tempfile.TemporaryDirectory(prefix="ptq_rpc_timing_") as db:
                t0 = time.perf_counter()
                result = bt.tune(q, target, trials=trials, database=db, example_inputs=inputs,
                                 rpc=f"{addr}:{key}", progress=False)
                wall = time.perf_counter() - t0
        finally:
            for s in started:
                s.stop()
    return {"servers": servers, "device": device, "target": target, "trials": trials,
            "kernels": len(result.tasks), "measured": result.trials, "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["native", "aarch64"], default="native")
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [time_tuning(n, args.device, args.target, args.trials) for n in args.servers]
    print(f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("\n".join(markdown_table(
        ["servers", "device", "target", "kernels", "candidates measured", "tune wall (s)"],
        ([r["servers"], r["device"], r["target"], r["kernels"], r["measured"],
          f"{r['wall_s']:.1f}"] for r in rows),
        right=["servers", "kernels", "candidates measured", "tune wall (s)"])))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
