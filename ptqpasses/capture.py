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
    return f"could not capture {type(model).__name__} with torch.export: {type(e).__name__}: {first}{where}{hint}"


def _cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Drops export's guard-check call, which later passes would see as an unknown module."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()
    return gm
