"""``ptq demo``: a real model trained offline, quantized, compiled for this CPU, compared."""

from __future__ import annotations

import os
import statistics
import time


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(quick: bool = False, threads: int = 1) -> int:
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's pool starts
    import torch

    torch.set_num_threads(threads)
    import ptqpasses
    from ptqpasses_backends import tvm as tvm_backend
    from ptqpasses_backends.tvm.targets import resolve
    from ptqpasses_tools.digits import accuracy, train_digits

    t0 = time.perf_counter()
    model, (train_x, _, test_x, test_y) = train_digits(epochs=3 if quick else 8)
    print(f"trained DigitsCNN on scikit-learn digits in {time.perf_counter() - t0:.1f} s "
          f"({len(train_x)} train / {len(test_x)} test images)")
    calib = [(train_x[i:i + 64],) for i in range(0, 512, 64)]
    t0 = time.perf_counter()
    qgraph = ptqpasses.quantize(model, calib[0], calib, progress=False)
    cov = ptqpasses.coverage(qgraph)
    print(f"quantized in {time.perf_counter() - t0:.1f} s: {sum(c.integer for c in cov)}/{len(cov)} "
          "compute nodes are int8 ops (per-channel int8 weights, uint8 activations)")
    target = resolve("host")
    t0 = time.perf_counter()
    compiled = tvm_backend.compile(qgraph, target="host")
    print(f"compiled for host ({target.spec['mcpu']}, {target.family}) with TVM in "
          f"{time.perf_counter() - t0:.1f} s\nstrategy: {compiled.meta['strategy_why']}")

    with torch.no_grad():
        fp32 = model(test_x)
        ref = qgraph(test_x)
        tvm_out = compiled(test_x)
    exact = torch.equal(ref, tvm_out)
    runs = 10 if quick else 50
    one = test_x[:1]
    rows = [
        ("torch fp32 eager", accuracy(fp32, test_y), lambda: model(one), lambda: model(test_x)),
        ("ptqpasses int8, torch reference kernels", accuracy(ref, test_y),
         lambda: qgraph(one), lambda: qgraph(test_x)),
        ("ptqpasses int8, TVM (fixed schedules, no tuning)", accuracy(tvm_out, test_y),
         lambda: compiled(one), lambda: compiled(test_x)),
    ]
    print(f"\n{threads} thread(s), median of {runs} runs; test set of {len(test_x)} images")
    print(f"| model | top-1 accuracy | latency batch 1 (ms) | latency batch {len(test_x)} (ms) |")
    print("|---|---:|---:|---:|")
    with torch.no_grad():
        for name, acc, f1, fn in rows:
            print(f"| {name} | {acc:.2%} | {_median_ms(f1, runs):.3f} | "
                  f"{_median_ms(fn, max(3, runs // 10)):.2f} |")
    print(f"\nTVM int8 output equals the torch reference bit for bit: {exact}")
    print("These are the fixed schedules of this CPU's strategy; `ptq tune` searches around "
          "them (MetaSchedule) and keeps what is faster.")
    return 0 if exact else 1
