"""The observer zoo: which activation observer should be ptqpasses' default?

    ptq observer-zoo --out docs/accuracy               # every model installed, every observer
    ptq observer-zoo --models MobileNetV2 PPOCR-cls --observers minmax histogram --no-peers

Runs the default ``quantize`` flow (only ``QuantConfig.activation``'s observer and percentile
change) on the real-weight models of :mod:`ptqpasses_tools.wheel_models`, calibrated on one split of
real inputs and scored against fp32 on the held-out split, and (unless ``--no-peers``) the
static peers PT2E (X86InductorQuantizer) and ONNX Runtime QDQ, each with how many of the
model's convs/linears/matmuls it really made integer. Writes ``observer-zoo.md`` and
``observer-zoo.json`` to ``--out``.

The models are split in two: the default is chosen on the **tune** half (best mean rank of
output SQNR, then the best worst-case gap to the per-model best) and the choice is checked
on the **held-out** half, models it was not chosen on (issue 13).

The sentence encoders are quantized as sentence-transformers deploys them: encoder plus mean
pooling (:class:`ptqpasses_tools.models.SentenceEmbedding`), so the model's output, which the accuracy
guard judges, is the sentence embedding (not the hidden states of padding tokens).

Metrics, per model: ``sqnr_db`` of the output (for embeddings: the sentence embedding) plus one task metric: ``top1`` agreement with fp32 (classifiers; MTCNN: face /
no-face), ``cos_mean`` / ``cos_min`` (embeddings), ``iou`` of the text maps thresholded at
0.3 (detector), ``tokens``: per-step argmax agreement of the CTC output (recognizer).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
import tempfile
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
from ptqpasses_tools import wheel_models as wm

#: name -> (observer, percentile): what the zoo compares (the percentile only matters to
#: "histogram").
OBSERVERS = {
    "minmax": ("minmax", 99.99),
    "moving_average": ("moving_average", 99.99),
    "histogram@99.9": ("histogram", 99.9),
    "histogram@99.99": ("histogram", 99.99),
    "histogram@99.999": ("histogram", 99.999),
    "mse": ("mse", 99.99),
    "entropy": ("entropy", 99.99),
}

@dataclass
class Task:
    name: str
    group: str                   # "tune" or "held-out"
    what: str                    # architecture and data, one line
    model: torch.nn.Module
    calib: list[tuple]
    eval: list[tuple]
    score: Callable              # (fp32 outputs, quantized outputs, eval batches) -> dict
    dynamic_dims: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- scores


def _score_classifier(ref, out, batches, logits=slice(None)) -> dict:
    r, o = torch.cat(ref), torch.cat(out)
    agree = (r[:, logits].argmax(1) == o[:, logits].argmax(1)).float().mean()
    return {"sqnr_db": sqnr(r, o), "top1": float(agree)}


def _score_embedding(ref, out, batches) -> dict:
    e_ref, e_out = torch.cat(ref), torch.cat(out)  # the models output the pooled embedding
    cos = torch.nn.functional.cosine_similarity(e_ref, e_out, dim=1)
    return {"sqnr_db": sqnr(e_ref, e_out), "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min())}


def _score_detector(ref, out, batches) -> dict:
    r, o = torch.cat(ref) > 0.3, torch.cat(out) > 0.3
    iou = (r & o).sum() / (r | o).sum().clamp(min=1)
    return {"sqnr_db": sqnr(torch.cat(ref), torch.cat(out)), "iou": float(iou)}


def _score_ctc(ref, out, batches) -> dict:
    r, o = torch.cat(ref), torch.cat(out)
    return {"sqnr_db": sqnr(r, o), "tokens": float((r.argmax(-1) == o.argmax(-1)).float().mean())}


PRIMARY = {"top1": "top-1", "cos_mean": "cos", "iou": "IoU", "tokens": "tokens"}

# ----------------------------------------------------------------------------- tasks


def _batches(x: torch.Tensor, size: int) -> list[tuple]:
    return [(x[i:i + size],) for i in range(0, len(x), size)]


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _rot90(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Page i turned by (i % 4) * 90 degrees (and its label)."""
    k = torch.arange(len(x)) % 4
    return torch.stack([torch.rot90(img, int(r), (1, 2)) for img, r in zip(x, k)]), k


def task_mobilenet():
    m = models.load_mobilenet_v2_imagenet()
    if m is None:
        return None
    return Task("MobileNetV2", "tune", "ImageNet CNN, depthwise + ReLU6; 32/30 photo crops 224",
                m, _batches(models.photo_crops(32, split="calib"), 8),
                _batches(models.photo_crops(30, split="eval"), 10), _score_classifier)


def _sentence_task(name, group, what, m):
    cal, held = wm.reference_sentences()
    m = models.SentenceEmbedding(m).eval()  # encoder + mean pooling, as sentence-transformers
    return Task(name, group, what, m, models.minilm_tokenize(list(cal), 10),
                models.minilm_tokenize(list(held), 10), _score_embedding,
                {0: {1: "seq"}, 1: {1: "seq"}})


def task_minilm_l6():
    m = models.load_minilm_l6()
    return None if m is None else _sentence_task(
        "MiniLM-L6", "tune", "BERT 6L sentence embedding; 40/40 Python-manual sentences", m)


def task_minilm_l3():
    m = wm.load_minilm_l3()
    return None if m is None else _sentence_task(
        "MiniLM-L3", "held-out", "BERT 3L paraphrase embedding; 40/40 Python-manual sentences",
        m)


def task_ppocr_det():
    m = wm.load_ppocr("det")
    if m is None:
        return None
    f = lambda split, n: _norm(wm.text_images(n, (256, 256), split), [0.5] * 3, [0.5] * 3)
    return Task("PPOCR-det", "tune", "PP-OCRv4 DBNet text segmenter; 8/8 text pages 256x256",
                m, _batches(f("calib", 8), 4), _batches(f("eval", 8), 4), _score_detector)


def task_ppocr_rec():
    m = wm.load_ppocr("rec")
    if m is None:
        return None
    f = lambda split, n: _norm(wm.text_images(n, (48, 320), split, lines=False), [0.5] * 3,
                               [0.5] * 3)
    return Task("PPOCR-rec", "held-out", "PP-OCRv4 SVTR-LCNet CTC recognizer; 8/8 lines 48x320",
                m, _batches(f("calib", 8), 4), _batches(f("eval", 8), 4), _score_ctc)


def task_ppocr_cls():
    m = wm.load_ppocr("cls")
    if m is None:
        return None

    def f(split, n):
        x = wm.text_images(n, (48, 192), split, lines=False)
        x[1::2] = x[1::2].flip(-1, -2)  # every other line upside down
        return _norm(x, [0.5] * 3, [0.5] * 3)
    return Task("PPOCR-cls", "tune", "MobileNetV3 (hardswish, SE) line 0/180; 32/32 lines",
                m, _batches(f("calib", 32), 8), _batches(f("eval", 32), 8), _score_classifier)


def task_orientation():
    m = wm.load_orientation()
    if m is None:
        return None
    f = lambda split, n: _norm(_rot90(wm.text_images(n, (224, 224), split))[0],
                               models.IMAGENET_MEAN, models.IMAGENET_STD)
    return Task("Orientation", "held-out", "PP-LCNet (hardswish, SE) page 0/90/180/270; 16/16",
                m, _batches(f("calib", 16), 8), _batches(f("eval", 16), 8), _score_classifier)


def _mtcnn_task(kind, group, size):
    m = wm.load_mtcnn(kind)
    if m is None:
        return None
    f = lambda split, n: (wm.photo_windows(n, (size, size), split) * 255 - 127.5) * 0.0078125
    return Task(f"MTCNN-{kind[0].upper()}Net", group,
                f"MTCNN {kind} (PReLU CNN) face/box head; 64/64 photo windows {size}x{size}",
                m, _batches(f("calib", 64), 16), _batches(f("eval", 64), 16),
                lambda r, o, b: _score_classifier(r, o, b, logits=slice(-2, None)))


TASKS: dict[str, Callable[[], Optional[Task]]] = {
    "MobileNetV2": task_mobilenet, "MiniLM-L6": task_minilm_l6, "PPOCR-det": task_ppocr_det,
    "PPOCR-cls": task_ppocr_cls, "MTCNN-ONet": lambda: _mtcnn_task("onet", "tune", 48),
    "MiniLM-L3": task_minilm_l3, "PPOCR-rec": task_ppocr_rec, "Orientation": task_orientation,
    "MTCNN-RNet": lambda: _mtcnn_task("rnet", "held-out", 24),
}

# ----------------------------------------------------------------------------- methods


def run_observer(task: Task, captured, observer: str, percentile: float):
    """The default flow with only the activation observer changed; (outputs, integer ops)."""
    act = dataclasses_replace(ptqpasses.QuantConfig().activation, observer=observer,
                              percentile=percentile)
    observed = ptqpasses.prepare(copy.deepcopy(captured), task.calib[0],
                                 ptqpasses.QuantConfig(activation=act))
    ptqpasses.calibrate(observed, task.calib, progress=False)
    q = ptqpasses.convert(observed)
    with torch.no_grad():
        return [q(*b) for b in task.eval], peers.ptq_integer_count(q)


def run_guarded(task: Task, captured):
    """The plain default ``quantize`` (accuracy guard on): (outputs, integer ops, guard)."""
    q = ptqpasses.quantize(copy.deepcopy(captured), task.calib[0], task.calib, progress=False)
    rep = q.meta[GUARD_KEY]
    guard = {"before_sqnr_db": rep.before.sqnr_db, "after_sqnr_db": rep.after.sqnr_db,
             "met": rep.met, "seconds": round(rep.elapsed_s, 1),
             "int16": sum(r.to == "int16" for r in rep.raised),
             "float": sum(r.to == "float" for r in rep.raised)}
    with torch.no_grad():
        return [q(*b) for b in task.eval], peers.ptq_integer_count(q), {"guard": guard}


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def run_pt2e(task: Task):
    q = peers.pt2e_int8(task.model, task.calib, dynamic_dims=task.dynamic_dims)
    with torch.no_grad():
        return [q(*b) for b in task.eval], peers.pt2e_int8_count(q)


def run_ort(task: Task):
    folder = Path(tempfile.mkdtemp(prefix="ptq_zoo_ort_"))
    fp32 = peers.export_onnx(task.model, task.calib[0], folder / "model.onnx",
                             dynamic_dims=task.dynamic_dims)
    int8 = peers.ort_int8(fp32, task.calib, static=True)
    sess = peers.OrtModel(int8)
    return [sess(*b) for b in task.eval], peers.onnx_int8_count(int8)


# ----------------------------------------------------------------------------- driver


def evaluate(task: Task, observers: list[str], with_peers: bool, progress=None,
             guarded: bool = True) -> dict:
    """One model: fp32 reference, then each observer (and peer); a method that fails is a
    result (its error), not a crash."""
    with torch.no_grad():
        ref = [task.model(*b) for b in task.eval]
    captured = ptqpasses.capture(task.model, task.calib[0], dynamic_dims=task.dynamic_dims)
    total = peers.count_compute(captured)
    rows = {}
    methods = [("default", lambda: run_guarded(task, captured))] if guarded else []
    methods += [(o, lambda o=o: run_observer(task, captured, *OBSERVERS[o])) for o in observers]
    if with_peers:
        methods += [("pt2e", lambda: run_pt2e(task)), ("ort-static", lambda: run_ort(task))]
    for name, fn in methods:
        t0 = time.perf_counter()
        try:
            out, n_int, *extra = fn()
            rows[name] = {**task.score(ref, out, task.eval), "int8_compute": n_int,
                          "seconds": round(time.perf_counter() - t0, 1), **(extra or [{}])[0]}
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        if progress is not None:
            progress.update(1)
    return {"group": task.group, "what": task.what, "compute_ops": total, "methods": rows}


def rank(results: dict, observers: list[str], group: str) -> list[dict]:
    """Per observer over the group's models: mean rank by SQNR (1 = best; ties share the
    better rank), worst gap to the per-model best (dB), mean SQNR."""
    if not observers:
        return []
    per = {o: {"ranks": [], "gaps": [], "sqnr": []} for o in observers}
    for name, r in results.items():
        if r["group"] != group:
            continue
        vals = {o: r["methods"].get(o, {}).get("sqnr_db", float("-inf")) for o in observers}
        best = max(vals.values())
        for o in observers:
            per[o]["ranks"].append(1 + sum(v > vals[o] for v in vals.values()))
            per[o]["gaps"].append(best - vals[o])
            per[o]["sqnr"].append(vals[o])
    out = []
    for o, p in per.items():
        if p["ranks"]:
            out.append({"observer": o, "mean_rank": sum(p["ranks"]) / len(p["ranks"]),
                        "worst_gap_db": max(p["gaps"]), "mean_sqnr_db": sum(p["sqnr"]) / len(p["sqnr"])})
    return sorted(out, key=lambda x: (x["mean_rank"], x["worst_gap_db"]))


def _cell(m: dict) -> str:
    if "error" in m:
        return "failed"
    key = next(k for k in PRIMARY if k in m)
    v = m[key]
    prim = f"{v:.3f}" if key == "cos_mean" else f"{100 * v:.0f}%"
    return f"{m['sqnr_db']:.1f} / {prim}"


def markdown(meta: dict, results: dict, observers: list[str], with_peers: bool) -> str:
    guarded = any("default" in r["methods"] for r in results.values())
    cols = (["default"] if guarded else []) + observers + \
        (["pt2e", "ort-static"] if with_peers else [])
    lines = [f"# Observer zoo ({meta['date']}, {meta['cpu']}, commit {meta['commit']})", "",
             "Cells: output SQNR dB / task metric (top-1 agreement with fp32; cos = mean "
             "cosine of sentence embeddings; IoU of text maps; CTC tokens agreeing). "
             "`default`: the plain default `quantize` (MSE, accuracy guard on; in brackets "
             "the nodes the guard raised to int16 / float and the integer convs/linears/"
             "matmuls of the model's total). Observer columns: the default flow without the "
             "guard, only the activation observer changed. Peers: the convs/linears/matmuls "
             "they made int8 of the model's total in brackets.", "",
             "| model | group | " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        cells = []
        for c in cols:
            m = r["methods"].get(c, {"error": "not run"})
            cell = _cell(m)
            if c in ("pt2e", "ort-static") and "error" not in m:
                cell += f" [{m['int8_compute']}/{r['compute_ops']}]"
            if c == "default" and "error" not in m:
                g = m["guard"]
                cell += (f" [{g['int16']} int16, {g['float']} float; "
                         f"{m['int8_compute']}/{r['compute_ops']}]")
            cells.append(cell)
        lines.append(f"| {name} | {r['group']} | " + " | ".join(cells) + " |")
    for group in ("tune", "held-out") if observers else ():
        lines += ["", f"Ranking on the {group} models (by SQNR):", "",
                  "| observer | mean rank | worst gap to best (dB) | mean SQNR (dB) |",
                  "|---|---:|---:|---:|"]
        for x in rank(results, observers, group):
            lines.append(f"| {x['observer']} | {x['mean_rank']:.2f} | {x['worst_gap_db']:.2f} "
                         f"| {x['mean_sqnr_db']:.2f} |")
    lines += ["", "Models: " + "; ".join(f"{n}: {r['what']}" for n, r in results.items())]
    return "\n".join(lines) + "\n"


def _meta() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "commit": commit,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--observers", nargs="*", default=list(OBSERVERS), choices=list(OBSERVERS))
    p.add_argument("--no-peers", action="store_true", help="skip PT2E and ONNX Runtime")
    p.add_argument("--no-default", action="store_true",
                   help="skip the plain default quantize (guard on) column")
    p.add_argument("--out", default="observer-zoo-out", help="folder for the .md and .json")


def run_cli(args) -> int:
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    with_peers = not args.no_peers
    tasks = []
    for name in args.models:
        t = TASKS[name]()
        if t is None:
            print(f"{name}: wheel not installed, skipped (see tools/wheel_models.py)")
        else:
            tasks.append(t)
    n = len(tasks) * (len(args.observers) + 2 * with_peers + (not args.no_default))
    results, meta, out = {}, _meta(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, desc="observer zoo", unit="run") as bar:
        for t in tasks:
            bar.set_postfix_str(t.name)
            results[t.name] = evaluate(t, args.observers, with_peers, bar,
                                       guarded=not args.no_default)
            text = _write(out, meta, results, args.observers, with_peers)  # after each model
    print(text)
    return 0


def _write(out: Path, meta: dict, results: dict, observers: list[str], with_peers: bool) -> str:
    text = markdown(meta, results, observers, with_peers)
    (out / "observer-zoo.md").write_text(text)
    ranking = {g: rank(results, observers, g) for g in ("tune", "held-out")}
    (out / "observer-zoo.json").write_text(json.dumps(
        {"meta": meta, "observers": {k: list(v) for k, v in OBSERVERS.items()},
         "results": results, "ranking": ranking}, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
