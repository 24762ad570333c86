"""MetaSchedule tuning of a model's int8 kernels, kept in a persistent per-target database.

``tune(qgraph, target, trials=..., database=root)`` emits the model's Relax module, collects its
distinct ``ptq.kernel`` PrimFuncs (dense / conv2d by default), and tunes each one that has no
record yet; ``compile(qgraph, target, database=root)`` applies the records.

Database layout: ``root/<target name>-<key>/`` holds MetaSchedule's JSONDatabase
(``database_workload.json``, ``database_tuning_record.json``) and ``key.json``. The key hashes
the target dict (for ``host``: the real CPU name), the TVM, tvm-ffi and LLVM versions, so a
record is never applied to another CPU or toolchain. Within a folder, records are keyed by the
kernel's structural hash (the workload): kernels of the same shape are shared across models and
runs, and a second ``tune`` of the same model runs zero trials.

Schedules: the search space tiles the packed ``acc`` block around the family's 16x4 dot-product
intrinsic (VNNI, or the exact AVX2 one), like the fixed schedule but searching tile sizes,
loop order, parallelism and unrolling. At compile time a tuned record wins; kernels without a
record get the family's fixed schedule (``pipeline.ApplyPtqSchedules``).

Shapes are static: tuning needs concrete extents, so ``tune`` and ``compile(database=...)``
default to ``dynamic_batch=False`` (the example batch size). A kernel whose shape has no record
is compiled with the fixed schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import types
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import tvm_ffi
import tvm
from torch import fx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from backends.tvm import targets as _targets

#: Where ``tune`` keeps records when no ``database`` is given.
DEFAULT_ROOT = Path(os.environ.get("PTQ_TVM_TUNING_DB", "~/.cache/ptqpasses/tvm-tuning"))

#: Kernel kinds tuned by default (the dot-product kernels).
DEFAULT_KINDS = ("dense", "conv2d")


def versions() -> dict:
    """The toolchain versions a record depends on."""
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "llvm": int(tvm.target.codegen.llvm_version_major())}


def database_dir(root: str | os.PathLike | None, target: Any = "host") -> Path:
    """The folder of ``target``'s records under ``root`` (created, with its ``key.json``)."""
    named = _targets.resolve(target)
    root = Path(root if root is not None else DEFAULT_ROOT).expanduser()
    key = {"target": dict(named.spec), **versions()}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', named.name)}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    if not key_file.exists():
        key_file.write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n")
    return folder


def open_database(root: str | os.PathLike | None, target: Any = "host") -> ms.database.Database:
    """The JSONDatabase of ``target`` under ``root``."""
    return ms.database.JSONDatabase(work_dir=str(database_dir(root, target)),
                                    module_equality="structural")


def workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The IRModule a kernel is tuned and looked up as (the same normalization both ways)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def kernels(mod: tvm.IRModule, kinds: Iterable[str] = DEFAULT_KINDS
            ) -> list[tuple[str, str, tvm.IRModule]]:
    """Distinct ``(name, kind, workload)`` of the module's ptq kernels of ``kinds``."""
    kinds = tuple(kinds)
    seen, out = set(), []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not func.attrs:
            continue
        kind = str(func.attrs["ptq.kernel"]) if "ptq.kernel" in func.attrs else None
        if kind not in kinds:
            continue
        wl = workload(func)
        h = tvm_ffi.structural_hash(wl)
        if h in seen:
            continue
        seen.add(h)
        out.append((gv.name_hint, kind, wl))
    return out


def tuned_kernel(db: ms.database.Database, func: tvm.tirx.PrimFunc,
                 target: tvm.target.Target) -> Optional[tvm.tirx.PrimFunc]:
    """``func`` scheduled by its best record in ``db``, or None if it has none."""
    wl = workload(func)
    if not db.has_workload(wl):
        return None
    sch = db.query_schedule(wl, target=target, workload_name="main")
    if sch is None:
        return None
    out = sch.mod["main"]
    symbol = func.attrs.get("global_symbol") if func.attrs else None
    out = out.with_attr("global_symbol", symbol) if symbol is not None else out.without_attr(
        "global_symbol")
    return out.with_attr("tir.is_scheduled", True).with_attr("ptq.tuned", True)


def _has_record(db: ms.database.Database, wl: tvm.IRModule, target) -> bool:
    return db.has_workload(wl) and db.query_tuning_record(wl, target, "main") is not None


def space(family_name: str, target: tvm.target.Target,
          variant: str = "") -> ms.space_generator.SpaceGenerator:
    """The search space: multi-level tiling around the dot-product intrinsic of the family
    (and the kernel's ``ptq.variant``, e.g. the AVX2 pairwise one).

    No AutoInline: inlining the ``x_enc`` re-encoding into ``acc`` would hide the intrinsic's
    ``uint8`` operand and fall back to untensorized code.
    """
    intrin = _family_intrin(family_name, target, variant)
    if intrin is None:
        return ms.space_generator.PostOrderApply()  # TVM's rules for the target
    R, P, M = ms.schedule_rule, ms.postproc, ms.mutator
    return ms.space_generator.PostOrderApply(
        sch_rules=[
            R.MultiLevelTilingWithIntrin(
                intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64,
                vector_load_lens=None, reuse_read=None,
                reuse_write=R.ReuseType(req="may", levels=[1, 2], scope="global")),
            R.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                         unroll_max_steps=[0, 16, 64, 512],
                                         unroll_explicit=True),
            R.RandomComputeLocation(),
        ],
        postprocs=[P.DisallowDynamicLoop(), P.RewriteParallelVectorizeUnroll(),
                   P.RewriteReductionBlock(), P.RewriteTensorize(vectorize_init_loop=True)],
        mutator_probs={M.MutateTileSize(): 0.9, M.MutateComputeLocation(): 0.05,
                       M.MutateUnroll(): 0.03, M.MutateParallel(max_jobs_per_core=16): 0.02})


def _variant(wl: tvm.IRModule) -> str:
    """The ``ptq.variant`` a kernel was emitted with ("" for the family's main one)."""
    attrs = wl["main"].attrs
    return str(attrs["ptq.variant"]) if attrs and "ptq.variant" in attrs else ""


def _family_intrin(family_name: str, target: tvm.target.Target,
                   variant: str = "") -> Optional[str]:
    if family_name == "x86":
        from backends.tvm.x86 import template_args

        args = template_args(target, variant)
        return None if args is None else args["intrin"]
    if family_name == "aarch64" and _targets.has_feature(target, "dotprod"):
        from backends.tvm.aarch64 import intrinsics
        return intrinsics.register()
    return None


@contextlib.contextmanager
def _no_tvm_intrin_registry():
    """Skip ``import tvm.s_tir.tensor_intrin`` (TuneContext and the default builder import it).

    That registry parses ~250 TVMScript intrinsics (CUDA ones included); each parse walks
    ``inspect.stack()``, which is slow with torch loaded: 141 s of a 225 s two-trial run here.
    Our spaces use only the project's own intrinsics (registered by ``space``), so a stub module
    stands in while tuning; an already imported registry is left alone.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        sys.modules.pop(name, None)


def _stub_registry_in_worker():  # pickled by value into the builder worker (no project import)
    import sys as _sys
    import types as _types

    _sys.modules.setdefault("tvm.s_tir.tensor_intrin", _types.ModuleType("tvm.s_tir.tensor_intrin"))


def _seed_template(db, wl, kind, family_name, tgt, builder, runner) -> Optional[float]:
    """Measure the family's fixed template on ``wl`` and commit it as a tuning record, so the
    database's best is never worse than the fallback (up to noise). Returns ms, or None."""
    if family_name != "x86" or kind not in ("dense", "conv2d"):
        return None
    from tvm import s_tir

    from backends.tvm.x86 import template, template_args

    targs = template_args(tgt, _variant(wl))
    if targs is None:
        return None
    sch = s_tir.Schedule(wl)
    try:
        template.apply(sch, kind, **targs)
    except Exception:  # noqa: BLE001  (no seed; tuning still runs)
        return None
    args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, tgt)])
    if built.error_msg:
        return None
    (fut,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
    res = fut.result()
    if res.error_msg or not res.run_secs:
        return None
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(wl), res.run_secs, tgt, args))
    secs = [float(x) for x in res.run_secs]
    return 1e3 * sum(secs) / len(secs)


def _strategy(name: str, trials: int):
    if name == "auto":
        name = "replay" if trials < 16 else "evolutionary"
    if name == "replay":
        return ms.search_strategy.ReplayTrace()
    if name == "evolutionary":
        return ms.search_strategy.EvolutionarySearch(
            population_size=max(64, min(512, 8 * trials)),
            init_min_unmeasured=max(16, min(50, trials)))
    raise ValueError(f"unknown search strategy {name!r}: evolutionary, replay or auto")


@dataclasses.dataclass
class TaskResult:
    """One kernel's tuning outcome: ``trials`` run now (0 if the database had it)."""
    name: str
    kind: str
    trials: int
    seconds: float
    best_ms: Optional[float]


@dataclasses.dataclass
class TuneResult:
    database: Path
    tasks: list[TaskResult]

    @property
    def trials(self) -> int:
        return sum(t.trials for t in self.tasks)


def _best_ms(db, wl, target) -> Optional[float]:
    rec = db.query_tuning_record(wl, target, "main") if db.has_workload(wl) else None
    if rec is None or not rec.run_secs:
        return None
    secs = [float(s) for s in rec.run_secs]
    return 1e3 * sum(secs) / len(secs)


def tune(qgraph: fx.GraphModule, target: Any = "host", *, trials: int = 64,
         database: str | os.PathLike | None = None,
         example_inputs: Optional[Sequence[torch.Tensor]] = None,
         dynamic_batch: bool = False, kinds: Iterable[str] = DEFAULT_KINDS,
         trials_per_iter: Optional[int] = None, builder_timeout: float = 600.0,
         strategy: str = "auto", progress: bool = True) -> TuneResult:
    """Tune the distinct int8 kernels of ``qgraph`` for ``target`` into ``database``.

    Args:
        qgraph: The integer-operator graph (as for ``compile``).
        target: Must run on this machine (measurements are local).
        trials: Measured candidates per kernel.
        database: Root folder of the databases (default ``DEFAULT_ROOT``); records go to the
            target's keyed subfolder (``database_dir``).
        example_inputs, dynamic_batch: As for ``compile``; shapes must be static to tune.
        kinds: Kernel kinds to tune (``ptq.kernel`` attribute values).
        trials_per_iter: Candidates per search round (default ``min(trials, 16)``).
        builder_timeout: Seconds per build (one builder worker; importing TVM in a worker is
            slow on a loaded core, and the default 30 s kills workers forever).
        strategy: ``evolutionary`` (cost-model guided), ``replay`` (random samples of the
            space, no cost model: cheap per trial) or ``auto`` (replay below 16 trials).
        progress: tqdm bar per kernel.

    Returns:
        A TuneResult; kernels already in the database run zero trials.
    """
    from tqdm.auto import tqdm

    from backends.tvm.compile import build_ir

    mod, named, _ = build_ir(qgraph, target, example_inputs=example_inputs,
                             dynamic_batch=dynamic_batch)
    if not _targets.runs_here(named):
        raise ValueError(f"target {named.name!r} does not run on this machine; tuning measures "
                         "locally")
    tgt = named.target()
    folder = database_dir(database, named)
    db = open_database(database, named)
    todo = kernels(mod, kinds)
    results: list[TaskResult] = []
    pending = []
    for name, kind, wl in todo:
        if _has_record(db, wl, tgt):
            results.append(TaskResult(name, kind, 0, 0.0, _best_ms(db, wl, tgt)))
        else:
            pending.append((name, kind, wl))
    if not pending:
        return TuneResult(folder, results)

    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=builder_timeout,
                                      initializer=_stub_registry_in_worker)
    runner = ms.runner.LocalRunner(
        timeout_sec=max(60.0, builder_timeout / 4),
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20,
                                                   enable_cpu_cache_flush=False))
    per_iter = trials_per_iter or min(trials, 16)
    with tempfile.TemporaryDirectory(prefix="ptq_tune_") as work_dir, _no_tvm_intrin_registry():
        for name, kind, wl in pending:
            bar = tqdm(total=trials, desc=f"tune {name} ({kind})", disable=not progress,
                       unit="trial", leave=True)
            counter = _Progress(bar)
            ctx = ms.TuneContext(
                mod=wl, target=tgt, space_generator=space(named.family, tgt, _variant(wl)),
                search_strategy=_strategy(strategy, trials), task_name=name, num_threads=1)
            t0 = time.perf_counter()
            seed = _seed_template(db, wl, kind, named.family, tgt, builder, runner)
            if seed is not None:
                bar.set_postfix_str(f"template {seed:.3f} ms")
            ms.tune.tune_tasks(
                tasks=[ctx], task_weights=[1.0], work_dir=work_dir,
                max_trials_global=trials, max_trials_per_task=trials,
                num_trials_per_iter=per_iter, builder=builder, runner=runner, database=db,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                   counter],
                task_scheduler="round-robin")
            secs = time.perf_counter() - t0
            best = _best_ms(db, wl, tgt)
            bar.set_postfix_str(f"best {best:.3f} ms" if best is not None else "no valid record")
            bar.close()
            results.append(TaskResult(name, kind, counter.count, secs, best))
    return TuneResult(folder, results)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Advances a tqdm bar by the candidates measured in each round."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar
        self.count = 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        n = len(measure_candidates)
        self.count += n
        self.bar.update(n)
