"""The benchmark's peers: each builds, for one :class:`~ptqpasses_tools.bench_models.Case`,
the callable to time (torch eager / inductor / FX / PT2E, ONNX Runtime, and the ptqpasses TVM
builds), with a note saying what it is."""

from __future__ import annotations

import collections
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ptqpasses_tools import peers
from ptqpasses_tools.bench_models import Case, Skip

@dataclass
class Built:
    """A peer built for one case: ``make(threads)`` returns the callable to time."""

    make: Callable[[int], Callable]
    note: str


#: ptqpasses configurations ``int8_graph`` builds (the ``tvm-int8*`` peers, ``tools.profile``).
CONFIGS = ("defaults", "reduce_range", "static_linears", "recipe")


def int8_graph(case: Case, config: str = "defaults"):
    """``(integer graph, note)`` of ``case`` under a ptqpasses configuration: ``defaults``
    (``ptqpasses.quantize``), ``reduce_range`` (7-bit activations, ``QSpec(reduce_range=True)``
    as the FX 'x86' qconfig), ``static_linears`` (the defaults with every linear static, as
    before per-token linears: ``QSpec(dynamic=False)``) or ``recipe`` (the model's accuracy recipe, ``tools.accuracy``;
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
    cfg, note = None, "defaults"
    if config == "reduce_range":
        cfg = QuantConfig(activation=dataclasses.replace(DEFAULT_ACTIVATION, reduce_range=True))
        note = "7-bit activations (reduce_range)"
    elif config == "static_linears":
        cfg = QuantConfig(activation=DEFAULT_ACTIVATION.static())
        note = "defaults with static linears"
    q = ptqpasses.quantize(case.model, case.inputs, case.calib, config=cfg, progress=False,
                           dynamic_batch=False)
    return q, "ptqpasses " + note


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


def _tvm_config_peer(config: str) -> Callable[[Context], Built]:
    """A peer compiling the ``int8_graph`` configuration ``config`` for the host."""
    def build(ctx: Context) -> Built:
        import ptqpasses_backends.tvm as bt

        q, note = int8_graph(ctx.case, config)
        cm = bt.compile(q, "host", example_inputs=list(ctx.case.inputs), dynamic_batch=False)
        return Built(_fixed(_tvm_call(cm)), f"{note}, fixed schedules ({kernels_note(cm)})")
    return build


#: Activations quantized to 7 bits (``QSpec(reduce_range=True)``, as the FX 'x86' qconfig
#: does): on x86 without VNNI every packed kernel is proven exact for ``vpmaddubsw``.
peer_tvm_int8_rr = _tvm_config_peer("reduce_range")
#: Every linear static (one per-tensor scale), as before per-token linears became the default.
peer_tvm_int8_static = _tvm_config_peer("static_linears")


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
    "tvm-int8-static": Peer("ptqpasses TVM int8, static linears", "int8",
                            peer_tvm_int8_static),
    "tvm-int8-tuned": Peer("ptqpasses TVM int8 tuned", "int8", peer_tvm_int8_tuned),
    "tvm-int8-recipe": Peer("ptqpasses TVM int8 accuracy recipe", "int8", peer_tvm_int8_recipe),
}
