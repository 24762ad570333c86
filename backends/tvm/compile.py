"""``emit(qgraph, target)`` -> Relax IRModule; ``compile(qgraph or IRModule, target)`` runs the
family pipeline (with user passes at named ``STAGES``) and wraps the result."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.utils._pytree as pytree
import tvm
from torch import fx
from tvm import tirx

from backends.tvm import targets as _targets
from backends.tvm.emit import VARIANTS_ATTR, EmitError, TensorSpec, emit_relax
from backends.tvm.family import get_family
from backends.tvm.pipeline import get_pipeline, normalize_relax_passes
from backends.tvm.runtime import CompiledModule


def input_specs(gm: fx.GraphModule, example_inputs: Optional[Sequence[torch.Tensor]] = None,
                dynamic_batch: bool = True) -> list[TensorSpec]:
    """Input specs from example tensors, else from placeholder ``meta['val']``.

    Dim 0 becomes the symbol ``"batch"`` when ``dynamic_batch``; a symbolic size in
    ``meta['val']`` keeps its torch.export name (``"s1"``), or is ``"batch"`` at dim 0.
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
             dynamic_batch: bool = True) -> tuple[tvm.IRModule, _targets.NamedTarget, list]:
    """Emit the Relax IRModule for ``target`` (no compilation); returns (mod, target, specs)."""
    named = _targets.resolve(target)
    baked = batch_baked_in(qgraph) if dynamic_batch else None
    if baked is not None:
        warnings.warn(f"node {baked.name!r} reshapes to the literal shape {baked.args[1]}; "
                      "compiling for the example batch size only (dynamic_batch=False)",
                      stacklevel=3)
        dynamic_batch = False
    specs = input_specs(qgraph, example_inputs, dynamic_batch)
    return emit_relax(qgraph, get_family(named.family, named.target()), specs), named, specs


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
                 "inputs": [s.to_json() for s in specs],
                 "output_treespec": output_treespec(qgraph)}
    return mod.with_attr(SIGNATURE_ATTR, json.dumps(signature))


def _signature(mod: tvm.IRModule, target: Any) -> tuple[dict, _targets.NamedTarget]:
    attrs = mod.attrs
    if attrs is None or SIGNATURE_ATTR not in attrs:
        raise ValueError(f"IRModule has no {SIGNATURE_ATTR!r} attribute: make it with "
                         "backends.tvm.emit(qgraph, target), and keep module attributes in "
                         "your passes (IRModule(functions) drops them; use mod.with_attr)")
    sig = json.loads(str(attrs[SIGNATURE_ATTR]))
    emitted = _targets.NamedTarget(sig["target"], sig["family"], sig["target_spec"])
    if target is None:
        return sig, _targets.resolve(emitted)
    named = _targets.resolve(target)
    if _layout(named) != _layout(emitted):
        raise ValueError(f"IRModule was emitted for {emitted.name!r} (family "
                         f"{emitted.family!r}, layout {_layout(emitted)}); it cannot be compiled "
                         f"for {named.name!r} (family {named.family!r}, layout "
                         f"{_layout(named)}): emit it again for that target")
    return sig, named


def _layout(named: _targets.NamedTarget) -> tuple:
    """What emission baked into the module for this target: family, activation encoding and
    weight block shape (x86 AVX2 and VNNI targets pack differently)."""
    fam = get_family(named.family, named.target())
    return (fam.name, fam.act_dtype, fam.lanes, fam.depth, fam.width_block)


def _variants(mod: tvm.IRModule) -> dict:
    """Packed kernel node -> [family variant, why], as emission chose (``emit.VARIANTS_ATTR``)."""
    attrs = mod.attrs
    if attrs is None or VARIANTS_ATTR not in attrs:
        return {}
    return json.loads(str(attrs[VARIANTS_ATTR]))


def compile(qgraph: fx.GraphModule | tvm.IRModule, target: Any = None, *,
            example_inputs: Optional[Sequence[torch.Tensor]] = None,
            dynamic_batch: Optional[bool] = None, schedule: bool = True,
            database: Any = None, relax_passes: Any = None) -> CompiledModule:
    """Compile an integer-operator graph (or the IRModule ``emit`` made of one) with TVM.

    Args:
        qgraph: The integer-operator ``fx.GraphModule``, or an IRModule from ``emit``
            (possibly transformed by your passes).
        target: A name from ``backends.tvm.TARGETS``, a TVM target dict, or a NamedTarget.
            Default ``"host"`` for a graph; for an IRModule, the target it was emitted for
            (another target must be of the same family).
        example_inputs: Tensors giving input shapes/dtypes when placeholders carry no
            ``meta['val']`` (graphs only).
        dynamic_batch: Make dim 0 of every input one symbolic ``batch`` dimension (graphs only).
        schedule: Apply the family's fixed dot-product schedule (VNNI / sdot tensorization,
            the AVX2 template) and, on CPU, the schedule of the glue and float islands
            (``glue_schedule.py``); tuned records apply regardless.
        database: Root folder of tuning records (``backends.tvm.tune``); the target's keyed
            subfolder is used. Kernels with a record get the tuned schedule, the others the
            fixed one. ``dynamic_batch`` defaults to False then (records are per static shape).
        relax_passes: Your ``tvm.transform.Pass`` es inserted into our pipeline: a list (run
            first, on the emitted module) or ``{stage: pass or [passes]}`` with stages from
            ``backends.tvm.STAGES`` (``start``, ``before_schedule``, ``after_schedule``,
            ``after_legalize``, ``after_lowering``). A failing pass, or one that leaves
            ill-formed IR, raises ``RelaxPassError`` naming it and its stage.

    Returns:
        A CompiledModule; call it with torch tensors.
    """
    normalize_relax_passes(relax_passes)  # bad stage names fail before any work
    if isinstance(qgraph, tvm.IRModule):
        if example_inputs is not None or dynamic_batch is not None:
            raise ValueError("example_inputs / dynamic_batch apply when emitting a graph; this "
                             "IRModule's shapes were fixed by backends.tvm.emit")
        sig, named = _signature(qgraph, target)
        mod, treespec = qgraph, sig["output_treespec"]
        input_json = sig["inputs"]
    else:
        if dynamic_batch is None:
            dynamic_batch = database is None
        mod, named, specs = build_ir(qgraph, "host" if target is None else target,
                                     example_inputs=example_inputs, dynamic_batch=dynamic_batch)
        treespec, input_json = output_treespec(qgraph), [s.to_json() for s in specs]
    tgt = named.target()
    family = get_family(named.family, tgt)
    db = None
    if database is not None:
        from backends.tvm.tune import open_database

        db = open_database(database, named)
    if not schedule:
        pairwise = family.pairwise and dataclasses.replace(family.pairwise, schedule=None)
        family = dataclasses.replace(family, schedule=None, pairwise=pairwise)
    failures: list = []
    try:
        exe = tvm.compile(mod, target=tgt,
                          relax_pipeline=get_pipeline(family, tgt, db, relax_passes, failures,
                                                      schedule_glue=schedule))
    except Exception:
        if failures:  # a user pass failed: raise its own error, not the FFI's wrapper
            raise failures[0] from failures[0].__cause__
        raise
    meta = {
        "target": named.name,
        "target_spec": dict(named.spec),
        "family": named.family,
        "runnable": _targets.runs_here(named),
        "cross": named.family != "cuda" and not _targets.runs_here(named),
        "inputs": input_json,
        "outputs": [s.to_json() for s in _output_specs(mod)],
        "output_treespec": treespec,
        "variants": _variants(mod),
    }
    return CompiledModule(exe, meta)
