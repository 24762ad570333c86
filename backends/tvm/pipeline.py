"""Per-family Relax pipelines: TVM's default stages plus ``ApplyPtqSchedules``."""

from __future__ import annotations

import warnings

import tvm
from tvm import relax

from backends.tvm.family import Family
from backends.tvm.kernels import wide as wide_k
from backends.tvm.wide_schedule import schedule_wide


def ApplyPtqSchedules(family: Family, target: tvm.target.Target,
                      database=None) -> tvm.transform.Pass:
    """Schedule every PrimFunc tagged ``ptq.kernel``: its tuned record from ``database`` (a
    MetaSchedule Database, see ``tune.py``) if there is one, else the family's fixed schedule
    (int16-activation kernels on CPU: ``wide_schedule.py``).

    Runs after fusion: ptq kernels are tagged opaque, so FuseOps leaves them (and their tag)
    intact.
    """

    @tvm.transform.module_pass(opt_level=0, name="ApplyPtqSchedules")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if family.schedule is None and database is None:
            return mod
        updates = {}
        for gv, func in mod.functions_items():
            attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
            if not attrs or "ptq.kernel" not in attrs or "tir.is_scheduled" in attrs:
                continue
            if database is not None:
                from backends.tvm.tune import tuned_kernel

                tuned = tuned_kernel(database, func, target)
                if tuned is not None:
                    updates[gv] = tuned
                    continue
            kind = str(attrs["ptq.kernel"])
            schedule = family.schedule
            if kind in wide_k.KINDS:  # int16 kernels: no intrinsic; parallel loops on CPU
                schedule = _schedule_wide if target.kind.name == "llvm" else None
            if schedule is None:
                continue
            try:
                updates[gv] = schedule(func, kind, target)
            except Exception as e:  # noqa: BLE001  (keep the correct, unscheduled kernel)
                warnings.warn(f"{family.name} schedule of {gv.name_hint} failed, left to the "
                              f"default lowering: {type(e).__name__}: {str(e)[:300]}")
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply


def _schedule_wide(func, kind, _target):
    return schedule_wide(func, kind)


def get_pipeline(family: Family, target: tvm.target.Target,
                 database=None) -> tvm.transform.Pass:
    """The Relax pipeline that ``tvm.compile`` runs for ``family`` on ``target`` (tuned records
    from the MetaSchedule ``database`` win over the fixed schedules)."""
    if target.kind.name == "cuda":
        stages = relax.backend.cuda.pipeline
    else:
        stages = relax.backend.cpu_generic.pipeline

    @tvm.transform.module_pass(opt_level=0, name="PtqPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                stages.library_dispatch_passes(target)
                + [ApplyPtqSchedules(family, target, database)]
                + stages.legalize_passes(target)
                + stages.dataflow_lower_passes(target)
                + stages.finalize_passes(target))
            return seq(mod)

    return _pipeline
