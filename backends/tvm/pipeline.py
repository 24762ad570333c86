"""The Relax pipeline of a strategy: TVM's default stages plus ``ApplyPtqSchedules`` (the ptq
kernels: tuned record or the strategy's fixed schedule) and ``ApplyGlueSchedules`` (everything
else, on CPU)."""

from __future__ import annotations

import warnings
from typing import Optional

import tvm
from tvm import relax

from ptqpasses_backends.tvm.cpu import glue
from ptqpasses_backends.tvm.records import tuned_kernel
from ptqpasses_backends.tvm.strategy import Strategy


def _try_schedule(what: str, gv, schedule, *args):
    """``schedule(*args)``, or None with a warning when it fails (the correct, unscheduled
    function is kept)."""
    try:
        return schedule(*args)
    except Exception as e:  # noqa: BLE001  (warned; compilation goes on)
        warnings.warn(f"{what} of {gv.name_hint} failed, left to the default lowering: "
                      f"{type(e).__name__}: {str(e)[:300]}")
        return None


def _with_updates(mod: tvm.IRModule, updates: dict) -> tvm.IRModule:
    """A copy of ``mod`` with the functions in ``updates`` replaced (the caller's module, e.g.
    one from ``emit``, stays as it was)."""
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def ApplyPtqSchedules(strategy: Strategy, target: tvm.target.Target,
                      database=None) -> tvm.transform.Pass:
    """Schedule every PrimFunc tagged ``ptq.kernel``: its tuned record from ``database`` (a
    MetaSchedule Database, see ``records.py``) if there is one, else the strategy's fixed
    schedule for the kernel's kind and variant (``Strategy.schedule_for``).

    Runs before legalization: the ptq kernels are already TE PrimFuncs (``call_tir``), tagged
    opaque so that the later FuseOps/FuseTIR leave them as they are. Kernels built already
    scheduled (``tir.is_scheduled``, e.g. AMX's hand-written TIR) are left alone.
    """

    @tvm.transform.module_pass(opt_level=0, name="ApplyPtqSchedules")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
            if not attrs or "ptq.kernel" not in attrs or "tir.is_scheduled" in attrs:
                continue
            if database is not None:
                tuned = tuned_kernel(database, func, target)
                if tuned is not None:
                    updates[gv] = tuned
                    continue
            kind = str(attrs["ptq.kernel"])
            schedule = strategy.schedule_for(func, kind)
            if schedule is None:
                continue
            scheduled = _try_schedule(f"{strategy.name} schedule", gv, schedule, func, kind,
                                      target)
            if scheduled is not None:
                updates[gv] = scheduled
        return _with_updates(mod, updates)

    return _apply


def ApplyGlueSchedules(target: tvm.target.Target) -> tvm.transform.Pass:
    """Schedule every PrimFunc that is not a ptq kernel and not yet scheduled (the fused
    integer glue and float islands) with ``glue.schedule_glue``; CPU (``llvm``)
    targets only. Runs after legalization and fusion, where those PrimFuncs exist.

    A function no rule applies to, or whose schedule fails (a warning), is left to the default
    lowering as it was.
    """

    @tvm.transform.module_pass(opt_level=0, name="ApplyGlueSchedules")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if target.kind.name != "llvm":
            return mod
        updates = {}
        for gv, func in mod.functions_items():
            if not glue.is_glue(func):
                continue
            scheduled = _try_schedule("glue schedule", gv, glue.schedule_glue, func,
                                      target)
            if scheduled is not None:
                updates[gv] = scheduled
        return _with_updates(mod, updates)

    return _apply


def SparePtqKernels(fold: tvm.transform.Pass) -> tvm.transform.Pass:
    """``fold`` (Relax ``FoldConstant``) run with the ``ptq.kernel`` PrimFuncs hidden, so a
    kernel whose inputs all fold to constants is left to run, not evaluated at compile time.

    ``FoldConstant`` evaluates a ``call_tir`` of constants by building its PrimFunc for a plain
    ``llvm`` target (no ``-mcpu``, no features). Our kernels are built for the strategy's
    target: AMX tiles, VNNI, AVX2 ``vpmaddwd``. LLVM cannot select or legalize those for a
    baseline x86-64 and aborts the process (``Cannot select: intrinsic
    %llvm.x86.tilestored64``; ``Do not know how to split the result of this operator``), an
    abort TVM cannot catch. DeBERTa-v2 met it: its relative-position embeddings (a LayerNorm
    of a weight) feed int8 linears, so after folding the LayerNorm and the quantize the
    linears' inputs are all constants. During the fold each kernel is an ``ExternFunc`` of
    its name, which ``FoldConstant`` does not build; the PrimFuncs go back after it.
    """

    @tvm.transform.module_pass(opt_level=0, name="FoldConstantSparingPtqKernels")
    def _apply(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        kernels = {gv: func for gv, func in mod.functions_items()
                   if isinstance(func, tvm.tirx.PrimFunc) and func.attrs
                   and "ptq.kernel" in func.attrs}
        if not kernels:
            return fold(mod)
        hidden = mod.clone()
        for gv in kernels:
            hidden[gv] = relax.ExternFunc(gv.name_hint)
        out = fold(hidden)
        for gv, func in kernels.items():
            out[gv] = func
        return out

    return _apply


def _legalize_passes(stages, target) -> list:
    """The family's legalize passes, its ``FoldConstant`` sparing the ptq kernels."""
    return [SparePtqKernels(p) if p.info.name == "FoldConstant" else p
            for p in stages.legalize_passes(target)]


#: Named insertion points of the per-family pipeline, in order, for ``compile(relax_passes=)``.
#: Each maps to what the module looks like when user passes run there.
STAGES = {
    "start": "as emitted (ptq kernels are TE PrimFuncs tagged ``ptq.kernel``, float islands and "
             "integer glue are high-level Relax ops)",
    "before_schedule": "after TVM's library dispatch (sampling / sort-scan), before "
                       "``ApplyPtqSchedules``",
    "after_schedule": "ptq kernels scheduled (fixed template, tensorized intrinsic, or tuned "
                      "record); Relax ops not yet legalized",
    "after_legalize": "every op legalized to TIR, constants folded, ops fused "
                      "(LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR; "
                      "FoldConstant leaves the ptq kernels alone: ``SparePtqKernels``); "
                      "the glue PrimFuncs are not scheduled yet: ``ApplyGlueSchedules`` runs "
                      "next and skips those marked ``tir.is_scheduled``",
    "after_lowering": "glue PrimFuncs scheduled (CPU), dataflow lowered (ToNonDataflow, "
                      "CallTIRRewrite), before memory planning and VM finalization",
}


class RelaxPassError(RuntimeError):
    """A user pass given to ``compile(relax_passes=)`` failed or left ill-formed IR; names the
    pass and the stage."""


def normalize_relax_passes(relax_passes) -> dict[str, list]:
    """``relax_passes`` as ``{stage: [pass, ...]}``.

    Accepts None, a list of ``tvm.transform.Pass`` (run at ``"start"``), or a dict from a
    ``STAGES`` name to a pass or a list of passes.
    """
    if relax_passes is None:
        return {}
    if isinstance(relax_passes, (list, tuple, tvm.transform.Pass)):
        relax_passes = {"start": relax_passes}
    if not isinstance(relax_passes, dict):
        raise TypeError("relax_passes must be a list of tvm.transform.Pass or a dict "
                        f"{{stage: passes}}, got {type(relax_passes).__name__}")
    out = {}
    for stage, passes in relax_passes.items():
        if stage not in STAGES:
            raise ValueError(f"unknown pipeline stage {stage!r} in relax_passes; stages: "
                             f"{', '.join(STAGES)}")
        passes = [passes] if isinstance(passes, tvm.transform.Pass) else list(passes)
        for p in passes:
            if not isinstance(p, tvm.transform.Pass):
                raise TypeError(f"relax_passes[{stage!r}] holds {p!r}, not a "
                                "tvm.transform.Pass (wrap functions with "
                                "tvm.transform.module_pass or relax.transform.function_pass)")
        out[stage] = passes
    return out


def _guarded(stage: str, user_pass: tvm.transform.Pass, failures: list) -> tvm.transform.Pass:
    """Run ``user_pass``; an exception or ill-formed result becomes a RelaxPassError naming
    the pass and the stage. The error is also appended to ``failures``: exceptions crossing
    TVM's FFI come back as plain RuntimeErrors, so ``compile`` re-raises the original."""
    name = user_pass.info.name

    @tvm.transform.module_pass(opt_level=0, name=f"User[{stage}]:{name}")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            out = user_pass(mod)
        except Exception as e:  # noqa: BLE001  (re-raised with the pass and stage named)
            err = RelaxPassError(f"user pass {name!r} at stage {stage!r} failed: "
                                 f"{type(e).__name__}: {str(e)[:500]}")
            err.__cause__ = e
            failures.append(err)
            raise err from e
        # Relax functions only: PrimFuncs are checked by TIR's own passes later.
        if not relax.analysis.check_well_formed(out):
            err = RelaxPassError(f"user pass {name!r} at stage {stage!r} returned an "
                                 "ill-formed IRModule (relax.analysis.check_well_formed)")
            failures.append(err)
            raise err
        return out

    return _run


def get_pipeline(strategy: Strategy, target: tvm.target.Target,
                 database=None, relax_passes=None,
                 failures: Optional[list] = None) -> tvm.transform.Pass:
    """The Relax pipeline that ``tvm.compile`` runs for ``strategy`` on ``target`` (tuned
    records from the MetaSchedule ``database`` win over the fixed schedules). The non-ptq
    PrimFuncs get ``ApplyGlueSchedules`` where ``strategy.schedule_glue``.

    ``relax_passes`` (see ``normalize_relax_passes``) inserts user passes at the ``STAGES``
    points, in the order given; their errors are appended to ``failures`` (see ``_guarded``).
    """
    failures = [] if failures is None else failures
    if target.kind.name == "cuda":
        stages = relax.backend.cuda.pipeline
    else:
        stages = relax.backend.cpu_generic.pipeline
    user = {stage: [_guarded(stage, p, failures) for p in passes]
            for stage, passes in normalize_relax_passes(relax_passes).items()}

    @tvm.transform.module_pass(opt_level=0, name="PtqPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                user.get("start", [])
                + stages.library_dispatch_passes(target)
                + user.get("before_schedule", [])
                + [ApplyPtqSchedules(strategy, target, database)]
                + user.get("after_schedule", [])
                + _legalize_passes(stages, target)
                + user.get("after_legalize", [])
                + ([ApplyGlueSchedules(target)] if strategy.schedule_glue else [])
                + stages.dataflow_lower_passes(target)
                + user.get("after_lowering", [])
                + stages.finalize_passes(target))
            return seq(mod)

    return _pipeline
