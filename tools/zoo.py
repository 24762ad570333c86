"""``ptq zoo`` / ``python -m tools.zoo``: real-world architectures through every stage (issue 14).

Builds small random-init models of ``transformers`` architectures (offline, from config classes)
plus the project's own models (tools/models.py), each wrapped to take tensors and return one
tensor, and runs for each:

    build -> quantize -> coverage -> int-graph -> sqnr -> compile -> run -> match

  * quantize: ``ptqpasses.quantize`` (text models: a dynamic sequence dimension);
  * coverage: how many convs/linears became integer ops (``ptqpasses.coverage``);
  * int-graph: the torch integer graph on a new batch (another batch size, another length);
  * sqnr: its output against the fp32 model's, in dB;
  * compile: ``ptqpasses_backends.tvm.compile(q, target="host")``;
  * run: the compiled module on the new batch;
  * match: equal to the torch integer graph, or (graphs with float islands: LayerNorm,
    softmax, GELU...) within ``ISLAND_LSB`` steps of the output scale (a float output: a
    share of its largest magnitude), the tolerances of tools/islands.py (as tools/fuzz.py).

A failing stage is recorded as (stage, exception type, first line of its message); the stages
after it that need its result are skipped. Peers (``--peers pt2e ort``): how many convs/linears
torchao PT2E (X86InductorQuantizer) and ONNX Runtime static quantization made int8.

Each model runs in a forked child (a crash or ``--budget`` overrun is that model's failure, not
the sweep's). ``transformers`` is imported here only, lazily: ``pip install -e '.[zoo]'`` then
``pip install --no-deps 'transformers==5.25.*'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

# (graphs with float islands: mismatches within tools/islands.py's tolerances pass)
from ptqpasses_tools.islands import ISLAND_LSB, float_rtol

STAGES = ("build", "quantize", "coverage", "int-graph", "sqnr", "compile", "run", "match")
INSTALL = ("transformers is not installed: pip install -e '.[zoo]' && "
           "pip install --no-deps 'transformers==5.25.*'")

# Shapes: calibration and the quantize example use EXAMPLE, the check a new batch (and length).
# 16 calibration batches (32 samples; every peer gets the same): the accuracy guard holds a
# quarter of them out and judges the plan there. With 4 (6 samples to calibrate on, 2 to
# judge) the held-out samples left the calibrated ranges of random-init beit / swin, which
# the guard then raised to float for nothing (2026-12-06, Intel Xeon: beit 13.4 dB held-out
# -> its classifier float; 16 batches: 36.0 dB held-out, nothing raised; check SQNR 36.9 dB).
BATCH, SEQ, CALIB_BATCHES = 2, 8, 16
CHECK_BATCH, CHECK_SEQ = 3, 12
VOCAB = 100


class ZooError(Exception):
    """A stage's own verdict (a mismatch), not an exception of the code under test."""


# ---------------------------------------------------------------------------------------------
# Architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: ``make()`` returns the float model (taking tensors, returning one
    tensor); ``inputs(batch, seq, seed)`` its positional inputs. ``text``: dims 1 of the
    inputs are one dynamic ``seq`` dimension."""

    name: str
    kind: str  # encoder, decoder, vit, cnn, segmenter, own
    make: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], tuple]
    text: bool = False

    def dynamic_dims(self, n: int, static_seq: bool = False) -> Optional[dict]:
        return {i: {1: "seq"} for i in range(n)} if self.text and not static_seq else None


class HFWrapper(nn.Module):
    """Calls a ``transformers`` model with keyword inputs, returns one output field."""

    def __init__(self, model: nn.Module, names: tuple, output: str, **kwargs):
        super().__init__()
        self.model, self.names, self.output, self.kwargs = model, names, output, kwargs

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Named parameters, not *args: torch.export matches dynamic_shapes to the signature.
        xs = (x,) if mask is None else (x, mask)
        out = self.model(**dict(zip(self.names, xs)), return_dict=True, **self.kwargs)
        return getattr(out, self.output)


def _transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(INSTALL)
    import transformers
    return transformers


def text_inputs(batch: int, seq: int, seed: int) -> tuple:
    """Token ids in [3, VOCAB) (clear of pad/bos/eos ids) and a mask with padding in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


def image_inputs(size: int) -> Callable[[int, int, int], tuple]:
    def make(batch: int, seq: int, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, size, size, generator=g),)
    return make


_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=128)
_DECODER = dict(_TEXT, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def reinit(model: nn.Module) -> nn.Module:
    """Weights with the scale of a trained CNN: convs N(0, 2/fan_in), linears N(0, 1/fan_in),
    BatchNorm with non-trivial statistics. transformers' training inits (zero classifier
    weights, N(0, 0.02) convs) leave some random CNNs with outputs of 0 or 1e-33 (EfficientNet,
    MobileNetV1, LeViT), where an SQNR means nothing."""
    from ptqpasses_tools.models import randomize_bn_stats
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                gain = 2.0 if isinstance(m, nn.Conv2d) else 1.0
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(gain / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return randomize_bn_stats(model)


def _hf(config: str, model: str, output: str, names=("input_ids", "attention_mask"),
        attn: Optional[str] = "sdpa", trained_scale: bool = False,
        **cfg) -> Callable[[], nn.Module]:
    """A factory: ``transformers.<config>(**cfg)`` -> ``<model>`` -> HFWrapper (``reinit``
    with ``trained_scale``)."""
    def make() -> nn.Module:
        tf = _transformers()
        config_obj = getattr(tf, config)(**cfg)
        if attn is not None:
            config_obj._attn_implementation = attn
        kwargs = {"use_cache": False} if output == "logits" and "CausalLM" in model else {}
        m = getattr(tf, model)(config_obj)
        return HFWrapper((reinit(m) if trained_scale else m).eval(), names, output, **kwargs)
    return make


def _encoder(name, config, model="", **cfg) -> Arch:
    model = model or config.replace("Config", "Model")
    return Arch(name, "encoder", _hf(config, model, "last_hidden_state", **{**_TEXT, **cfg}),
                text_inputs, text=True)


def _decoder(name, config, model="", drop=(), **cfg) -> Arch:
    model = model or config.replace("Config", "ForCausalLM")
    kw = {k: v for k, v in {**_DECODER, **cfg}.items() if k not in drop}
    return Arch(name, "decoder", _hf(config, model, "logits", **kw), text_inputs, text=True)


_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=10)


def _image(name, kind, config, model, size=32, output="logits", **cfg) -> Arch:
    return Arch(name, kind, _hf(config, model, output, names=("pixel_values",),
                                trained_scale=kind in ("cnn", "segmenter"), **cfg),
                image_inputs(size))


def _own(name: str) -> Arch:
    from ptqpasses_tools import models

    def make_resnet():
        return models.randomize_bn_stats(models.resnet18(num_classes=10)).eval()

    def make_mobilenet():
        return models.randomize_bn_stats(models.mobilenet_v2(num_classes=10)).eval()

    def make_bert():
        return models.bert_encoder(hidden=32, heads=2, ffn=64, layers=2, vocab=VOCAB).eval()

    if name == "own-bert_encoder":
        return Arch(name, "own", make_bert, text_inputs, text=True)
    return Arch(name, "own", make_resnet if name == "own-resnet18" else make_mobilenet,
                image_inputs(64))


def architectures() -> list[Arch]:
    """Every architecture of the sweep (building one imports transformers; listing does not)."""
    enc = [
        _encoder("bert", "BertConfig"),
        _encoder("distilbert", "DistilBertConfig", dim=32, n_layers=2, n_heads=2,
                 hidden_dim=64),
        _encoder("roberta", "RobertaConfig", pad_token_id=1),
        _encoder("xlm-roberta", "XLMRobertaConfig", pad_token_id=1),
        _encoder("albert", "AlbertConfig", embedding_size=16),
        _encoder("electra", "ElectraConfig", embedding_size=16),
        _encoder("deberta", "DebertaConfig", relative_attention=True,
                 pos_att_type=["c2p", "p2c"], attn=None),
        _encoder("deberta-v2", "DebertaV2Config", relative_attention=True, position_buckets=16,
                 pos_att_type=["c2p", "p2c"], attn=None),
        _encoder("mpnet", "MPNetConfig", attn="eager"),
        _encoder("convbert", "ConvBertConfig", embedding_size=32, attn=None),
        _encoder("modernbert", "ModernBertConfig", global_attn_every_n_layers=2,
                 local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                 sep_token_id=2),
    ]
    dec = [
        _decoder("gpt2", "GPT2Config", model="GPT2LMHeadModel", drop=("hidden_size",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "num_key_value_heads"),
                 n_embd=32, n_layer=2, n_head=2, n_positions=128),
        _decoder("gpt-neo", "GPTNeoConfig", drop=("intermediate_size", "num_key_value_heads",
                 "num_hidden_layers", "num_attention_heads"), num_layers=2, num_heads=2,
                 attention_types=[[["global", "local"], 1]], window_size=4,
                 attn="eager"),
        _decoder("opt", "OPTConfig", drop=("intermediate_size", "num_key_value_heads"),
                 ffn_dim=64, word_embed_proj_dim=32),
        _decoder("llama", "LlamaConfig"),
        _decoder("mistral", "MistralConfig", sliding_window=None),
        _decoder("qwen2", "Qwen2Config"),
        _decoder("qwen3", "Qwen3Config", head_dim=16),
        _decoder("phi", "PhiConfig"),
        _decoder("gemma", "GemmaConfig", head_dim=16),
        _decoder("falcon", "FalconConfig", drop=("intermediate_size", "num_key_value_heads"),
                 new_decoder_architecture=False, multi_query=True),
        _decoder("bloom", "BloomConfig", drop=("intermediate_size", "num_key_value_heads",
                 "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
                 n_layer=2, n_head=2, attn="eager"),
        _decoder("gpt-neox", "GPTNeoXConfig", drop=("num_key_value_heads",)),
        _decoder("stablelm", "StableLmConfig"),
        _decoder("olmo", "OlmoConfig"),
    ]
    vit = [
        _image("vit", "vit", "ViTConfig", "ViTForImageClassification", **_VIT),
        _image("deit", "vit", "DeiTConfig", "DeiTForImageClassification", **_VIT),
        _image("beit", "vit", "BeitConfig", "BeitForImageClassification",
               use_relative_position_bias=True, **_VIT),
        _image("dinov2", "vit", "Dinov2Config", "Dinov2ForImageClassification",
               **{k: v for k, v in _VIT.items() if k != "intermediate_size"}, mlp_ratio=2),
        _image("swin", "vit", "SwinConfig", "SwinForImageClassification", embed_dim=16,
               depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=32, patch_size=4,
               num_labels=10, attn=None),
    ]
    cnn = [
        _image("resnet", "cnn", "ResNetConfig", "ResNetForImageClassification",
               embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, attn=None),
        _image("convnext", "cnn", "ConvNextConfig", "ConvNextForImageClassification",
               num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, attn=None),
        _image("convnextv2", "cnn", "ConvNextV2Config", "ConvNextV2ForImageClassification",
               num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, attn=None),
        _image("mobilenet-v1", "cnn", "MobileNetV1Config", "MobileNetV1ForImageClassification",
               depth_multiplier=0.25, image_size=32, num_labels=10, attn=None),
        _image("mobilenet-v2", "cnn", "MobileNetV2Config", "MobileNetV2ForImageClassification",
               depth_multiplier=0.35, image_size=32, num_labels=10, attn=None),
        _image("regnet", "cnn", "RegNetConfig", "RegNetForImageClassification",
               embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
               num_labels=10, attn=None),
        _image("efficientnet", "cnn", "EfficientNetConfig", "EfficientNetForImageClassification",
               width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320,
               num_labels=10, attn=None),
        _image("mobilevit", "cnn", "MobileViTConfig", "MobileViTForImageClassification",
               size=64, image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16,
               24, 24, 32], num_attention_heads=2, num_labels=10, attn=None),
        _image("levit", "cnn", "LevitConfig", "LevitForImageClassification", size=64,
               image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
               depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10, attn=None),
        _image("poolformer", "cnn", "PoolFormerConfig", "PoolFormerForImageClassification",
               hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_labels=10, attn=None),
    ]
    seg = [
        _image("segformer", "segmenter", "SegformerConfig", "SegformerForSemanticSegmentation",
               size=64, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
               hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32,
               patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], num_labels=4, attn=None),
    ]
    own = [_own(n) for n in ("own-resnet18", "own-mobilenet_v2", "own-bert_encoder")]
    return enc + dec + vit + cnn + seg + own


def select(names: Optional[str]) -> list[Arch]:
    archs = architectures()
    if not names:
        return archs
    by_name = {a.name: a for a in archs}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown architecture(s) {', '.join(unknown)}; --list shows them")
    return [by_name[n] for n in wanted]


# ---------------------------------------------------------------------------------------------
# Stages


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def _first(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


_CONV_LINEAR = ("conv", "linear", "addmm")


def conv_linear_coverage(cov) -> tuple[int, int]:
    """(integer, total) convs/linears among ``ptqpasses.coverage`` entries."""
    hits = [c for c in cov if any(k in c.op.split(".")[1 if c.op.startswith(("ptq.", "aten."))
                                                         else 0] for k in _CONV_LINEAR)]
    return sum(c.integer for c in hits), len(hits)


def output_scale(q) -> Optional[float]:
    """The scale of the dequantize producing the graph's output (None: a float output)."""
    out = next(n for n in q.graph.nodes if n.op == "output")
    arg = out.args[0]
    while isinstance(arg, (tuple, list)):
        arg = arg[0]
    ok = getattr(arg, "target", None) is torch.ops.ptq.dequantize.default
    return float(arg.args[1]) if ok and isinstance(arg.args[1], (float, int)) else None


def compare(got: torch.Tensor, want: torch.Tensor, scale: Optional[float],
            rtol: float) -> dict:
    """Exactness of ``got`` against ``want``; ``lsb``: max |diff| in steps of ``scale`` (or, a
    float output, relative to max |want|)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise ZooError(f"output {got.dtype}{list(got.shape)}, torch integer graph "
                       f"{want.dtype}{list(want.shape)}")
    diff = (got.double() - want.double()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    mag = float(want.double().abs().max()) if want.numel() else 0.0
    if scale is not None:
        rel, unit, ok = worst / scale, "LSB", worst <= ISLAND_LSB * scale * (1 + 1e-6)
    else:
        rel, unit = worst / max(mag, 1e-30), "of max abs ref"
        ok = worst <= rtol * mag
    return {"exact": worst == 0.0, "max_diff": worst, "rel": rel, "unit": unit,
            "differ": int((diff > 0).sum()), "numel": want.numel(), "ok": ok}


def _count_pt2e(gm: torch.fx.GraphModule) -> int:
    """Convs/linears whose weight and input both come from dequantize nodes."""
    def dq(a):
        return isinstance(a, torch.fx.Node) and "dequantize" in str(a.target)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and any(k in str(n.target) for k in ("conv", "linear", "addmm"))
               and len(n.args) > 1 and dq(n.args[0]) and dq(n.args[1]))


def _count_onnx(path: Path) -> int:
    """Conv/Gemm/MatMul nodes fed by DequantizeLinear of a constant weight and of an activation."""
    import onnx
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    const = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output} | inits
    producer = {o: n for n in m.graph.node for o in n.output}

    def dq(name, weight):
        n = producer.get(name)
        if n is None or n.op_type != "DequantizeLinear":
            return False
        return (n.input[0] in const) == weight

    count = 0
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            a, b = n.input[0], n.input[1]
            if (dq(a, False) and dq(b, True)) or (dq(a, True) and dq(b, False)):
                count += 1
    return count


def run_peer(peer: str, model: nn.Module, calib: list, dyn: Optional[dict]) -> dict:
    from ptqpasses_tools import peers
    t = time.perf_counter()
    try:
        if peer == "pt2e":
            why = peers.needs("torchao")
            if why:
                return {"ok": False, "error": why, "seconds": 0.0}
            gm = peers.pt2e_int8(model, calib, dynamic_batch=True, dynamic_dims=dyn)
            n = _count_pt2e(gm)
        elif peer == "ort":
            why = peers.needs("onnxruntime", "onnx")
            if why:
                return {"ok": False, "error": why, "seconds": 0.0}
            with tempfile.TemporaryDirectory() as d:
                fp32 = peers.export_onnx(model, calib[0], Path(d) / "model.onnx",
                                         dynamic_batch=True, dynamic_dims=dyn)
                n = _count_onnx(peers.ort_int8(fp32, calib, static=True))
        else:
            raise ValueError(f"unknown peer {peer!r} (pt2e, ort)")
    except Exception as e:  # a peer's failure is a row entry, not the sweep's
        return {"ok": False, "error": f"{type(e).__name__}: {first_line(e)}",
                "seconds": time.perf_counter() - t}
    return {"ok": True, "int8": n, "seconds": time.perf_counter() - t}


def run_arch(arch: Arch, peer_names: tuple = (), report: Callable[[str], None] = lambda s: None,
             seed: int = 0, static_seq: bool = False) -> dict:
    """Every stage of one architecture; a stage's exception ends the stages that need it.
    ``static_seq``: text models keep the example's length (only the batch is dynamic)."""
    import ptqpasses
    from ptqpasses_backends import tvm as tvm_backend

    row: dict[str, Any] = {"name": arch.name, "kind": arch.kind, "stages": {}, "seconds": {},
                           "failure": None, "peers": {}}
    state: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any]) -> bool:
        report(name)
        t = time.perf_counter()
        try:
            fn()
            row["stages"][name] = "ok"
            return True
        except Exception as e:
            row["stages"][name] = "fail"
            if row["failure"] is None:
                row["failure"] = {"stage": name, "type": type(e).__name__,
                                  "message": first_line(e)}
            row.setdefault("errors", {})[name] = {
                "type": type(e).__name__, "message": first_line(e),
                "traceback": traceback.format_exc(limit=-6)[-3000:]}
            return False
        finally:
            row["seconds"][name] = round(time.perf_counter() - t, 2)

    def build():
        torch.manual_seed(seed)
        state["model"] = arch.make().eval()
        state["example"] = arch.inputs(BATCH, SEQ, seed)
        state["calib"] = [arch.inputs(BATCH, SEQ, seed + 1 + i) for i in range(CALIB_BATCHES)]
        seq = CHECK_SEQ if arch.text and not static_seq else SEQ
        state["check"] = arch.inputs(CHECK_BATCH, seq, seed + 99)
        row["class"] = type(getattr(state["model"], "model", state["model"])).__name__
        row["params"] = sum(p.numel() for p in state["model"].parameters())

    def quantize():
        dyn = arch.dynamic_dims(len(state["example"]), static_seq)
        state["q"] = ptqpasses.quantize(state["model"], state["example"], state["calib"],
                                        progress=False, dynamic_dims=dyn)

    def coverage():
        cov = ptqpasses.coverage(state["q"])
        row["conv_linear"] = list(conv_linear_coverage(cov))
        row["compute"] = [sum(c.integer for c in cov), len(cov)]
        row["float_reasons"] = sorted({f"{c.op}: {c.reason}"[:160] for c in cov
                                       if not c.integer})[:20]

    def int_graph():
        with torch.no_grad():
            state["want"] = _first(state["q"](*state["check"]))

    def sqnr():
        from ptqpasses.report import sqnr as sqnr_db
        with torch.no_grad():
            ref = _first(state["model"](*state["check"]))
        row["sqnr_db"] = round(sqnr_db(ref, state["want"]), 2)

    def compile_():
        state["cm"] = tvm_backend.compile(state["q"], target="host")

    def run():
        state["got"] = _first(state["cm"](*state["check"]))

    def match():
        m = compare(state["got"], state["want"], output_scale(state["q"]),
                    float_rtol(state["q"]))
        row["match"] = m
        if not m["ok"]:
            raise ZooError(f"{m['differ']} of {m['numel']} outputs differ, max "
                           f"{m['max_diff']:.4g} ({m['rel']:.3g} {m['unit']})")

    steps = {"build": build, "quantize": quantize, "coverage": coverage, "int-graph": int_graph,
             "sqnr": sqnr, "compile": compile_, "run": run, "match": match}
    needs = {"quantize": "build", "coverage": "quantize", "int-graph": "quantize",
             "sqnr": "int-graph", "compile": "quantize", "run": "compile", "match": "run"}
    needs_too = {"match": "int-graph"}
    for name in STAGES:
        deps = [d for d in (needs.get(name), needs_too.get(name)) if d]
        if all(row["stages"].get(d) == "ok" for d in deps):
            stage(name, steps[name])
        else:
            row["stages"][name] = "skip"
    if row["stages"]["build"] == "ok":
        for p in peer_names:
            report(f"peer {p}")
            row["peers"][p] = run_peer(p, state["model"], state["calib"],
                                       arch.dynamic_dims(len(state["example"]), static_seq))
    row["passed"] = all(row["stages"][s] == "ok" for s in STAGES)
    row["total_seconds"] = round(sum(row["seconds"].values()) + sum(
        p.get("seconds", 0) for p in row["peers"].values()), 2)
    return row


def _child(arch: Arch, peer_names: tuple, static_seq: bool, conn) -> None:
    try:
        row = run_arch(arch, peer_names, report=lambda s: conn.send(("stage", s)),
                       static_seq=static_seq)
        conn.send(("row", row))
    except BaseException as e:  # noqa: BLE001  (anything: the parent records it)
        conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))
    finally:
        conn.close()


def run_isolated(arch: Arch, peer_names: tuple = (), budget: Optional[float] = None,
                 static_seq: bool = False) -> dict:
    """``run_arch`` in a forked child: a crash, or running past ``budget`` seconds, becomes
    the row's failure at the stage it was in."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(arch, peer_names, static_seq, child), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    current, row, error = "build", None, None
    deadline = None if budget is None else t0 + budget
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            if not parent.poll(timeout):
                proc.kill()
                error = ("Timeout", f"over the budget of {budget:g} s")
                break
            kind, value = parent.recv()
        except EOFError:  # the child died without a row
            proc.join()
            error = ("Crash", f"the process died (exit code {proc.exitcode})")
            break
        if kind == "stage":
            current = value
        elif kind == "row":
            row = value
            break
        else:
            error = ("Error", value)
            break
    proc.join(5)
    if row is not None:
        return row
    stages = {s: ("ok" if current in STAGES and STAGES.index(s) < STAGES.index(current) else
                  "fail" if s == current else "skip") for s in STAGES}
    return {"name": arch.name, "kind": arch.kind, "stages": stages, "seconds": {},
            "failure": {"stage": current, "type": error[0], "message": error[1]},
            "peers": {}, "passed": False, "total_seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# Table


def _cell_match(r: dict) -> str:
    m = r.get("match")
    if r["stages"]["match"] == "skip" or m is None:
        return r["stages"]["match"]
    if m["exact"]:
        return "exact"
    return f"{m['rel']:.2g} {m['unit']}" + ("" if m["ok"] else " FAIL")


def _cell_peer(r: dict, p: str) -> str:
    v = r["peers"].get(p)
    if v is None:
        return ""
    return str(v["int8"]) if v["ok"] else "fail"


def to_markdown(rows: list[dict], peer_names: tuple) -> str:
    head = ["model", "kind", "quantize", "int conv/linear", "compile", "run", "match (new batch)",
            "SQNR dB"] + [f"{p} int8" for p in peer_names] + ["s", "first failure"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if h in ("SQNR dB", "s") else "---" for h in head) + "|"]
    for r in rows:
        st = r["stages"]
        cl = r.get("conv_linear")
        f = r["failure"]
        fail = "" if f is None else f"{f['stage']}: {f['type']}: {f['message']}"[:220]
        fail = fail.replace("|", "\\|")
        cells = [r["name"], r["kind"], st["quantize"], f"{cl[0]}/{cl[1]}" if cl else "",
                 st["compile"], st["run"], _cell_match(r),
                 "" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}"]
        cells += [_cell_peer(r, p) for p in peer_names]
        cells += [f"{r['total_seconds']:.0f}", fail]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    counts = {s: sum(r["stages"][s] == "ok" for r in rows) for s in STAGES}
    counts["all"] = sum(r["passed"] for r in rows)
    counts["models"] = len(rows)
    return counts


def failure_classes(rows: list[dict]) -> dict[str, list[str]]:
    """'stage: Type: first line' -> architectures (every failing stage, not only the first;
    quoted names lose a ``_<number>`` suffix and gain ``*``), then 'peer p: Type: first line'."""
    out: dict[str, list[str]] = {}
    for r in rows:
        errors = r.get("errors") or ({r["failure"]["stage"]: r["failure"]} if r["failure"] else {})
        for stage, e in errors.items():
            # node names differ by a suffix from model to model: to_3 / to_1 / to -> to*
            message = re.sub(r"'([^'\s]*?)(?:_\d+)?'", r"'\1*'", e["message"])
            out.setdefault(f"{stage}: {e['type']}: {message}", []).append(r["name"])
        for peer, v in r.get("peers", {}).items():
            if not v["ok"]:
                out.setdefault(f"peer {peer}: {v['error']}", []).append(r["name"])
    return out


def machine() -> dict:
    import tvm
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    versions = {"torch": torch.__version__, "tvm": tvm.__version__}
    if importlib.util.find_spec("transformers"):
        import transformers
        versions["transformers"] = transformers.__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions,
            "date": datetime.date.today().isoformat()}


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="comma-separated architectures (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the architectures and exit")
    p.add_argument("--peers", nargs="*", default=[], choices=["pt2e", "ort"],
                   help="also count the convs/linears these quantizers make int8 (slow)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per model (its stage at the time is recorded as a Timeout)")
    p.add_argument("--threads", type=int, default=1, help="torch / TVM threads (default 1)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run models in this process (no crash isolation, no --budget)")
    p.add_argument("--static-seq", action="store_true",
                   help="text models: a fixed sequence length (only the batch is dynamic)")
    p.add_argument("--out", help="folder for zoo.md and zoo.json")


def run(args) -> int:
    from ptqpasses_tools.inputs import UsageError
    try:
        archs = select(args.models)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.list:
        for a in archs:
            print(f"{a.name:18s} {a.kind}")
        return 0
    if importlib.util.find_spec("transformers") is None and any(
            a.kind != "own" for a in archs):
        raise UsageError(INSTALL)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    peer_names = tuple(args.peers)
    import ptqpasses_backends.tvm  # noqa: F401  (imported once, before forking)
    if any(a.kind != "own" for a in archs):
        _transformers()
    rows = []
    for a in archs:
        t = time.perf_counter()
        row = (run_arch(a, peer_names, static_seq=args.static_seq) if args.no_isolate else
               run_isolated(a, peer_names, args.budget, args.static_seq))
        rows.append(row)
        f = row["failure"]
        status = "pass" if row["passed"] else f"{f['stage']}: {f['type']}: {f['message']}"[:150]
        print(f"[{len(rows)}/{len(archs)}] {a.name}: {status} ({time.perf_counter() - t:.0f} s)",
              file=sys.stderr, flush=True)
    table = to_markdown(rows, peer_names)
    counts = summary(rows)
    text = (table + "\n\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()
                                       if k not in ("all", "models"))
            + f"\n\n**{counts['all']} of {counts['models']} pass every stage.**\n")
    classes = failure_classes(rows)
    if classes:
        text += "\nFailure classes (stage: error: first line -> architectures):\n\n" + "\n".join(
            f"- {k.replace('|', '/')}: {', '.join(v)}" for k, v in
            sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])))
        text += "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "zoo.md").write_text(text)
        (out / "zoo.json").write_text(json.dumps(
            {"machine": machine(), "peers": list(peer_names), "static_seq": args.static_seq,
             "summary": counts,
             "failure_classes": classes, "rows": rows}, indent=1, default=str))
        print(f"wrote {out / 'zoo.md'} and {out / 'zoo.json'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.zoo", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from ptqpasses_tools.inputs import UsageError
    try:
        return run(args)
    except UsageError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
