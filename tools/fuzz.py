"""Property-based fuzzing of whole graphs: random small float models -> ``ptqpasses.quantize``
-> the integer fx graph (run in torch) is the reference -> ``ptqpasses_backends.tvm.compile`` -> the
compiled module must give the same outputs, bit for bit, on a new input of another batch size.

    python -m tools.fuzz --graphs 200 --budget 600 --seed 0 --out fuzz.json

A model is drawn by hypothesis as a ``ModelSpec``: an input shape and a list of ``Layer`` s
(conv / grouped / depthwise, linear, attention-style matmuls, residual add / mul, cat, pools,
reshapes, activations, norms), plus "nasty" cases: dead output channels, constant inputs,
input scales from 1e-4 to 1e4. Each graph is compiled for one runnable target, graph ``i`` for
``targets[i % n]`` (``--all-targets``: every target). A failure is shrunk by hypothesis to a
small spec, printed so that ``ModelSpec.build()`` rebuilds it.

Outcomes per graph:
  * checked: outputs equal (``torch.equal``, same dtype and shape) on a target;
  * refused: quantize raised a documented error (``REFUSALS``), counted by its first line;
  * failure: anything else (a crash or unclear exception in quantize / the reference, a compile
    or run error of a graph quantize accepted, a mismatch).

Graphs with float islands (softmax, layer_norm: float kernels that are documented to be within
a few ulps of ATen's, not bit-exact; ``tests/backends/test_graphs.py``) are held to the same
bit-exact check, but their mismatches are counted apart (``island_mismatch``) when every output
is within ``ISLAND_LSB`` steps of its output scale (a float output: ``ISLAND_FLOAT_RTOL`` of
the largest float magnitude in the reference run, ``float_magnitude``: an output that cancels
to ~0, such as the mean of a layer_norm, is judged against the values it was computed from;
``tools/islands.py``'s wider tolerance where a per-token linear reads an island); beyond
that they are failures. A per-token linear's float bias add is exact and makes no island.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn

# Mismatches of float-island graphs within tools/islands.py's tolerances (output LSBs; float
# outputs relative to the largest float value of the reference run, ``float_magnitude``) are
# counted, not failures.
from ptqpasses_tools.islands import ISLAND_FLOAT_RTOL, ISLAND_LSB, float_rtol

ACTIVATIONS = ("relu", "relu6", "hardtanh", "gelu", "sigmoid", "tanh", "hardswish", "silu",
               "leaky_relu")


# ---------------------------------------------------------------------------------------------
# The spec: plain data, printable, rebuilt into an nn.Module deterministically.


@dataclasses.dataclass(frozen=True)
class Layer:
    """One drawn layer: ``op`` and its parameters (``args``: sorted (name, value) pairs)."""

    op: str
    args: tuple = ()

    def get(self, name: str, default=None):
        return dict(self.args).get(name, default)

    def __repr__(self) -> str:
        return f"{self.op}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def layer(op: str, **kw) -> Layer:
    return Layer(op, tuple(sorted(kw.items())))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A drawn model and the data it is checked on.

    Attributes:
        shape: Per-sample input shape: (C, H, W), (T, D) or (F,).
        layers: The layers, in order.
        seed: Seeds the weights and the data.
        example_batch: Batch of the example and calibration inputs.
        test_batch: Batch of the input the outputs are compared on.
        input_scale: Inputs are ``randn * input_scale + input_offset``.
        input_offset: See ``input_scale``.
        constant: ``"none"``, ``"test"`` (the compared input is one repeated value) or
            ``"all"`` (calibration and compared inputs too).
    """

    shape: tuple
    layers: tuple
    seed: int = 0
    example_batch: int = 2
    test_batch: int = 3
    input_scale: float = 1.0
    input_offset: float = 0.0
    constant: str = "none"

    def describe(self) -> str:
        lines = [f"input: per-sample shape {self.shape}, example batch {self.example_batch}, "
                 f"test batch {self.test_batch}, randn * {self.input_scale:g} + "
                 f"{self.input_offset:g}, constant={self.constant!r}, seed {self.seed}"]
        shape = self.shape
        for i, lay in enumerate(self.layers):
            shape = out_shape(lay, shape)
            lines.append(f"  {i}: {lay!r} -> {shape}")
        return "\n".join(lines)

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return FuzzModel(self).eval()

    def data(self) -> tuple[torch.Tensor, list, torch.Tensor]:
        """(example input, calibration batches, compared input)."""
        g = torch.Generator().manual_seed(self.seed + 1)

        def batch(n: int, constant: bool) -> torch.Tensor:
            if constant:
                v = float(torch.randn((), generator=g)) * self.input_scale + self.input_offset
                return torch.full((n, *self.shape), v)
            return torch.randn((n, *self.shape), generator=g) * self.input_scale + self.input_offset

        const = self.constant == "all"
        calib = [(batch(self.example_batch, const),) for _ in range(3)]
        return calib[0][0], calib, batch(self.test_batch, self.constant != "none")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [repr(lay) for lay in self.layers]
        return d


def out_shape(lay: Layer, shape: tuple) -> tuple:
    """Per-sample output shape of ``lay`` on a per-sample input of ``shape``."""
    probe = torch.zeros((1, *shape))
    with torch.no_grad(), torch.random.fork_rng():
        return tuple(make_block(lay, shape).eval()(probe).shape[1:])


# ---------------------------------------------------------------------------------------------
# Building blocks.


def activation(name: Optional[str]) -> Callable:
    return {None: lambda x: x, "relu": F.relu, "relu6": F.relu6,
            "hardtanh": lambda x: F.hardtanh(x, 0.0, 6.0), "gelu": F.gelu,
            "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardswish": F.hardswish,
            "silu": F.silu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1)}[name]


def _scale_and_kill(m: nn.Module, lay: Layer) -> None:
    """Weight magnitude ``10**wexp``; dead output channels: weights 0 or ~1e-9, bias nonzero."""
    with torch.no_grad():
        m.weight.mul_(10.0 ** lay.get("wexp", 0))
        dead, mode = lay.get("dead", ()), lay.get("dead_mode", "zero")
        for c in dead:
            if c < m.weight.shape[0]:
                m.weight[c] = 0.0 if mode == "zero" else torch.randn_like(m.weight[c]) * 1e-9
                if m.bias is not None:
                    m.bias[c] = 0.5 if c % 2 else -0.75


class Conv(nn.Module):
    def __init__(self, lay: Layer, cin: int):
        super().__init__()
        g = lay.get("groups")
        self.conv = nn.Conv2d(cin, lay.get("cout"), lay.get("k"), lay.get("stride"),
                              lay.get("pad"), groups=g, bias=lay.get("bias"))
        _scale_and_kill(self.conv, lay)
        self.bn = None
        if lay.get("bn"):
            self.bn = nn.BatchNorm2d(lay.get("cout"))
            with torch.no_grad():
                self.bn.running_mean.normal_(0, 0.5)
                self.bn.running_var.uniform_(0.2, 2.0)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.normal_(0, 0.3)
        self.act = activation(lay.get("act"))

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y) if self.bn is not None else y)


class Linear(nn.Module):
    def __init__(self, lay: Layer, din: int, dout: Optional[int] = None):
        super().__init__()
        self.fc = nn.Linear(din, dout or lay.get("dout"), bias=lay.get("bias", True))
        _scale_and_kill(self.fc, lay)
        self.act = activation(lay.get("act"))

    def forward(self, x):
        return self.act(self.fc(x))


class Pool(nn.Module):
    def __init__(self, lay: Layer):
        super().__init__()
        self.lay = lay

    def forward(self, x):
        g = self.lay.get
        if self.lay.op == "maxpool":
            return F.max_pool2d(x, g("k"), g("stride"), g("pad"), ceil_mode=g("ceil"))
        if self.lay.op == "avgpool":
            return F.avg_pool2d(x, g("k"), g("stride"), g("pad"), ceil_mode=g("ceil"),
                                count_include_pad=g("include_pad"))
        return F.adaptive_avg_pool2d(x, g("size"))


class Residual(nn.Module):
    """``act(x op f(x))`` with ``op`` add or mul and ``f`` a shape-keeping conv or linear."""

    def __init__(self, lay: Layer, shape: tuple):
        super().__init__()
        branch = lay.get("branch")
        if len(shape) == 3:
            self.f = Conv(branch, shape[0])
        else:
            self.f = Linear(branch, shape[-1], shape[-1])
        self.mul = lay.get("combine") == "mul"
        self.act = activation(lay.get("act"))

    def forward(self, x):
        y = self.f(x)
        return self.act(x * y if self.mul else x + y)


class Cat(nn.Module):
    """``cat([x, f(x)])`` on the channel (images) or feature (last) axis."""

    def __init__(self, lay: Layer, shape: tuple):
        super().__init__()
        branch = lay.get("branch")
        self.image = len(shape) == 3
        self.f = Conv(branch, shape[0]) if self.image else Linear(branch, shape[-1])
        self.swap = lay.get("swap")

    def forward(self, x):
        parts = [self.f(x), x] if self.swap else [x, self.f(x)]
        return torch.cat(parts, dim=1 if self.image else -1)


class Attention(nn.Module):
    """``(q @ k^T [* scale] [-> softmax]) @ v`` with q, k, v linear maps of ``x`` (N, T, D)."""

    def __init__(self, lay: Layer, d: int):
        super().__init__()
        dk, dv = lay.get("dk"), lay.get("dv")
        self.q, self.k, self.v = nn.Linear(d, dk), nn.Linear(d, dk), nn.Linear(d, dv)
        self.scale, self.softmax = lay.get("scale"), lay.get("softmax")

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        if self.scale:
            s = s * self.scale
        if self.softmax:
            s = torch.softmax(s, dim=-1)
        return s @ self.v(x)


class Norm(nn.Module):
    def __init__(self, lay: Layer, shape: tuple):
        super().__init__()
        if lay.op == "layernorm":
            self.norm = nn.LayerNorm(shape[-1], elementwise_affine=lay.get("affine"))
        else:
            self.norm = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(shape[0])
            with torch.no_grad():
                self.norm.running_mean.normal_(0, 0.5)
                self.norm.running_var.uniform_(0.2, 2.0)
        if lay.get("affine", True) and self.norm.weight is not None:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.normal_(0, 0.3)

    def forward(self, x):
        return self.norm(x)


class Reshape(nn.Module):
    def __init__(self, lay: Layer):
        super().__init__()
        self.op = lay.op

    def forward(self, x):
        n = x.shape[0]
        if self.op == "flatten":
            return torch.flatten(x, 1)
        if self.op == "to_seq":  # (N, C, H, W) -> (N, H*W, C)
            return x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        if self.op == "transpose":  # (N, T, D) -> (N, D, T)
            return x.transpose(1, 2)
        if self.op == "mean":  # images: over H, W; sequences: over T
            return x.mean(dim=(2, 3) if x.dim() == 4 else 1)
        raise ValueError(self.op)


class Act(nn.Module):
    def __init__(self, lay: Layer):
        super().__init__()
        self.act = activation(lay.get("act"))

    def forward(self, x):
        return self.act(x)


def make_block(lay: Layer, shape: tuple) -> nn.Module:
    op = lay.op
    if op == "conv":
        return Conv(lay, shape[0])
    if op == "linear":
        return Linear(lay, shape[-1])
    if op in ("maxpool", "avgpool", "adaptive_avgpool"):
        return Pool(lay)
    if op == "residual":
        return Residual(lay, shape)
    if op == "cat":
        return Cat(lay, shape)
    if op == "attention":
        return Attention(lay, shape[-1])
    if op in ("layernorm", "batchnorm"):
        return Norm(lay, shape)
    if op == "act":
        return Act(lay)
    return Reshape(lay)


class FuzzModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        blocks, shape = [], spec.shape
        for lay in spec.layers:
            blocks.append(make_block(lay, shape))
            shape = out_shape(lay, shape)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies.

MAX_FLAT = 256  # flatten only small feature maps: compile time grows with the weights


def _activations(draw, none_weight: int = 2) -> Optional[str]:
    return draw(st.sampled_from((None,) * none_weight + ACTIVATIONS))


def _dead(draw, cout: int) -> dict:
    if draw(st.integers(0, 7)) != 0:  # dead channels in about one weighted layer of eight
        return {}
    chans = draw(st.lists(st.integers(0, cout - 1), min_size=1, max_size=2, unique=True))
    return {"dead": tuple(sorted(chans)), "dead_mode": draw(st.sampled_from(["zero", "tiny"])),
            "bias": True}


def _wexp(draw) -> int:
    return draw(st.sampled_from([0, 0, 0, 0, -2, -1, 1, 2]))


def _conv(draw, cin: int, h: int, w: int, same: bool = False, cout: Optional[int] = None) -> Layer:
    kind = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if same:  # keeps (C, H, W): residual branches
        k = draw(st.sampled_from([1, 3]))
        stride, pad = 1, k // 2
    else:
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        pad = draw(st.integers(max(0, k - min(h, w)), 2))
    divisors = [d for d in range(2, cin) if cin % d == 0]
    if kind == "grouped" and divisors:
        groups = draw(st.sampled_from(divisors))
    elif kind == "depthwise":
        groups = cin
    else:
        groups = 1
    if cout is None:
        if groups == cin and cin > 1:
            cout = cin * draw(st.integers(1, 2))
        else:
            cout = groups * draw(st.integers(1, max(1, 8 // groups)))
    kw = {"cout": cout, "k": k, "stride": stride, "pad": pad, "groups": groups,
          "bias": draw(st.booleans()), "bn": draw(st.booleans()),
          "act": _activations(draw), "wexp": _wexp(draw)}
    kw.update(_dead(draw, cout))
    return layer("conv", **kw)


def _linear(draw, dout: Optional[int] = None) -> Layer:
    dout = dout if dout is not None else draw(st.integers(1, 16))
    kw = {"dout": dout, "bias": draw(st.booleans()), "act": _activations(draw),
          "wexp": _wexp(draw)}
    kw.update(_dead(draw, dout))
    return layer("linear", **kw)


def _image_layer(draw, shape: tuple) -> Layer:
    c, h, w = shape
    choices = ["conv"] * 4 + ["maxpool", "avgpool", "adaptive_avgpool", "residual", "cat",
                              "act", "batchnorm", "to_seq", "mean"]
    if c * h * w <= MAX_FLAT:
        choices.append("flatten")
    op = draw(st.sampled_from(choices))
    if op == "conv":
        return _conv(draw, c, h, w)
    if op in ("maxpool", "avgpool"):
        k = draw(st.integers(1, min(3, h, w) if min(h, w) >= 1 else 1))
        kw = {"k": k, "stride": draw(st.integers(1, 2)), "pad": draw(st.integers(0, k // 2)),
              "ceil": draw(st.booleans())}
        if op == "avgpool":
            kw["include_pad"] = draw(st.booleans())
        return layer(op, **kw)
    if op == "adaptive_avgpool":
        return layer(op, size=draw(st.sampled_from([1, 1, 2, 3])))
    if op == "residual":
        return layer(op, branch=_conv(draw, c, h, w, same=True, cout=c),
                     combine=draw(st.sampled_from(["add", "add", "mul"])), act=_activations(draw))
    if op == "cat":
        return layer(op, branch=_conv(draw, c, h, w, same=True), swap=draw(st.booleans()))
    if op == "act":
        return layer(op, act=draw(st.sampled_from(ACTIVATIONS)))
    return layer(op)


def _seq_layer(draw, shape: tuple) -> Layer:
    t, d = shape
    choices = ["linear"] * 3 + ["attention"] * 2 + ["residual", "cat", "act", "layernorm",
                                                      "transpose", "mean"]
    if t * d <= MAX_FLAT:
        choices.append("flatten")
    op = draw(st.sampled_from(choices))
    if op == "linear":
        return _linear(draw)
    if op == "attention":
        return layer(op, dk=draw(st.integers(1, 8)), dv=draw(st.integers(1, 8)),
                     scale=draw(st.sampled_from([None, None, 0.125, 0.5])),
                     softmax=draw(st.booleans()))
    return _common_vector_layer(draw, op, d)


def _flat_layer(draw, shape: tuple) -> Layer:
    choices = ["linear"] * 3 + ["residual", "cat", "act", "layernorm", "batchnorm"]
    return _common_vector_layer(draw, draw(st.sampled_from(choices)), shape[-1])


def _common_vector_layer(draw, op: str, d: int) -> Layer:
    if op == "linear":
        return _linear(draw)
    if op == "residual":
        return layer(op, branch=_linear(draw, dout=d),
                     combine=draw(st.sampled_from(["add", "add", "mul"])), act=_activations(draw))
    if op == "cat":
        return layer(op, branch=_linear(draw))
    if op == "act":
        return layer(op, act=draw(st.sampled_from(ACTIVATIONS)))
    if op == "layernorm":
        return layer(op, affine=draw(st.booleans()))
    return layer(op)


#: Constructs ``--exclude`` can leave out, with the known bug each one hits.
EXCLUDABLE = {
    "dead-tiny": "dead channels with ~1e-9 weights are drawn with exactly 0 weights instead: "
                 "lowering saturates their int32 bias (issue 15), so compile fails or the "
                 "int32 accumulator wraps (tiny input and weight scales can saturate a bias "
                 "too; those stay in)",
}


def _exclude(lay: Layer, exclude: frozenset) -> Layer:
    args = []
    for k, v in lay.args:
        if isinstance(v, Layer):
            v = _exclude(v, exclude)
        elif k == "dead_mode" and v == "tiny" and "dead-tiny" in exclude:
            v = "zero"
        args.append((k, v))
    return Layer(lay.op, tuple(args))


@st.composite
def model_specs(draw, max_layers: int = 5, exclude: frozenset = frozenset()) -> ModelSpec:
    """Random small models (see the module docstring); ``exclude``: keys of ``EXCLUDABLE``."""
    kind = draw(st.sampled_from(["image", "image", "seq", "flat"]))
    if kind == "image":
        shape = (draw(st.integers(1, 8)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    elif kind == "seq":
        shape = (draw(st.integers(1, 9)), draw(st.integers(1, 16)))
    else:
        shape = (draw(st.integers(1, 32)),)
    layers, cur = [], shape
    # at least one weighted layer first: a graph of views alone has nothing to quantize
    n = draw(st.integers(1, max_layers))
    for i in range(n):
        if len(cur) == 3:
            lay = _image_layer(draw, cur) if i else _conv(draw, *cur)
        elif len(cur) == 2:
            lay = _seq_layer(draw, cur) if i else _linear(draw)
        else:
            lay = _flat_layer(draw, cur) if i else _linear(draw)
        layers.append(_exclude(lay, exclude) if exclude else lay)
        cur = out_shape(lay, cur)
    example_batch = draw(st.integers(1, 3))
    test_batch = draw(st.sampled_from([b for b in (1, 2, 3, 5) if b != example_batch]))
    return ModelSpec(
        shape=shape, layers=tuple(layers), seed=draw(st.integers(0, 2**16)),
        example_batch=example_batch, test_batch=test_batch,
        input_scale=10.0 ** draw(st.sampled_from([0, 0, 0, 0, -4, -2, 2, 4])),
        input_offset=draw(st.sampled_from([0.0, 0.0, 0.0, 2.0])),
        constant=draw(st.sampled_from(["none"] * 6 + ["test", "all"])))


# ---------------------------------------------------------------------------------------------
# One graph, checked.


def _refusals() -> tuple:
    import ptqpasses
    from ptqpasses.passes.convert_to_qdq import NotCalibratedError
    return (ptqpasses.CaptureError, ptqpasses.ConfigError, ptqpasses.CalibrationError,
            NotCalibratedError)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Refused(Exception):
    """quantize refused the model with a documented error."""


class FuzzFailure(AssertionError):
    """A graph that quantize accepted failed: ``stage`` is where, ``key`` groups alike ones."""

    def __init__(self, stage: str, target: Optional[str], detail: str):
        self.stage, self.target, self.detail = stage, target, detail
        super().__init__(f"[{stage}{'' if target is None else ' on ' + target}] {detail}")

    @property
    def key(self) -> str:
        """The stage and the first line with names and numbers blanked (targets left out:
        one bug usually shows on several)."""
        if self.stage == "mismatch":  # the tags say which kind of graph it was
            return "mismatch " + "".join(re.findall(r"\[[^\]]*\]", self.detail.split(":")[0]))
        text = re.sub(r"'[^']*'", "'_'", self.detail.splitlines()[0])
        text = re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
        return f"{self.stage}: {text[:160]}"


def _outputs(y) -> list:
    if isinstance(y, torch.Tensor):
        return [y]
    return list(y)


def _output_scales(q) -> list:
    """The scale of the dequantize feeding each graph output (None if not a dequantize)."""
    out = next(n for n in q.graph.nodes if n.op == "output")
    scales = []
    for a in _outputs(out.args[0]):
        ok = getattr(a, "target", None) is torch.ops.ptq.dequantize.default
        scales.append(float(a.args[1]) if ok and isinstance(a.args[1], float) else None)
    return scales


def float_magnitude(q, x) -> float:
    """The largest finite |value| of any float tensor the reference computes (inputs and
    outputs of every node): the scale of a float output's rounding error, which an output
    that cancels (the mean of a layer_norm: ~1e-8 where its inputs are ~1) does not show."""
    biggest = [0.0]

    class _Watch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    finite = t[torch.isfinite(t)]
                    if finite.numel():
                        biggest[0] = max(biggest[0], finite.abs().max().item())
            return out

    with torch.no_grad():
        _Watch(q).run(x)
    return biggest[0]


def compare(got, want, scales: Sequence, island: bool,
            magnitude: Optional[float] = None, rtol: float = ISLAND_FLOAT_RTOL) -> Optional[str]:
    """None if equal; else a description. With ``island``, 'island:' prefixes a mismatch
    within ``ISLAND_LSB`` output steps (a float output: ``rtol`` of ``magnitude``, default
    its own largest |value|)."""
    got, want = _outputs(got), _outputs(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, reference has {len(want)}"
    problems, small = [], True
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"output {i}: {g.dtype}{list(g.shape)}, reference {w.dtype}{list(w.shape)}"
        same = (g == w) | (torch.isnan(g) & torch.isnan(w)) if g.is_floating_point() else g == w
        if bool(same.all()):
            continue
        bad = (~same).nonzero()
        idx = tuple(bad[0].tolist())
        diff = (g.double() - w.double()).abs()[~same]
        scale = scales[i] if i < len(scales) else None
        worst = diff.max().item()
        if scale is not None:  # a dequantized output: steps of its scale
            lsb = f", {worst / scale:.3g} LSB"
            small &= worst <= ISLAND_LSB * scale * (1 + 1e-6)
        else:  # a float output (a float island ends the graph): relative to its magnitude
            mag = max(w.double().abs().max().item(), magnitude or 0.0)
            lsb = f", {worst / max(mag, 1e-30):.3g} of max |float value|"
            small &= worst <= rtol * mag
        problems.append(f"output {i}: {len(bad)} of {g.numel()} differ (max {diff.max().item():.6g}"
                        f"{lsb}); first at {list(idx)}: got {g[idx].item()!r}, "
                        f"reference {w[idx].item()!r}")
    if not problems:
        return None
    return ("island: " if island and small else "") + "; ".join(problems)


def saturated_bias(q) -> bool:
    """Whether lowering stored an int32 bias at the end of its range (a dead channel's)."""
    lim = (-2**31, 2**31 - 1)
    return any(b.dtype == torch.int32 and "bias" in n and bool(((b == lim[0]) | (b == lim[1])).any())
               for n, b in q.named_buffers())


def has_float_island(q) -> bool:
    """Float nodes other than per-token linears' bias adds (exact float adds)."""
    from ptqpasses.meta import PER_TOKEN_BIAS
    from ptqpasses.report import float_nodes
    return any(not c.reason.startswith(PER_TOKEN_BIAS) for c in float_nodes(q))




def quantize_spec(spec: ModelSpec):
    """(integer graph, compared input); raises Refused or FuzzFailure."""
    import ptqpasses
    try:
        model = spec.build()
        example, calib, x = spec.data()
        with torch.no_grad():
            model(example)
    except Exception as e:  # the generator drew something torch rejects: our bug
        raise FuzzFailure("model", None, f"float model: {first_line(e)}") from e
    try:
        q = ptqpasses.quantize(model, (example,), calib, progress=False)
    except _refusals() as e:
        raise Refused(first_line(e)) from e
    except ptqpasses.PassError as e:
        if isinstance(e.__cause__, _refusals()):
            raise Refused(first_line(e.__cause__)) from e
        raise FuzzFailure("quantize", None, first_line(e)) from e
    except Exception as e:
        raise FuzzFailure("quantize", None, first_line(e)) from e
    return q, x


def check_on_target(q, x: torch.Tensor, want, target: str) -> Optional[str]:
    """Compile ``q`` for ``target`` and compare on ``x``. Returns None, or an 'island:'
    mismatch description; raises FuzzFailure."""
    from ptqpasses_backends import tvm as ptq_tvm
    try:
        cm = ptq_tvm.compile(q, target=target)
    except Exception as e:
        raise FuzzFailure("compile", target, first_line(e)) from e
    try:
        got = cm(x)
    except Exception as e:
        raise FuzzFailure("run", target, first_line(e)) from e
    island = has_float_island(q)
    rtol = float_rtol(q)
    problem = compare(got, want, _output_scales(q), island,
                      float_magnitude(q, x) if island else None, rtol)
    if problem is None or problem.startswith("island: "):
        return problem
    tags = ("[float island]" if island else "") + (
        "[per-token]" if rtol != ISLAND_FLOAT_RTOL else "") + (
        "[saturated int32 bias]" if saturated_bias(q) else "")
    raise FuzzFailure("mismatch", target, f"{tags or '[integer]'}: {problem}")


def reference(q, x):
    try:
        with torch.no_grad():
            return q(x)
    except Exception as e:
        raise FuzzFailure("reference", None, first_line(e)) from e


# ---------------------------------------------------------------------------------------------
# The run.


def runnable_targets() -> list[str]:
    from ptqpasses_backends.tvm import targets
    out = []
    for name in targets.TARGETS:
        try:
            if targets.runs_here(targets.resolve(name)):
                out.append(name)
        except ValueError:
            continue
    return out


@dataclasses.dataclass
class Stats:
    graphs: int = 0
    distinct: int = 0
    checked: dict = dataclasses.field(default_factory=dict)
    refused: dict = dataclasses.field(default_factory=dict)
    island_mismatch: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    shrink_calls: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"graphs drawn: {self.graphs} ({self.distinct} distinct) in {self.seconds:.0f} s "
                 f"({60 * self.graphs / max(self.seconds, 1e-9):.1f} graphs/min)",
                 "checked per target: " + (", ".join(f"{t} {n}" for t, n in self.checked.items())
                                           or "none")]
        refused = sum(self.refused.values())
        lines.append(f"refused: {refused}")
        for reason, n in sorted(self.refused.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} x {reason}")
        if self.island_mismatch:
            lines.append(f"float-island mismatches within {ISLAND_LSB} LSB (not failures): "
                         f"{len(self.island_mismatch)}")
        lines.append(f"failures: {len(self.failures)}")
        for f in self.failures:
            lines.append(f"  {f['key']} (x{f['count']}{', shrunk' if f['shrunk'] else ''})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Fuzzer:
    """Runs hypothesis over ``model_specs`` until ``graphs`` or ``budget`` seconds.

    A new failure is shrunk (for at most ``shrink_budget`` seconds) and recorded with the
    smallest failing spec; the run then goes on with the next seed, and later graphs failing
    the same way (same ``FuzzFailure.key``) are counted without shrinking again.
    """

    def __init__(self, graphs: int, budget: float, seed: int = 0, all_targets: bool = False,
                 targets: Optional[Sequence[str]] = None, shrink_budget: float = 300.0,
                 progress: bool = True, log: Callable[[str], None] = print,
                 exclude: Sequence[str] = (), out: Optional[str] = None):
        self.graphs, self.budget, self.seed = graphs, budget, seed
        unknown = set(exclude) - set(EXCLUDABLE)
        if unknown:
            raise ValueError(f"unknown --exclude {sorted(unknown)}; known: {sorted(EXCLUDABLE)}")
        self.exclude = frozenset(exclude)
        self.out, self._written, self._start = out, 0.0, time.monotonic()
        self.all_targets, self.shrink_budget = all_targets, shrink_budget
        self.targets = list(targets) if targets is not None else runnable_targets()
        if not self.targets:
            raise RuntimeError("no TVM target runs on this machine")
        self.progress, self.log = progress, log
        self.stats = Stats(checked={t: 0 for t in self.targets})
        self._failures: dict[str, dict] = {}
        self._seen: set = set()  # hypothesis may draw one spec twice from other choices

    # one example
    def _check(self, spec: ModelSpec, targets: Sequence[str], count: bool) -> None:
        try:
            q, x = quantize_spec(spec)
        except Refused as r:
            if count:
                self.stats.refused[str(r)] = self.stats.refused.get(str(r), 0) + 1
            return
        want = reference(q, x)
        for t in targets:
            island = check_on_target(q, x, want, t)
            if count:
                self.stats.checked[t] += 1
                if island:
                    self.stats.island_mismatch.append(
                        {"target": t, "detail": island, "spec": spec.describe()})

    def write(self, force: bool = False) -> None:
        """The counts so far as JSON to ``out`` (at most every 30 s unless ``force``)."""
        if self.out is None or (not force and time.monotonic() - self._written < 30):
            return
        self._written = time.monotonic()
        self.stats.seconds = self._written - self._start
        with open(self.out + ".tmp", "w") as fh:
            json.dump({"seed": self.seed, "targets": self.targets, "exclude": sorted(self.exclude),
                       **self.stats.to_json()}, fh, indent=1)
        os.replace(self.out + ".tmp", self.out)

    def _record(self, f: FuzzFailure, spec: ModelSpec, shrunk: bool) -> dict:
        entry = self._failures.get(f.key)
        if entry is None:
            entry = {"key": f.key, "stage": f.stage, "target": f.target, "error": str(f),
                     "spec": spec.describe(), "spec_json": spec.to_json(), "count": 0,
                     "targets": {}, "shrunk": shrunk}
            self._failures[f.key] = entry
            self.stats.failures.append(entry)
        return entry

    def run(self) -> Stats:
        start = self._start = time.monotonic()
        deadline = start + self.budget
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.graphs, unit="graph", file=sys.stderr, dynamic_ncols=True)
        run_index = 0
        while self.stats.graphs < self.graphs and time.monotonic() < deadline:
            self._one_hypothesis_run(self.seed + run_index, deadline, bar)
            run_index += 1
        if bar is not None:
            bar.close()
        self.stats.seconds = time.monotonic() - start
        self.write(force=True)
        return self.stats

    def _one_hypothesis_run(self, seed: int, deadline: float, bar) -> None:
        state = {"shrinking": None, "shrink_deadline": None, "best": None}
        remaining = self.graphs - self.stats.graphs

        @hypothesis_seed(seed)
        @settings(max_examples=remaining, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                  print_blob=False)
        @given(spec=model_specs(exclude=self.exclude))
        def prop(spec: ModelSpec) -> None:
            shrinking = state["shrinking"]
            if shrinking is None:
                if time.monotonic() > deadline or self.stats.graphs >= self.graphs:
                    return
                i = self.stats.graphs
                self.stats.graphs += 1
                if spec not in self._seen:
                    self._seen.add(spec)
                    self.stats.distinct += 1
                targets = self.targets if self.all_targets else [
                    self.targets[i % len(self.targets)]]
                try:
                    self._check(spec, targets, count=True)
                except FuzzFailure as f:
                    entry = self._record(f, spec, shrunk=False)
                    entry["count"] += 1
                    if f.target is not None:
                        entry["targets"][f.target] = entry["targets"].get(f.target, 0) + 1
                    if entry["shrunk"]:
                        return  # known: counted, not shrunk again
                    entry["shrunk"] = True
                    state.update(shrinking=f, best=spec, targets=targets if self.all_targets
                                 else [f.target or targets[0]],
                                 shrink_deadline=time.monotonic() + self.shrink_budget)
                    raise
                finally:
                    self.write()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(failures=len(self.stats.failures),
                                        refused=sum(self.stats.refused.values()))
                return
            # shrinking: only the failing target(s), for at most shrink_budget seconds
            self.stats.shrink_calls += 1
            if time.monotonic() > state["shrink_deadline"] and spec != state["best"]:
                return
            try:
                self._check(spec, state["targets"], count=False)
            except FuzzFailure as f:
                if f.key != shrinking.key:
                    self._record(f, spec, shrunk=False)
                    return  # another bug: recorded, shrunk when met again in generation
                state["best"] = spec
                entry = self._failures[shrinking.key]
                entry.update(spec=spec.describe(), spec_json=spec.to_json(), error=str(f))
                raise

        try:
            prop()
        except FuzzFailure as f:
            entry = self._failures[f.key] if f.key in self._failures else None
            if entry is not None:
                self.log(f"\nFAILURE {entry['error']}\nminimal model:\n{entry['spec']}\n")
        except Exception as e:  # hypothesis itself (Flaky, ...): record, do not hide it
            f = FuzzFailure("fuzzer", None, first_line(e))
            entry = self._record(f, state["best"] or ModelSpec((1,), ()), shrunk=False)
            entry["count"] += 1
            self.log(f"\nFUZZER ERROR {first_line(e)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graphs", type=int, default=100, help="stop after this many graphs")
    p.add_argument("--budget", type=float, default=600, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (runs are reproducible)")
    p.add_argument("--all-targets", action="store_true",
                   help="compile every graph for every runnable target (default: one each, "
                        "cycling)")
    p.add_argument("--targets", nargs="+", help="named targets (default: all that run here)")
    p.add_argument("--shrink-budget", type=float, default=300,
                   help="seconds spent shrinking each new failure")
    p.add_argument("--exclude", nargs="+", default=[], choices=sorted(EXCLUDABLE),
                   help="leave out a construct that hits a known bug: " + "; ".join(
                       f"{k}: {v}" for k, v in EXCLUDABLE.items()))
    p.add_argument("--out", help="write the counts and failures as JSON")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    fuzzer = Fuzzer(args.graphs, args.budget, seed=args.seed, all_targets=args.all_targets,
                    targets=args.targets, shrink_budget=args.shrink_budget,
                    progress=not args.no_progress, exclude=args.exclude, out=args.out)
    print(f"targets: {', '.join(fuzzer.targets)}; seed {args.seed}", flush=True)
    stats = fuzzer.run()
    print(stats.summary())
    for f in stats.failures:
        print(f"\n--- {f['error']}\n{f['spec']}")
    return 1 if stats.failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
