"""Capture a PyTorch model as an ATen-level torch.fx graph through ``torch.export``."""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says where and what to do."""


#: ``GraphModule.meta`` key: SHA-256 of the weights the graph was captured with (see
#: ``weights_digest``). Passes that rewrite weights (SmoothQuant, bias correction) keep it, so
#: a recipe names the model weights it was derived from.
WEIGHTS_KEY = "ptq.weights_sha256"


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
    dynamic_dims: Optional[Mapping[int, Mapping[int, str]]] = None,
) -> fx.GraphModule:
    """Returns an ATen-level GraphModule of ``model`` (what torch.compile backends see).

    Args:
        model: an ``nn.Module`` (put in eval mode), an ``ExportedProgram``, or a
            GraphModule (a copy of an ATen one, e.g. from ``ExportedProgram.module()``, is
            used as is, so passes never mutate the caller's graph; any other is exported
            again).
        example_inputs: positional example inputs (a tuple).
        dynamic_batch: make dimension 0 of every tensor input one shared symbolic size.
        dynamic_dims: more symbolic dimensions, ``{input_index: {dim: name}}``; equal names
            are one symbol (e.g. ``{0: {1: "seq"}, 1: {1: "seq"}}`` for ids and mask).
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
    try:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch raises many unrelated types here
        raise CaptureError(_explain(model, e)) from e
    return _with_digest(_cleanup(ep.module()))


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _avoid_size_one_batch(inputs: tuple) -> tuple:
    # torch.export specialises a size-1 dimension to the constant 1; trace with batch 2.
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)


def _dynamic_shapes(inputs: tuple, batch: bool, extra: Mapping[int, Mapping[int, str]]):
    dims: dict[str, Dim] = {}

    def dim(name: str) -> Dim:
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
    fixes = text.split("Suggested fixes:", 1)[1].strip().splitlines() if \
        "Suggested fixes:" in text else []
    fixes = [ln.strip() for ln in fixes if ln.strip()][:4]
    if fixes:
        hint += ("\ntorch.export suggests: " + "; ".join(fixes) + " (a dynamic dimension the "
                 "model bounds, e.g. by its position embeddings; dynamic_dims takes no bounds "
                 "yet: leave that dimension out of dynamic_dims to capture it static)")
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
    pads = [0, 0]
    extra = [0, 0]
    if mode == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, wval.shape[2:])]
        pads = [t // 2 for t in totals]
        extra = [t - 2 * (t // 2) for t in totals]
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


def _cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Drops export's guard-check call, which later passes would see as an unknown module,
    and the identities of inference (``detach_``, ``clone``, ``contiguous``, eval dropout,
    ``to`` the same device and dtype)."""
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
    gm.graph.lint()
    gm.recompile()
    return gm
