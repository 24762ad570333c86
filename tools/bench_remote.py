"""``ptq bench --rpc HOST:PORT:KEY --target T``: the bench models' ptqpasses int8 builds
timed on a remote device over TVM RPC.

For each model (and batch) of ``tools.bench``: the default ``ptqpasses.quantize`` graph
(``int8_graph``), compiled here for ``--target`` (a cross target linked with its
strategy's cross compiler), uploaded to a device the tracker lists under the key, checked
against the torch integer graph on the timed inputs, and timed there by the device's own clock
(``--runs`` timings of one call; median and min). No local peers: they cannot run there.
Writes ``bench-remote.json`` and ``bench-remote.md`` under ``--out``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ptqpasses_tools.inputs import UsageError
from ptqpasses_tools.tables import error_line, markdown_table, write_json


def run_remote(args, model_names: list[str], out: Path, log) -> int:
    import ptqpasses_backends.tvm as bt
    from ptqpasses_backends.tvm.remote import RemoteModule, RpcDevice
    from ptqpasses_tools.bench_models import MODELS, Skip
    from ptqpasses_tools.bench_peers import int8_graph
    from ptqpasses_tools.machine import machine

    if not args.target:
        raise UsageError("--rpc needs --target (the device's target, e.g. aarch64-dotprod)")
    try:
        device = RpcDevice.parse(args.rpc)
        named = bt.resolve(args.target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows, t_start = [], time.perf_counter()
    for mname in model_names:
        builder, batches = MODELS[mname]
        for batch in batches:
            row = {"model": f"{mname} b{batch}", "target": named.name, "device": str(device)}
            try:
                case = builder(batch)
                q, note = int8_graph(case)
                cm = bt.compile(q, named, example_inputs=list(case.inputs),
                                dynamic_batch=False)
                with RemoteModule(cm, device) as remote:
                    got, want = remote(*case.inputs), q(*case.inputs)
                    got = got if isinstance(got, tuple) else (got,)
                    want = want if isinstance(want, tuple) else (want,)
                    row["exact"] = all(torch.equal(g, w) for g, w in zip(got, want))
                    secs = remote.time(*case.inputs, repeat=args.runs)
                row.update(status="ok", note=note, strategy=cm.meta["strategy"],
                           median_ms=1e3 * statistics.median(secs), min_ms=1e3 * min(secs),
                           runs=len(secs))
                log(f"{row['model']}: {row['median_ms']:.2f} ms on {device} "
                    f"({'bit-exact' if row['exact'] else 'NOT bit-exact'})")
            except Skip as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # noqa: BLE001  (one model's failure is its row)
                row.update(status="failed", reason=error_line(e))
                log(f"{row['model']}: failed: {row['reason']}")
            rows.append(row)
    result = {"device": str(device), "target": named.name, "target_spec": dict(named.spec),
              "date": time.strftime("%Y-%m-%d"), "host": machine(), "rows": rows,
              "wall_s": time.perf_counter() - t_start}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench-remote.json", result)
    lines = [f"Remote device {device}, target {named.name}, {result['date']} (timed there, "
             f"one call per timing, median of {args.runs})", ""]
    lines += markdown_table(
        ["model", "strategy", "bit-exact", "median ms", "min ms", "status"],
        ([r["model"], r["strategy"], "yes" if r["exact"] else "NO", f"{r['median_ms']:.3f}",
          f"{r['min_ms']:.3f}", "ok"] if r["status"] == "ok" else
         [r["model"], "", "", "", "", f"{r['status']}: {r.get('reason', '')}"] for r in rows),
        right=["median ms", "min ms"])
    md = "\n".join(lines) + "\n"
    (out / "bench-remote.md").write_text(md)
    print(md)
    print(f"wrote {out / 'bench-remote.json'}, {out / 'bench-remote.md'}")
    return 0 if all(r["status"] != "failed" and r.get("exact", True) for r in rows) else 1
