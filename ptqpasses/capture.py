"""Capture a PyTorch model as an ATen-level torch.fx graph through ``torch.export``."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram

from ptqpasses.graph_utils import add_constant, get_attr_value

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says where and what to do."""


#: ``GraphModule.meta`` key: SHA-256 of the weights the graph was captured with (see
#: ``weights_digest``). Passes that rewrite weights (SmoothQuant, bias correction) keep it, so
#: a recipe names the model weights it was derived from.
WEIGHTS_KEY = "ptq.weights_sha256"

#: ``GraphModule.meta`` key: the bounds capture gave dynamic dimensions that the model bounds
#: itself (torch.export's suggested fixes, applied): ``{name: (min, max)}``.
DIM_BOUNDS_KEY = "ptq.dynamic_dim_bounds"


def weights_digest(gm: fx.GraphModule) -> str:
    """SHA-256 of every parameter and buffer of ``gm``: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, t in sorted(gm.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _with_digest(gm: fx.GraphModule) -> fx.GraphModule:
    gm.meta.setdefault(WEIGHTS_KEY, weights_digest(gm))
    return gm


def capture(
    model: torch.nn.Module | ExportedProgram | fx.GraphModule,
    example_inputs: Sequence[Any] = (),
    *,
    dynamic_batch: bool = True,
    dynamic_dims: Optional[Mapping[int, Mapping[int, str | Dim]]] = None,
) -> fx.GraphModule:
    """Returns an ATen-level GraphModule of ``model`` (what torch.compile backends see).

    Args:
        model: an ``nn.Module`` (put in eval mode), an ``ExportedProgram``, or a
            GraphModule (a copy of an ATen one, e.g. from ``ExportedProgram.module()``, is
            used as is, so passes never mutate the caller's graph; any other is exported
            again).
        example_inputs: positional example inputs (a tuple).
        dynamic_batch: make dimension 0 of every tensor input one shared symbolic size.
        dynamic_dims: more symbolic dimensions, ``{input_index: {dim: name or Dim}}``; equal
            names are one symbol (e.g. ``{0: {1: "seq"}, 1: {1: "seq"}}`` for ids and mask).
            A ``torch.export.Dim("seq", min=2, max=512)`` gives the dimension bounds; a plain
            name is unbounded.

    Where the model itself bounds a dynamic dimension (absolute position embeddings bound
    the sequence by their table size), torch.export refuses the unbounded one and suggests
    a bound; capture applies suggested bounds and relations between named dimensions (never
    one that would make a dimension you asked to be dynamic a constant), logs a warning
    naming them, and records them in ``gm.meta[DIM_BOUNDS_KEY]`` (``{name: (min, max)}``).
    Pass a bounded ``Dim`` to choose the bound yourself.
    """
    if isinstance(model, ExportedProgram):
        return _with_digest(_cleanup(model.module()))
    if isinstance(model, fx.GraphModule) and _is_aten_graph(model):
        return _with_digest(_cleanup(copy.deepcopy(model)))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture expects an nn.Module, ExportedProgram or GraphModule, got "
                        f"{type(model).__name__}")
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise ValueError("capture needs example_inputs (a tuple of the model's positional inputs)")
    model.eval()
    example_inputs = _avoid_size_one_batch(example_inputs) if dynamic_batch else example_inputs
    shapes = _dynamic_shapes(example_inputs, dynamic_batch, dynamic_dims or {})
    bounds: dict[str, tuple] = {}
    first = None
    for _ in range(_REFINE_TRIES):
        try:
            ep = torch.export.export(model, example_inputs, dynamic_shapes=shapes, strict=False)
            break
        except Exception as e:  # torch raises many unrelated types here
            first = first or e
            refined = _suggested_bounds(e, shapes)
            if refined is None:
                raise CaptureError(_explain(model, e)) from e
            shapes, changed = refined
            bounds.update(changed)
    else:
        raise CaptureError(_explain(model, first)) from first
    if bounds:
        log.warning("capture: %s bounds its dynamic dimensions; applied torch.export's "
                    "suggested fix: %s (pass dynamic_dims with a bounded torch.export.Dim to "
                    "choose the bounds)", type(model).__name__,
                    ", ".join(_bound_text(name, lo, hi) for name, (lo, hi) in bounds.items()))
    gm = _cleanup(ep.module())
    if bounds:
        gm.meta[DIM_BOUNDS_KEY] = bounds
    return _with_digest(gm)


def _bound_text(name: str, lo: Optional[int], hi: Optional[int]) -> str:
    lo_text = f"{lo} <= " if lo and lo > 2 else ""  # export's own minimum is 2
    return f"{lo_text}{name} <= {hi}" if hi is not None else f"{name} >= {lo}"


def _dims(shapes) -> dict[str, Any]:
    """Every named Dim of a dynamic_shapes spec (derived ones included), by name."""
    out: dict[str, Any] = {}
    for spec in shapes or ():
        for d in (spec or {}).values():
            if d is not None and not isinstance(d, int):
                out.setdefault(d.__name__, d)
    return out


_FIX = re.compile(r"^\s*(\w+ = \S.*)$")
_NOT_EQUAL = re.compile(r"values of (\w+) = .* in the specified range (\w+) <= (\d+) satisfy "
                        r"the generated guard .* != (\d+)")
#: Exports capture tries at most: each may bound a dimension further.
_REFINE_TRIES = 3


def _suggested_fixes(text: str) -> list[str]:
    """The ``name = Dim(...)`` / ``name = expr`` lines after "Suggested fixes:" in ``text``;
    for a guard ``seq != 128`` at the bound ``seq <= 128`` (GPT-Neo, after the first bound),
    for which torch suggests nothing, ``seq = Dim('seq', max=127)``."""
    if "Suggested fixes:" not in text:
        m = _NOT_EQUAL.search(text)
        if m and m.group(1) == m.group(2) and m.group(3) == m.group(4):
            return [f"{m.group(1)} = Dim('{m.group(1)}', max={int(m.group(3)) - 1})"]
        return []
    fixes = []
    for line in text.split("Suggested fixes:", 1)[1].strip().splitlines():
        m = _FIX.match(line)
        if not m:
            break
        fixes.append(m.group(1).strip())
    return fixes


def _suggested_bounds(e: Exception, shapes) -> Optional[tuple[tuple, dict[str, tuple]]]:
    """(``shapes`` with torch.export's suggested fixes applied, ``{name: (min, max)}`` of the
    dims they changed), or None where ``e`` suggests none, or one that makes a dynamic
    dimension static (that would silently drop what the user asked for)."""
    fixes = _suggested_fixes(str(e))
    if not fixes:
        return None
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes(
            "Suggested fixes:\n" + "\n".join(fixes), shapes)
    except Exception:  # an unparsable suggestion: report the original error
        return None
    before, after = _dims(shapes), _dims(refined)
    if set(after) != set(before) or any(isinstance(d, int) for spec in refined or ()
                                        for d in (spec or {}).values()):
        return None
    changed = {}
    for name, d in after.items():
        lo, hi = getattr(d, "min", None), getattr(d, "max", None)
        old = before[name]
        if (lo, hi) != (getattr(old, "min", None), getattr(old, "max", None)) or \
                type(d) is not type(old):
            changed[name] = (lo, hi)
    return (tuple(refined), changed) if changed else None


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _avoid_size_one_batch(inputs: tuple) -> tuple:
    # torch.export specialises a size-1 dimension to the constant 1; trace with batch 2.
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)


def _dynamic_shapes(inputs: tuple, batch: bool, extra: Mapping[int, Mapping[int, str | Dim]]):
    dims: dict[str, Any] = {}
    for spec in extra.values():  # bounded Dims first: a plain name then means the same Dim
        for d in spec.values():
            if isinstance(d, str):
                continue
            if not hasattr(d, "__name__"):
                raise TypeError(f"dynamic_dims values are names or torch.export.Dim, got {d!r}")
            old = dims.setdefault(d.__name__, d)
            if (old.min, old.max) != (d.min, d.max):
                raise ValueError(f"dynamic_dims gives dimension {d.__name__!r} two different "
                                 f"bounds: {old.min}..{old.max} and {d.min}..{d.max}")

    def dim(name: str | Any) -> Any:
        name = name if isinstance(name, str) else name.__name__
        return dims.setdefault(name, Dim(name))

    for i in extra:
        if not 0 <= i < len(inputs) or not isinstance(inputs[i], torch.Tensor):
            raise ValueError(f"dynamic_dims names input {i}, but input {i} is not a tensor "
                             f"(the model has {len(inputs)} inputs)")
    spec = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            spec.append(None)
            continue
        d = {0: dim("batch")} if batch else {}
        d.update({k: dim(name) for k, name in extra.get(i, {}).items()})
        spec.append(d or None)
    return tuple(spec)


_LOCATION = re.compile(r'File "([^"]+)", line (\d+), in (\w+)(?:\n {4,}(\S.*))?')


def _explain(model: torch.nn.Module, e: Exception) -> str:
    text = str(e)
    first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    locations = _LOCATION.findall(text)
    user = [loc for loc in locations if "/torch/" not in loc[0]] or locations
    where = ""
    if user:
        file, line, func, code = user[-1]
        code = "" if code.startswith("The error above") else f": {code.strip()}"
        where = f"\n  at {file}:{line} in {func}{code}"
    hint = ("\nWhat you can do: rewrite data-dependent Python control flow with torch.cond or "
            "tensor ops (torch.where), move unsupported calls out of forward(), or capture the "
            "part of the model that is traceable and quantize that.")
    if "dynamic" in text.lower() or "constraint" in text.lower():
        hint += (" If a dimension was wrongly made dynamic, pass dynamic_batch=False or adjust "
                 "dynamic_dims.")
    fixes = _suggested_fixes(text)[:4]
    if fixes:
        hint += ("\ntorch.export suggests: " + "; ".join(fixes) + " (capture applies suggested "
                 "bounds itself, but not one that makes a dynamic dimension a constant: leave "
                 "that dimension out of dynamic_dims to capture it static, or give it a "
                 "bounded torch.export.Dim)")
    return f"could not capture {type(model).__name__} with torch.export: {type(e).__name__}: {first}{where}{hint}"


_aten = torch.ops.aten
#: Ops that return their input's values (in inference): erased at capture, so that passes
#: see the real producer (GPT-2's ``detach_`` left an observer that saw no data).
#: (Not ``contiguous`` / ``clone``: a later ``view`` may rely on the copy's layout, as Swin's
#: ``transpose -> contiguous -> view`` does.)
_IDENTITIES = {_aten.detach.default, _aten.detach_.default, _aten.alias.default,
               _aten.lift_fresh_copy.default}


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    t = node.target
    if t in _IDENTITIES:
        return True
    if t is _aten.dropout.default:  # dropout(x, p, train): identity unless training
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return train is False
    if t in (_aten.to.device, _aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default):
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
                and src.dtype == out.dtype and src.device == out.device)
    return False


def _same_padding(mode: str, dilation, kernel) -> tuple[list[int], list[int]]:
    """``(pads, extra)`` per spatial dim of ``padding=mode``: "valid" none; "same" half the
    total ``dilation * (kernel - 1)`` each side, and the odd one left over (PyTorch puts it
    last)."""
    totals = [d * (k - 1) if mode == "same" else 0 for d, k in zip(dilation, kernel)]
    return [t // 2 for t in totals], [t % 2 for t in totals]


def _explicit_padding(gm: fx.GraphModule, node: fx.Node) -> None:
    """``conv2d(padding="same" | "valid")`` -> ``conv2d`` with explicit padding; where "same"
    needs an odd total (PyTorch puts the extra row / column last), a ``constant_pad_nd``
    first. Passes and backends then see one conv op."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    stride = list(node.args[3]) if len(node.args) > 3 else [1, 1]
    mode = node.args[4] if len(node.args) > 4 else "valid"
    dilation = list(node.args[5]) if len(node.args) > 5 else [1, 1]
    groups = node.args[6] if len(node.args) > 6 else 1
    wval = w.meta.get("val") if isinstance(w, fx.Node) else None
    if wval is None:
        return
    pads, extra = _same_padding(mode, dilation, wval.shape[2:])
    with gm.graph.inserting_before(node):
        if any(extra):  # [left, right, top, bottom] for the last two dims
            x = gm.graph.call_function(_aten.constant_pad_nd.default, (
                x, [pads[1], pads[1] + extra[1], pads[0], pads[0] + extra[0]], 0.0))
            pads = [0, 0]
        conv = gm.graph.call_function(_aten.conv2d.default,
                                      (x, w, bias, stride, pads, dilation, groups))
    conv.meta.update(node.meta)
    node.replace_all_uses_with(conv)
    gm.graph.erase_node(node)


def _conv1d(gm: fx.GraphModule, node: fx.Node) -> None:
    """``conv1d`` on a constant weight (ConvBERT's separable span convolutions, audio front
    ends) in forms that quantize and compile as the 2-D ops: a pointwise one (kernel 1, stride
    1, no groups) -> ``permute -> linear -> permute`` (any length); a depthwise one, or any
    over a static length -> ``squeeze(conv2d(unsqueeze(x, 2), W[:, :, None, :]), 2)`` (height
    1). Others (a dense kxk conv over a dynamic length: the int8 conv2d kernels need static
    sizes) stay ``conv1d``, in float, reported."""
    x, w = node.args[0], node.args[1]
    weight = get_attr_value(gm, w) if isinstance(w, fx.Node) else None
    out = node.meta.get("val")
    xval = x.meta.get("val") if isinstance(x, fx.Node) else None
    if weight is None or weight.dim() != 3 or out is None or xval is None or xval.dim() != 3:
        return
    args = list(node.args[2:])
    bias = args[0] if args else None
    # (height 1: stride and dilation 1, no padding)
    stride, padding, dilation = ([d, *(args[i] if len(args) > i else [d])]
                                 for i, d in ((1, 1), (2, 0), (3, 1)))
    groups = args[4] if len(args) > 4 else 1
    padded = node.target is _aten.conv1d.padding
    if padded:  # "same" / "valid": conv2d.padding, then made explicit as conv2d's
        padding = args[2] if len(args) > 2 else "valid"
    k = weight.shape[-1]
    if k == 1 and stride[1] == 1 and groups == 1 and (padded or padding[1] == 0):
        _pointwise_as_linear(gm, node, x, weight[:, :, 0], bias, xval, out)
        return
    depthwise = groups > 1 and weight.shape[1] == 1
    if not (depthwise or isinstance(xval.shape[-1], int)):
        if padded:  # stays conv1d: with its padding explicit, as conv2d's
            _explicit_padding_1d(gm, node, padding, k)
        return
    with gm.graph.inserting_before(node):
        w2 = add_constant(gm, f"{w.target}_2d", weight.unsqueeze(2).contiguous(), node)
        w2.meta["val"] = get_attr_value(gm, w2)
        x2 = gm.graph.call_function(_aten.unsqueeze.default, (x, 2))
        conv = gm.graph.call_function(
            _aten.conv2d.padding if padded else _aten.conv2d.default,
            (x2, w2, bias, stride, padding, dilation, groups))
        y = gm.graph.call_function(_aten.squeeze.dim, (conv, 2))
    _take_place(node, y, ((x2, xval.unsqueeze(2)), (conv, out.unsqueeze(2)), (y, out)))
    if padded:
        _explicit_padding(gm, conv)


def _explicit_padding_1d(gm: fx.GraphModule, node: fx.Node, mode: str, kernel: int) -> None:
    """``conv1d(padding="same" | "valid")`` -> ``conv1d`` with explicit padding (an odd "same"
    total: a ``constant_pad_nd`` first, the extra column last, as PyTorch)."""
    args = list(node.args)
    dilation = args[5] if len(args) > 5 else [1]
    (pad,), (extra,) = _same_padding(mode, dilation, [kernel])
    x = args[0]
    with gm.graph.inserting_before(node):
        if extra:
            x = gm.graph.call_function(_aten.constant_pad_nd.default, (x, [pad, pad + 1], 0.0))
            pad = 0
        conv = gm.graph.call_function(_aten.conv1d.default, (
            x, args[1], args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else [1],
            [pad], dilation, args[6] if len(args) > 6 else 1))
    conv.meta.update(node.meta)
    node.replace_all_uses_with(conv)
    gm.graph.erase_node(node)


def _pointwise_as_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: torch.Tensor,
                         bias: Any, xval: torch.Tensor, out: torch.Tensor) -> None:
    with gm.graph.inserting_before(node):
        wl = add_constant(gm, f"{node.args[1].target}_linear", weight.contiguous(), node)
        wl.meta["val"] = get_attr_value(gm, wl)
        xt = gm.graph.call_function(_aten.permute.default, (x, [0, 2, 1]))
        lin = gm.graph.call_function(_aten.linear.default, (xt, wl, bias))
        y = gm.graph.call_function(_aten.permute.default, (lin, [0, 2, 1]))
    _take_place(node, y, ((xt, xval.permute(0, 2, 1)), (lin, out.permute(0, 2, 1)), (y, out)))


def _take_place(node: fx.Node, result: fx.Node, vals) -> None:
    """``result`` replaces ``node``; the new nodes get ``node``'s meta (module path, source
    line) with their own ``val``."""
    for new, val in vals:
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        new.meta["val"] = val
    node.replace_all_uses_with(result)
    node.graph.erase_node(node)


def _to_dtype(gm: fx.GraphModule, node: fx.Node) -> None:
    """``to(device, dtype)`` on the tensor's own device -> ``to.dtype``: transformers' masks
    (``attention_mask.to(device, torch.bool)``); backends convert ``to.dtype``."""
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
            and src.device == out.device):
        return
    with gm.graph.inserting_before(node):
        cast = gm.graph.call_function(_aten.to.dtype, (node.args[0], out.dtype))
    cast.meta.update(node.meta)
    node.replace_all_uses_with(cast)
    gm.graph.erase_node(node)


def _is_empty(x: Any, dim: int) -> bool:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    if val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0:
        return True  # torch.cat skips a legacy 1-D empty tensor of any dtype
    if val.dim() == 0:
        return False
    size = val.shape[dim % val.dim()]
    return isinstance(size, int) and size == 0


def _drop_empty_cat_inputs(gm: fx.GraphModule, node: fx.Node) -> None:
    """``cat([empty, x])`` -> ``cat([x])`` -> ``x``: GPT-2's empty key/value cache constants
    (``lifted_tensor``) would otherwise be observed and quantized without a single value."""
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = node.meta.get("val")
    keep = [x for x in tensors if not _is_empty(x, dim)]
    if len(keep) == len(tensors) or not keep:
        return
    if len(keep) == 1:
        kept = keep[0].meta.get("val")
        if isinstance(out, torch.Tensor) and isinstance(kept, torch.Tensor) \
                and kept.dtype == out.dtype:  # cat promotes dtypes; keep it where it does
            node.replace_all_uses_with(keep[0])
            gm.graph.erase_node(node)
            return
    node.args = (keep, *node.args[1:])


def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _numpy_t(gm: fx.GraphModule, node: fx.Node) -> None:
    """``x.T`` (``aten.numpy_T``, Falcon's ``x @ W.T``) -> ``permute`` with the dims reversed."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        _replace(gm, node, _aten.permute.default, (node.args[0], list(range(val.dim()))[::-1]))


def _constant(gm: fx.GraphModule, node: fx.Node, value: Any, like: torch.Tensor) -> fx.Node:
    """A 0-d constant of ``like``'s dtype, as a get_attr before ``node``."""
    i = 0
    while hasattr(gm, f"_ptq_scalar_{i}"):
        i += 1
    t = torch.tensor(value, dtype=like.dtype, device=like.device)
    gm.register_buffer(f"_ptq_scalar_{i}", t)
    with gm.graph.inserting_before(node):
        c = gm.graph.get_attr(f"_ptq_scalar_{i}")
    c.meta["val"] = t
    return c


def _where_scalar(gm: fx.GraphModule, node: fx.Node) -> None:
    """``where(cond, x, 0.0)`` / ``where(cond, 0.0, y)`` (Bloom's masks) -> ``where.self`` with
    a 0-d constant tensor: one form of ``where`` for passes and backends."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    cond, a, b = node.args[:3]
    a = a if isinstance(a, fx.Node) else _constant(gm, node, a, val)
    b = b if isinstance(b, fx.Node) else _constant(gm, node, b, val)
    _replace(gm, node, _aten.where.self, (cond, a, b))


def _constant_matrix(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    v = get_attr_value(gm, node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point() else None


def _linear_weight(gm: fx.GraphModule, w: fx.Node, before: fx.Node) -> Optional[fx.Node]:
    """The ``[out, in]`` weight that makes ``x @ w`` a ``linear``: the constant behind
    ``permute(W, [1, 0])`` / ``t(W)`` / ``transpose(W, 0, 1)`` as it is, or a transposed copy
    of a constant ``[in, out]`` ``w``; None where ``w`` is not a constant."""
    if w.op == "call_function" and _constant_matrix(gm, w.args[0]) is not None:
        t = w.target
        if t is _aten.t.default or (t is _aten.permute.default and [
                d % 2 for d in w.args[1]] == [1, 0]) or (t is _aten.transpose.int and (
                w.args[1] - w.args[2]) % 2):
            return w.args[0]
    value = _constant_matrix(gm, w)
    if value is None:
        return None
    c = add_constant(gm, f"{w.target}_t", value.t().contiguous(), before)
    c.meta["val"] = get_attr_value(gm, c)
    return c


def _as_linear(gm: fx.GraphModule, node: fx.Node) -> None:
    """``x @ W`` on a constant matrix (``mm`` / ``matmul``; Falcon's ``x @ W.T``) and
    ``addmm(b, x, W)`` (GPT-2's ``Conv1D``: ``W`` is ``[in, out]``) -> ``linear(x, W', b)``, so
    they quantize per output channel as any linear; ``W'`` is the constant behind a
    transpose, or a transposed copy."""
    if node.target is _aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return
        bias, x, w = node.args[:3]
        b = get_attr_value(gm, bias) if isinstance(bias, fx.Node) else None
        if b is None or b.dim() != 1:
            return
    else:
        (x, w), bias = node.args[:2], None
    if not isinstance(w, fx.Node):
        return
    weight = _linear_weight(gm, w, node)
    if weight is None:
        return
    _replace(gm, node, _aten.linear.default, (x, weight) + ((bias,) if bias is not None else ()))
    if not w.users and w.op == "call_function":  # the transpose only this product read
        gm.graph.erase_node(w)


#: Aliases of ops, by the name passes and backends know (``torch.multiply``: ConvBERT).
_ALIASES = {_aten.multiply.Tensor: _aten.mul.Tensor, _aten.multiply.Scalar: _aten.mul.Scalar,
            _aten.subtract.Tensor: _aten.sub.Tensor, _aten.divide.Tensor: _aten.div.Tensor}


def _alias(gm: fx.GraphModule, node: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(_ALIASES[node.target], node.args, node.kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


#: Ops written in a form passes and backends know (their meta is kept).
_REWRITES = {_aten.numpy_T.default: _numpy_t, _aten.where.ScalarOther: _where_scalar,
             _aten.addmm.default: _as_linear, _aten.mm.default: _as_linear,
             _aten.conv1d.default: _conv1d, _aten.conv1d.padding: _conv1d,
             _aten.matmul.default: _as_linear,
             _aten.where.ScalarSelf: _where_scalar, _aten.where.Scalar: _where_scalar,
             **{op: _alias for op in _ALIASES}}


def _drop_tensor(gm: fx.GraphModule, target: str) -> None:
    """Deletes the parameter or buffer ``target`` (a dotted path) that no node reads."""
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._parameters:
        del module._parameters[leaf]
    elif leaf in module._buffers:
        del module._buffers[leaf]


def _cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Drops export's guard-check call, which later passes would see as an unknown module,
    the identities of inference (``detach_``, eval dropout, ``to`` the same device and
    dtype) and empty inputs of ``cat``; writes ``conv2d(padding="same")``,
    ``to(device, dtype)``, ``x.T``, ``where`` with a scalar, op aliases (``multiply``),
    products with a constant matrix (``linear``) and ``conv1d`` (a ``conv2d`` of height 1)
    in the forms passes and backends know."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
        elif _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is _aten.conv2d.padding:
            _explicit_padding(gm, node)
        elif node.op == "call_function" and node.target is _aten.to.device:
            _to_dtype(gm, node)
        elif node.op == "call_function" and node.target is _aten.cat.default:
            _drop_empty_cat_inputs(gm, node)
        elif node.op == "call_function" and node.target in _REWRITES:
            _REWRITES[node.target](gm, node)
    for node in list(gm.graph.nodes):  # constants only rewritten nodes used (cat inputs,
        if node.op == "get_attr" and not node.users:  # weights now held transposed): dropped
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
                _drop_tensor(gm, node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
