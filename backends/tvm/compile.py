"""``compile(qgraph or IRModule, target)``: runs the target strategy's pipeline (with user
passes at named ``STAGES``) and wraps the result in a ``CompiledModule``."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import torch
import tvm
from torch import fx

from ptqpasses_backends.tvm import registry
from ptqpasses_backends.tvm import targets as _targets
from ptqpasses_backends.tvm.build import SIGNATURE_ATTR, _output_specs, build_ir, output_treespec
from ptqpasses_backends.tvm.emit import VARIANTS_ATTR
from ptqpasses_backends.tvm.pipeline import get_pipeline, normalize_relax_passes
from ptqpasses_backends.tvm.records import open_database
from ptqpasses_backends.tvm.runtime import CompiledModule


def _signature(mod: tvm.IRModule, target: Any) -> tuple[dict, _targets.NamedTarget]:
    attrs = mod.attrs
    if attrs is None or SIGNATURE_ATTR not in attrs:
        raise ValueError(f"IRModule has no {SIGNATURE_ATTR!r} attribute: make it with "
                         "ptqpasses_backends.tvm.emit(qgraph, target), and keep module attributes "
                         "in your passes (IRModule(functions) drops them; use mod.with_attr)")
    sig = json.loads(str(attrs[SIGNATURE_ATTR]))
    emitted = _targets.NamedTarget(sig["target"], sig["family"], sig["target_spec"])
    if target is None:
        return sig, _targets.resolve(emitted)
    named = _targets.resolve(target)
    if _layout(named) != _layout(emitted):
        raise ValueError(f"IRModule was emitted for {emitted.name!r} (strategy "
                         f"{registry.strategy_for(emitted).name!r}, layouts "
                         f"{_layout(emitted)}); it cannot be compiled for {named.name!r} "
                         f"(strategy {registry.strategy_for(named).name!r}, layouts "
                         f"{_layout(named)}): emit it again for that target")
    return sig, named


def _layout(named: _targets.NamedTarget) -> tuple:
    """What emission baked into the module for this target (``Strategy.layouts``: the
    architecture, each variant's activation encoding and weight blocks; x86 AVX2 and VNNI
    targets pack differently)."""
    return registry.strategy_for(named).layouts()


def _variants(mod: tvm.IRModule) -> dict:
    """Packed kernel node -> [strategy variant, why], as emission chose
    (``emit.VARIANTS_ATTR``)."""
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
        target: A name from ``ptqpasses_backends.tvm.TARGETS``, a TVM target dict, or a NamedTarget.
            Default ``"host"`` for a graph; for an IRModule, the target it was emitted for
            (another target must have the same layouts: ``Strategy.layouts``).
        example_inputs: Tensors giving input shapes/dtypes when placeholders carry no
            ``meta['val']`` (graphs only).
        dynamic_batch: Make dim 0 of every input one symbolic ``batch`` dimension (graphs only).
        schedule: Apply the strategy's fixed schedules (the x86 register-tiled templates,
            sdot tensorization, the generic CPU schedules of ``cpu/``) and, on CPU, the
            schedule of the glue and float islands (``cpu/glue.py``); tuned records apply
            regardless. Kernels built already scheduled (AMX) stay as they are.
        database: Root folder of tuning records (``ptqpasses_backends.tvm.tune``); the
            target's keyed
            subfolder is used. Kernels with a record get the tuned schedule, the others the
            fixed one. ``dynamic_batch`` defaults to False then (records are per static shape;
            a symbolic batch without ``example_inputs`` becomes 1, as in ``tune``).
        relax_passes: Your ``tvm.transform.Pass`` es inserted into our pipeline: a list (run
            first, on the emitted module) or ``{stage: pass or [passes]}`` with stages from
            ``ptqpasses_backends.tvm.STAGES`` (``start``, ``before_schedule``, ``after_schedule``,
            ``after_legalize``, ``after_lowering``). A failing pass, or one that leaves
            ill-formed IR, raises ``RelaxPassError`` naming it and its stage.

    Returns:
        A CompiledModule; call it with torch tensors.
    """
    normalize_relax_passes(relax_passes)  # bad stage names fail before any work
    if isinstance(qgraph, tvm.IRModule):
        if example_inputs is not None or dynamic_batch is not None:
            raise ValueError("example_inputs / dynamic_batch apply when emitting a graph; this "
                             "IRModule's shapes were fixed by ptqpasses_backends.tvm.emit")
        sig, named = _signature(qgraph, target)
        mod, treespec = qgraph, sig["output_treespec"]
        input_json = sig["inputs"]
    else:
        if dynamic_batch is None:
            dynamic_batch = database is None
        mod, named, specs = build_ir(qgraph, "host" if target is None else target,
                                     example_inputs=example_inputs, dynamic_batch=dynamic_batch,
                                     static_batch=1 if database is not None else None)
        treespec, input_json = output_treespec(qgraph), [s.to_json() for s in specs]
    tgt = named.target()
    strategy = registry.strategy_for(named)
    db = open_database(database, named) if database is not None else None
    failures: list = []
    try:
        exe = tvm.compile(mod, target=tgt, relax_pipeline=get_pipeline(
            strategy if schedule else strategy.unscheduled(), tgt, db, relax_passes,
            failures))
    except Exception:
        if failures:  # a user pass failed: raise its own error, not the FFI's wrapper
            raise failures[0] from failures[0].__cause__
        raise
    meta = {
        "target": named.name,
        "target_spec": dict(named.spec),
        "family": named.family,
        "strategy": strategy.name,
        "strategy_why": registry.why(named),
        "cross_compiler": strategy.cross_compiler,
        "runnable": _targets.runs_here(named),
        "cross": named.family != "cuda" and not _targets.runs_here(named),
        "inputs": input_json,
        "outputs": [s.to_json() for s in _output_specs(mod)],
        "output_treespec": treespec,
        "variants": _variants(mod),
    }
    return CompiledModule(exe, meta)
