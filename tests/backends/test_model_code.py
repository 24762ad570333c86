"""Classes of real model code (issue 14), each quantized, compiled and checked against the
torch integer graph on another batch size: attention with boolean / additive / causal masks
(what ``transformers`` encoders and decoders build), and integer tensors (position ids
computed from input ids) that must pass through untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqpasses
from ptqpasses_backends import tvm as ptq_tvm


class _Attention(nn.Module):
    """One attention block; the mask is an input (``bool``: True attends) or causal."""

    def __init__(self, mode: str, d: int = 32, heads: int = 4):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.mode == "bool":
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, T]: padding mask, as BERT's
        elif self.mode == "float":
            attn_mask = (1.0 - mask[:, None, None, :].float()) * -1e4
        else:
            attn_mask = None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=self.mode == "causal")
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def _mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return torch.arange(t)[None, :] < lengths[:, None]


@pytest.mark.parametrize("mode", ["bool", "float", "causal"])
def test_attention_masks_compile_and_match(mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = _Attention(mode).eval()
    calib = [(torch.randn(4, 6, 32, generator=g), _mask(4, 6, g)) for _ in range(2)]
    if mode == "causal":
        calib = [(x,) for x, _ in calib]
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    cm = ptq_tvm.compile(q, target="host")
    x = torch.randn(3, 6, 32, generator=g)
    args = (x,) if mode == "causal" else (x, _mask(3, 6, g))
    want, got = q(*args), cm(*args)
    # float islands (softmax, the masked scores): within float32 rounding of ATen's kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = model(*args)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()) > 25


class _PositionIds(nn.Module):
    """RoBERTa's position ids: ``cumsum`` of the non-padding mask, integer arithmetic on the
    input ids, then embeddings and a linear (float)."""

    def __init__(self, vocab: int = 50, d: int = 16, pad: int = 1):
        super().__init__()
        self.pad = pad
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(vocab + 2, d)
        self.fc = nn.Linear(d, d)

    def forward(self, ids):
        mask = ids.ne(self.pad).int()
        positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.pad
        return self.fc(torch.relu(self.tok(ids) + self.pos(positions)))


def test_integer_tensors_pass_through_untouched():
    torch.manual_seed(0)
    model = _PositionIds().eval()
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 50, (4, 7), generator=g),) for _ in range(2)]
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    # the integer arithmetic stays as is (it is never observed: that raised CalibrationError
    # "observed a torch.int32 tensor"); the embeddings are float ops
    assert not any("ptq" in str(n.target) and "int" in str(n.args[0].meta.get("val", ""))
                   for n in q.graph.nodes if n.op == "call_function" and n.args
                   and isinstance(n.args[0], torch.fx.Node) and "quantize" in str(n.target))
    assert any("linear" in c.op for c in ptqpasses.coverage(q) if c.integer)
    cm = ptq_tvm.compile(q, target="host")
    ids = torch.randint(0, 50, (3, 7), generator=g)
    torch.testing.assert_close(cm(ids), q(ids), rtol=0, atol=0)


def test_products_with_constant_matrices_compile_as_linears():
    """GPT-2's ``Conv1D`` (``addmm`` on an ``[in, out]`` weight) and Falcon's ``x @ W.T``
    become int8 linears (capture) and compile bit-exact on another batch size."""
    from tests.ptqpasses.test_capture import ConstantProducts

    torch.manual_seed(0)
    model = ConstantProducts().eval()
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(2, 8, 8, generator=g),) for _ in range(4)]
    q = ptqpasses.quantize(model, calib[0], calib, progress=False, guard=False)
    assert sum(c.integer for c in ptqpasses.coverage(q) if "linear" in c.op) == 3
    cm = ptq_tvm.compile(q, target="host")
    x = torch.randn(3, 8, 8, generator=g)
    (mm, out), (mm_want, out_want) = cm(x), q(x)
    torch.testing.assert_close(out, out_want, rtol=0, atol=0)  # the int8 linears' result
    # ``scale @ x`` stays a float32 mm: its sum order (and FMA use) is the library's, so
    # within float32 rounding of torch's (Zen 4: 3.6e-7 apart, Emerald Rapids: equal)
    torch.testing.assert_close(mm, mm_want, rtol=1e-5, atol=1e-5)


def test_conv1d_compiles_as_an_int8_conv2d():
    from tests.ptqpasses.test_capture import Conv1dStack

    torch.manual_seed(0)
    model = Conv1dStack().eval()
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(2, 8, 20, generator=g),) for _ in range(4)]
    q = ptqpasses.quantize(model, calib[0], calib, progress=False, guard=False)
    cov = [c for c in ptqpasses.coverage(q) if "conv" in c.op or "linear" in c.op]
    assert len(cov) == 4 and all(c.integer for c in cov)
    cm = ptq_tvm.compile(q, target="host")
    x = torch.randn(3, 8, 20, generator=g)
    torch.testing.assert_close(cm(x), q(x), rtol=0, atol=0)
    # a dynamic length: the pointwise conv (a linear) and the depthwise one stay int8; the
    # dense kxk ones stay conv1d in float (the int8 conv2d kernels need static sizes)
    q = ptqpasses.quantize(model, calib[0], calib, progress=False, guard=False,
                           dynamic_dims={0: {2: torch.export.Dim("length", min=8, max=64)}})
    cov = {c.where.split(" ")[0]: c for c in ptqpasses.coverage(q)
           if "conv" in c.op or "linear" in c.op}
    assert cov["dw"].integer and cov["pw"].integer, cov
    assert not cov["same"].integer and not cov["strided"].integer
    cm = ptq_tvm.compile(q, target="host")
    x = torch.randn(3, 8, 27, generator=g)
    want = q(x)  # float after the float conv1d: float32 rounding, as the zoo's float outputs
    torch.testing.assert_close(cm(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))


class _Identities(nn.Module):
    """No-ops of real model code: ``detach``, eval dropout, ``to``
    the same device, and a ``padding="same"`` conv with an even and an odd total."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding="same")
        self.b = nn.Conv2d(8, 8, (2, 4), padding="same")  # totals 1 and 3: padded first
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.drop(torch.relu(self.a(x.detach())))
        return self.b(y.to(x.device)).mean((2, 3))


def test_identities_are_erased_and_same_padding_is_explicit():
    torch.manual_seed(0)
    model = _Identities().eval()
    calib = [(torch.randn(4, 3, 9, 9),) for _ in range(2)]
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    ops = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if any(s in o for s in ("detach", "dropout", "to."))}
    assert sum("conv2d" in c.op for c in ptqpasses.coverage(q) if c.integer) == 2
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
    got = ptq_tvm.compile(q, target="host")(x)
    # (the conv feeding the spatial mean has a float output, the mean stays float: TVM's
    # float sum may differ from ATen's in the last ulps)
    want = q(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()) > 25


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
                                      for _ in range(2)])

    def forward(self, x):
        return torch.special.i0(self.layers(x))  # (an op TVM has no converter for)


def test_reports_and_errors_name_the_module_and_line():
    torch.manual_seed(0)
    calib = [(torch.randn(4, 8),)]
    q = ptqpasses.quantize(_Blocks().eval(), calib[0], calib, progress=False)
    where = {c.node: c.where for c in ptqpasses.coverage(q)}
    line = f"{__file__.rsplit('/', 1)[-1]}:"
    assert where["linear_default_1"].startswith("layers.1.0 (") and line in where["linear_default_1"]
    assert where["layer_norm"].startswith("layers.0.1 (")
    with pytest.raises(ptq_tvm.EmitError, match=r"node 'special_i0' .* at .*test_model_code.py:"):
        ptq_tvm.compile(q, target="host")


class _BoundedPositions(nn.Module):
    """BERT's embeddings: ``position_ids[:, :seq]`` of a table bounds the dynamic sequence
    (capture applies torch.export's bound), added to the token embeddings; Bloom's boolean
    mask built with ``new_ones(dtype=bool) & ...`` and ``where(mask, x, 0.0)``."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(32, 16)
        self.register_buffer("position_ids", torch.arange(32)[None])
        self.fc = nn.Linear(16, 8)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        keep = ids.new_ones(ids.shape, dtype=torch.bool) & (ids > 2)
        return torch.where(keep[..., None], self.fc(h), 0.0)


def test_bounded_sequence_slices_and_boolean_masks_compile():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randint(0, 50, (2, 8), generator=g),) for _ in range(2)]
    q = ptqpasses.quantize(_BoundedPositions().eval(), calib[0], calib, progress=False,
                           dynamic_dims={0: {1: "seq"}})
    cm = ptq_tvm.compile(q, target="host")  # was: add of (b, seq) and (1, min(seq, 32))
    ids = torch.randint(0, 50, (3, 12), generator=g)
    torch.testing.assert_close(cm(ids), q(ids), rtol=0, atol=0)


class _RepeatByBatch(nn.Module):
    """DeBERTa's relative positions: ``repeat`` by the (symbolic) batch size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        rel = torch.arange(x.shape[1])[None, :, None].float().repeat(x.shape[0], 1, 1)
        return self.fc(x) + rel


def test_repeat_by_a_symbolic_count_compiles():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    q = ptqpasses.quantize(_RepeatByBatch().eval(), (x,), [(x,)], progress=False)
    cm = ptq_tvm.compile(q, target="host")  # was: relax.op.tile takes only int counts
    x3 = torch.randn(3, 5, 8)
    torch.testing.assert_close(cm(x3), q(x3), rtol=0, atol=0)


class _RelativeSpan(nn.Module):
    """DeBERTa's relative attention: the span ``torch.tensor(min(seq, 16))`` (a ``sym_min``
    of sizes, a 0-d tensor, ``item`` s of its arithmetic), a slice of the relative table by
    those values, an in-place ``/=`` on the projected table, and a gather of the scores by
    clamped relative positions. ``bounded``: a position table bounds ``seq <= 16`` at capture,
    which proves ``min(seq, 16) == seq``; else the span is TIR's ``min(seq, 16)``."""

    def __init__(self, bounded: bool, span: int = 16, d: int = 8):
        super().__init__()
        self.bounded, self.span = bounded, span
        self.pos = nn.Embedding(span, d)
        self.register_buffer("position_ids", torch.arange(span))
        self.rel = nn.Parameter(torch.randn(2 * span, d))
        self.fc, self.proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.fc(x) + self.pos(self.position_ids[:t]) if self.bounded else self.fc(x)
        span = torch.tensor(min(t, self.span))
        k = self.proj(self.rel[self.span - span: self.span + span])  # [2 * span, d]
        k /= torch.sqrt(torch.tensor(8.0))
        rel = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        idx = torch.clamp(rel + span, 0, span * 2 - 1)
        return torch.gather(h @ k.transpose(-1, -2), -1, idx.expand(b, t, t))


@pytest.mark.parametrize("bounded", [True, False])
def test_relative_span_of_symbolic_sizes_compiles(bounded):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(2, 8, 8, generator=g),) for _ in range(2)]
    q = ptqpasses.quantize(_RelativeSpan(bounded).eval(), calib[0], calib, progress=False,
                           dynamic_dims={0: {1: "seq"}})
    cm = ptq_tvm.compile(q, target="host")  # was: no TVM converter for sym_min
    for shape in ((3, 12), (1, 5)) if bounded else ((3, 20), (1, 5)):
        x = torch.randn(*shape, 8, generator=g)
        torch.testing.assert_close(cm(x), q(x), rtol=0, atol=0)


class _ConstantInputLinear(nn.Module):
    """DeBERTa-v2's relative embeddings: a LayerNorm of a parameter feeds int8 linears, whose
    inputs are then all constants (FoldConstant built such kernels for a featureless
    ``llvm`` target: an LLVM abort on AMX / AVX-512 VNNI hosts)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(32, d))
        self.norm = nn.LayerNorm(d)
        self.fc, self.proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) @ self.proj(self.norm(self.rel)).transpose(0, 1)


def test_int8_kernels_on_constant_inputs_compile():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(2, 6, 16, generator=g),) for _ in range(2)]
    q = ptqpasses.quantize(_ConstantInputLinear().eval(), calib[0], calib, progress=False)
    ops = [n.target for n in q.graph.nodes if n.op == "call_function"]
    # proj reads the [32, d] constant (static, int8 kernels on constant inputs); fc reads
    # tokens [batch, seq, d] (per token)
    assert ops.count(torch.ops.ptq.linear.default) + ops.count(
        torch.ops.ptq.linear_dynamic.default) == 2
    cm = ptq_tvm.compile(q, target="host")
    x = torch.randn(3, 6, 16, generator=g)
    torch.testing.assert_close(cm(x), q(x), rtol=0, atol=0)
