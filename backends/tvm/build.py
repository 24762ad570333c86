"""From an integer-operator graph to the Relax IRModule of a target (no compilation): input
specs, the signature ``compile`` needs to wrap a module, and ``emit``.

``compile.py`` (building) and ``tune.py`` (searching) both start here; neither imports the
other.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.utils._pytree as pytree
import tvm
from torch import fx
from tvm import tirx

from ptqpasses_backends.tvm import targets as _targets
from ptqpasses_backends.tvm.emit import EmitError, TensorSpec, emit_relax
from ptqpasses_backends.tvm.registry import strategy_for


def input_specs(gm: fx.GraphModule, example_inputs: Optional[Sequence[torch.Tensor]] = None,
                dynamic_batch: bool = True,
                static_batch: Optional[int] = None) -> list[TensorSpec]:
    """Input specs from example tensors, else from placeholder ``meta['val']``.

    Dim 0 becomes the symbol ``"batch"`` when ``dynamic_batch``; a symbolic size in
    ``meta['val']`` keeps its torch.export name (``"s1"``), or is ``"batch"`` at dim 0. Without
    ``dynamic_batch``, ``static_batch`` (if given) replaces a symbolic dim 0 (the graphs
    ``ptqpasses.quantize`` makes have one; tuning needs a concrete size).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = []
    for i, node in enumerate(placeholders):
        if example_inputs is not None:
            val = example_inputs[i]
        else:
            val = node.meta.get("val", node.meta.get("tensor_meta"))
        if val is None:
            raise EmitError(f"shape of input {node.name!r} unknown: pass example_inputs=")
        shape = [int(d) if isinstance(d, int) else str(d) for d in val.shape]
        if shape and dynamic_batch:
            shape[0] = "batch"
        elif shape and isinstance(shape[0], str) and static_batch is not None:
            shape[0] = int(static_batch)
        specs.append(TensorSpec(tuple(shape), str(val.dtype).replace("torch.", "")))
    return specs


_SHAPE_OPS = ("view", "reshape", "expand", "_unsafe_view")


def batch_baked_in(gm: fx.GraphModule) -> Optional[fx.Node]:
    """A view/reshape/expand whose target shape is all literal sizes (no -1, no symbolic
    size), i.e. the graph was traced for one batch size; None if there is none."""
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "").split(".")[0]
        if node.op != "call_function" or name not in _SHAPE_OPS or len(node.args) < 2:
            continue
        shape = node.args[1]
        if isinstance(shape, (list, tuple)) and shape and all(
                isinstance(d, int) and d != -1 for d in shape):
            return node
    return None


def output_treespec(gm: fx.GraphModule) -> str:
    """How the flat outputs nest, as a serialized pytree spec: torch.export's ``_out_spec``
    when the graph has one (it unflattens a single tensor), else the output node's own nesting."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        spec = pytree.tree_flatten(out)[1]
    return pytree.treespec_dumps(spec)


def _output_specs(mod: tvm.IRModule) -> list[TensorSpec]:
    specs = []
    for field in mod["main"].ret_ty.fields:
        shape = tuple(int(d) if isinstance(d, tirx.IntImm) else str(d) for d in field.shape)
        specs.append(TensorSpec(shape, str(field.dtype)))
    return specs


#: IRModule attribute (JSON text) with what ``compile`` needs to wrap a module ``emit`` made:
#: the target it was emitted for, input specs and the output nesting.
SIGNATURE_ATTR = "ptq.signature"


def build_ir(qgraph: fx.GraphModule, target: Any = "host", *,
             example_inputs: Optional[Sequence[torch.Tensor]] = None,
             dynamic_batch: bool = True, static_batch: Optional[int] = None,
             ) -> tuple[tvm.IRModule, _targets.NamedTarget, list]:
    """Emit the Relax IRModule for ``target`` (no compilation); returns (mod, target, specs).
    ``static_batch``: see ``input_specs``."""
    named = _targets.resolve(target)
    baked = batch_baked_in(qgraph) if dynamic_batch else None
    if baked is not None:
        warnings.warn(f"node {baked.name!r} reshapes to the literal shape {baked.args[1]}; "
                      "compiling for the example batch size only (dynamic_batch=False)",
                      stacklevel=3)
        dynamic_batch = False
    specs = input_specs(qgraph, example_inputs, dynamic_batch, static_batch)
    return emit_relax(qgraph, strategy_for(named), specs), named, specs


def emit(qgraph: fx.GraphModule, target: Any = "host", *,
         example_inputs: Optional[Sequence[torch.Tensor]] = None,
         dynamic_batch: bool = True) -> tvm.IRModule:
    """The Relax IRModule of ``qgraph`` for ``target``, before any compilation pass.

    Run your own ``tvm.transform`` passes on it, then ``compile(mod)``: the module carries its
    target, input specs and output nesting in the ``ptq.signature`` attribute (keep module
    attributes when you rebuild the module). ``main`` takes the graph's inputs (int8 kernels
    are ``call_tir`` PrimFuncs tagged ``ptq.kernel``; weights are constants).

    Args:
        qgraph, target, example_inputs, dynamic_batch: As for ``compile``.
    """
    mod, named, specs = build_ir(qgraph, target, example_inputs=example_inputs,
                                 dynamic_batch=dynamic_batch)
    signature = {"target": named.name, "target_spec": dict(named.spec), "family": named.family,
                 "strategy": strategy_for(named).name,
                 "inputs": [s.to_json() for s in specs],
                 "output_treespec": output_treespec(qgraph)}
    return mod.with_attr(SIGNATURE_ATTR, json.dumps(signature))
