"""MetaSchedule tuning of a model's int8 kernels, kept in a persistent per-target database.

``tune(qgraph, target, trials=..., database=root)`` emits the model's Relax module, collects its
distinct ``ptq.kernel`` PrimFuncs (dense / conv2d by default), and tunes each one that has no
record yet; ``compile(qgraph, target, database=root)`` applies the records.

Records (where they live, how they are keyed and replayed) are ``records.py``'s; a second
``tune`` of the same model runs zero trials.

Schedules: the search space tiles the packed ``acc`` block around the dot-product intrinsic of
the kernel's strategy variant (``Variant.intrin``: VNNI zmm / ymm, the exact AVX2 one, sdot),
like the fixed template but searching tile sizes, loop order, parallelism and unrolling; the
variant's template (``Variant.seed``) is measured first, as a record. At compile time a tuned
record wins; kernels without a record get the fixed schedule (``pipeline.ApplyPtqSchedules``).
Variants without an intrinsic (AMX's hand-written kernels) are not tuned.

Cost of a task (one workload): the template seed (one build and run), then ``trials``
candidates, each built in one persistent builder worker and measured by one runner worker.
Below 100 trials the candidates are random samples of the space (``_search``); the build
(~1 s per candidate on a loaded core) is most of the time.

Remote devices: ``tune(..., rpc="host:port:key")`` builds here and measures on the devices an
RPC tracker lists under ``key`` (MetaSchedule's RPC runner, one worker per server), each
candidate linked here as a ``.so`` (a cross target by its strategy's cross compiler); the
database stays local, keyed by the target (``ptqpasses_backends.tvm.remote``).

Shapes are static: tuning needs concrete extents, so ``tune`` and ``compile(database=...)``
default to ``dynamic_batch=False`` (the example batch size). A kernel whose shape has no record
is compiled with the fixed schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import types
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import tvm
from torch import fx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ptqpasses_backends.tvm import targets as _targets
from ptqpasses_backends.tvm.build import build_ir
from ptqpasses_backends.tvm.records import KEYING, database_dir, locked, open_database, workload
from ptqpasses_backends.tvm.registry import strategy_for
from ptqpasses_backends.tvm.strategy import PACKED_KINDS, Variant

#: Kernel kinds tuned by default (the dot-product kernels).
DEFAULT_KINDS = PACKED_KINDS


def kernels(mod: tvm.IRModule, kinds: Iterable[str] = DEFAULT_KINDS
            ) -> list[tuple[str, str, tvm.IRModule]]:
    """Distinct ``(name, kind, workload)`` of the module's ptq kernels of ``kinds``, those
    built already scheduled (hand-written TIR: AMX) left out.

    Distinct as the database keys them (``KEYING``): of the kernels sharing an ``acc`` block,
    only the first is listed.
    """
    kinds = tuple(kinds)
    seen = ms.database.MemoryDatabase(module_equality=KEYING)
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not func.attrs:
            continue
        kind = str(func.attrs["ptq.kernel"]) if "ptq.kernel" in func.attrs else None
        if kind not in kinds or "tir.is_scheduled" in func.attrs:
            continue
        wl = workload(func)
        if seen.has_workload(wl):
            continue
        seen.commit_workload(wl)
        out.append((gv.name_hint, kind, wl))
    return out


def _records(db: ms.database.Database, wl: tvm.IRModule) -> int:
    """Valid records of ``wl`` in ``db``: its template seed and every candidate measured."""
    if not db.has_workload(wl):
        return 0
    return len(db.get_top_k(db.commit_workload(wl), 1 << 30))


def space(variant: Variant) -> ms.space_generator.SpaceGenerator:
    """The search space: multi-level tiling around the dot-product intrinsic of a strategy
    variant (``Variant.intrin``).

    No AutoInline: inlining the ``x_enc`` re-encoding into ``acc`` would hide the intrinsic's
    ``uint8`` operand and fall back to untensorized code. Explicit unrolling up to 64 steps:
    512-step candidates took 5-8x longer to build (~8 s each on a loaded core, most of a
    16-trial task's build time) and were never the best of ~100 measured 3x3-conv candidates.
    """
    if variant.intrin is None:
        return ms.space_generator.PostOrderApply()  # TVM's rules for the target
    intrin = variant.intrin()
    R, P, M = ms.schedule_rule, ms.postproc, ms.mutator
    return ms.space_generator.PostOrderApply(
        sch_rules=[
            R.MultiLevelTilingWithIntrin(
                intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64,
                vector_load_lens=None, reuse_read=None,
                reuse_write=R.ReuseType(req="may", levels=[1, 2], scope="global")),
            R.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                         unroll_max_steps=[0, 16, 64],
                                         unroll_explicit=True),
            R.RandomComputeLocation(),
        ],
        postprocs=[P.DisallowDynamicLoop(), _KeepIntrinLoopsScalar(),
                   P.RewriteParallelVectorizeUnroll(),
                   P.RewriteReductionBlock(), P.RewriteTensorize(vectorize_init_loop=True)],
        mutator_probs={M.MutateTileSize(): 0.9, M.MutateComputeLocation(): 0.05,
                       M.MutateUnroll(): 0.03, M.MutateParallel(max_jobs_per_core=16): 0.02})


#: The loop annotation ``_KeepIntrinLoopsScalar`` sets (ignored by lowering).
_SCALAR_LOOP = "ptq.keep_scalar"


@derived_object
class _KeepIntrinLoopsScalar(ms.postproc.PyPostproc):
    """Annotate the innermost loop around each block to be tensorized, so that
    ``RewriteParallelVectorizeUnroll`` (which stops at annotated loops) does not vectorize the
    loops around the dot-product intrinsic.

    The intrinsics' bodies hold vector loops of their own; a vectorized loop around them fails
    to build ("Cannot broadcast lanes=16 to 32", "VectorizeLoop before LiftStorageAlloc") or
    segfaults TVM 0.27 in the builder worker. Without this, 6 to 8 of 16 candidates of a 3x3
    conv failed, half of them by a segfault (a ~4.5 s worker restart each).
    """

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch) -> bool:
        todo = list(sch.get_child_blocks(sch.get_sblock("root")))
        while todo:
            block = todo.pop()
            if "meta_schedule.auto_tensorize" in sch.get(block).annotations:
                loops = sch.get_loops(block)
                if loops:
                    sch.annotate(loops[-1], _SCALAR_LOOP, 1)
            todo.extend(sch.get_child_blocks(block))
        return True

    def clone(self):
        return _KeepIntrinLoopsScalar()


def _variant(wl: tvm.IRModule, strategy) -> Variant:
    """The strategy variant a kernel was emitted with (its ``ptq.variant`` attribute)."""
    return strategy.of_kernel(wl["main"])


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


def _worker_function(source: str, name: str):
    """The function ``name`` defined by ``source``, in a module namespace that is not
    importable, so that cloudpickle sends it to TVM's worker processes by value (a function of
    this module would be pickled by reference, making each worker import the project)."""
    namespace = {"__name__": "ptq_tune_worker"}
    exec(source, namespace)  # noqa: S102  (our own constant source)
    return namespace[name]


#: The builder worker's initializer: the registry stub of ``_no_tvm_intrin_registry``.
_STUB_REGISTRY_IN_WORKER = _worker_function("""
def stub_registry():
    import sys, types
    name = "tvm.s_tir.tensor_intrin"
    sys.modules.setdefault(name, types.ModuleType(name))
""", "stub_registry")

#: The runner's evaluator: the fastest of the ``repeat`` timings, not each of them. The
#: database ranks records by the mean of their timings, and the load of a shared machine only
#: ever adds time: with one noisy timing per candidate, the template seed was measured up to 2x
#: slow and lost to candidates that are slower in the model (ResNet-18: tuned 45.4 ms vs
#: template 38.7 ms).
_MIN_OF_REPEATS = _worker_function("""
def min_of_repeats(rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common
    return [min(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))]
""", "min_of_repeats")


@derived_object
class _Builder(ms.builder.PyBuilder):
    """MetaSchedule's local build in ONE worker process kept for the whole ``tune`` call.

    ``LocalBuilder`` starts a fresh worker for every round (and for its sanity check), and a
    worker start imports TVM and torch: ~4.5 s on a loaded core, more than half the build time
    of a 16-trial round. Here the worker is reused; it is restarted only when it dies (TVM
    0.27's vectorizer segfaults on some candidates: that candidate fails, the tune goes on), on
    a timeout, and after ``max_uses`` builds (MetaSchedule restarts its workers for a memory
    leak of long-lived ones).
    """

    def __init__(self, timeout_sec: float, max_uses: int = 256, export=None):
        super().__init__()
        from tvm.support.popen_pool import PopenPoolExecutor

        self.timeout_sec = timeout_sec
        self.export = export  # (None: MetaSchedule's default, a .tar of objects)
        self.pool = PopenPoolExecutor(max_workers=1, timeout=timeout_sec,
                                      initializer=_STUB_REGISTRY_IN_WORKER,
                                      maximum_process_uses=max_uses)
        self.pool.submit(int)  # start the worker now (it imports TVM while the runner's does)

    def build(self, build_inputs):
        from tvm.s_tir.meta_schedule.builder import local_builder

        results = []
        for bi in build_inputs:
            fut = self.pool.submit(local_builder._worker_func, None, self.export, bi.mod,
                                   bi.target, None)
            try:
                results.append(ms.builder.BuilderResult(fut.result(), None))
            except TimeoutError:
                results.append(ms.builder.BuilderResult(
                    None, f"build timed out after {self.timeout_sec} s (worker killed)"))
            except Exception as exc:  # noqa: BLE001  (a crashed or failing build: that candidate)
                results.append(ms.builder.BuilderResult(None, f"build failed: {exc}"))
        return results

    def close(self) -> None:
        self.pool.shutdown()


#: The builder's export for a remote device: a ``.so`` linked here (by ``cc``, the target's
#: cross compiler, or the host's compiler when None), since the device may have no compiler
#: to link MetaSchedule's default ``.tar`` of objects.
_EXPORT_SO = _worker_function("""
def export_so(cc, mod):
    import os, tempfile
    from tvm.support import cc as _cc
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, **({"fcompile": _cc.cross_compiler(cc)} if cc else {}))
    return path
""", "export_so")

#: ``_MIN_OF_REPEATS`` for MetaSchedule's RPC runner (whose evaluators also take the session).
_MIN_OF_REPEATS_RPC = _worker_function("""
def min_of_repeats_rpc(session, rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common
    return [min(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))]
""", "min_of_repeats_rpc")


def _rpc_runner(device, evaluator_config, session_timeout: float):
    """MetaSchedule's RPC runner measuring on every server the tracker lists under the key,
    in parallel (one worker per server)."""
    if device.key is None:
        raise ValueError(f"rpc={str(device)!r}: remote tuning goes through an RPC tracker: "
                         "host:port:key (python -m tvm.exec.rpc_tracker; servers started "
                         "with --tracker host:port --key key)")
    servers = device.servers()
    if servers < 1:
        raise ConnectionError(f"the RPC tracker {device.host}:{device.port} lists no server "
                              f"under the key {device.key!r}")
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=device.host, tracker_port=device.port,
                                       tracker_key=device.key, session_priority=1,
                                       session_timeout_sec=int(session_timeout)),
        evaluator_config=evaluator_config, f_run_evaluator=_MIN_OF_REPEATS_RPC,
        max_workers=servers), servers


@dataclasses.dataclass
class _Seed:
    """The variant's fixed template of one workload, built once and measured into the database
    as a tuning record, so that the database's best is never worse than the fallback."""
    workload: tvm.IRModule
    trace: Any
    artifact: str
    args: Any

    def measure(self, db, runner, target, runs: int = 3) -> Optional[float]:
        """Measure ``runs`` times, commit the fastest as a record; ms, or None if all failed.

        The load of a shared machine only adds time, and a slow seed lets slower candidates
        win (an unlucky candidate merely loses), hence the fastest of several runs.
        """
        futures = runner.run([ms.runner.RunnerInput(self.artifact, "cpu", self.args)] * runs)
        timings = [[float(x) for x in r.run_secs] for r in (f.result() for f in futures)
                   if not r.error_msg and r.run_secs]
        if not timings:
            return None
        secs = min(timings, key=lambda t: sum(t) / len(t))
        db.commit_tuning_record(ms.database.TuningRecord(
            self.trace, db.commit_workload(self.workload), secs, target, self.args))
        return 1e3 * sum(secs) / len(secs)


def _template_seed(wl, variant: Variant, kind: str, tgt, builder) -> Optional[_Seed]:
    """The variant's fixed template of ``wl`` (``Variant.seed``) built for ``tgt``, or None."""
    if variant.seed is None or kind not in PACKED_KINDS:
        return None
    from tvm import s_tir

    sch = s_tir.Schedule(wl)
    try:
        variant.seed(sch, kind)
    except Exception:  # noqa: BLE001  (no seed; tuning still runs)
        return None
    args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, tgt)])
    if built.error_msg:
        return None
    return _Seed(wl, sch.trace, built.artifact_path, args)


#: Measurements MetaSchedule's XGB cost model needs before it ranks candidates (its
#: ``num_warmup_samples``); below that its scores are uniform random.
_XGB_WARMUP = 100


def _cost_model(trials: int):
    """XGBoost when a task measures enough candidates to train it, else random scores: the
    same ranking as an untrained XGB model, without the xgboost import (~3 s) and the feature
    extraction and training of every round."""
    return "xgb" if trials >= _XGB_WARMUP else ms.cost_model.RandomModel()


def _search(name: str, trials: int):
    """The search strategy ``name``; ``auto``: replay below ``_XGB_WARMUP`` trials.

    Below that the cost model ranks at random, so the evolutionary search's population
    (sampled, mutated and post-processed each round: 12-14 s per 16-trial conv task here, a
    third of the task) picks no better candidates than replaying random samples (~0.5 s).
    """
    if name == "auto":
        name = "replay" if trials < _XGB_WARMUP else "evolutionary"
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


def tune(qgraph: fx.GraphModule, target: Any = "host", *, trials: int = 32,
         database: str | os.PathLike | None = None,
         example_inputs: Optional[Sequence[torch.Tensor]] = None,
         dynamic_batch: bool = False, batch: int = 1, kinds: Iterable[str] = DEFAULT_KINDS,
         trials_per_iter: Optional[int] = None, builder_timeout: float = 600.0,
         search: str = "auto", progress: bool = True, rpc: Optional[str] = None,
         session_timeout: float = 120.0) -> TuneResult:
    """Tune the distinct int8 kernels of ``qgraph`` for ``target`` into ``database``.

    Args:
        qgraph: The integer-operator graph (as for ``compile``).
        target: Must run on this machine (measurements are local), unless ``rpc`` names
            the devices that measure.
        trials: Measured candidates per kernel. The default 32 keeps a first tune of
            ResNet-18 (12 workloads) under 10 minutes on one loaded core: 16 trials took 204 s
            (~1 s per candidate, mostly its build), so 32 should take ~6-7 minutes and 64 ~12.
        database: Root folder of the databases (default ``DEFAULT_ROOT``); records go to the
            target's keyed subfolder (``database_dir``).
        example_inputs, dynamic_batch: As for ``compile``; shapes must be static to tune.
        batch: The batch size to tune for when the graph's batch is symbolic (the graphs
            ``ptqpasses.quantize`` makes) and no ``example_inputs`` are given;
            ``compile(database=...)`` without example inputs compiles for batch 1 too.
        kinds: Kernel kinds to tune (``ptq.kernel`` attribute values).
        trials_per_iter: Candidates per search round (default ``min(trials, 16)``).
        builder_timeout: Seconds per build (one builder worker; importing TVM in a worker is
            slow on a loaded core, and the default 30 s kills workers forever).
        search: ``evolutionary`` (cost-model guided), ``replay`` (random samples of the
            space: cheap per trial) or ``auto`` (replay below 100 trials per kernel, where the
            cost model has too few measurements to rank candidates).
        progress: tqdm bar per kernel.
        rpc: ``host:port:key``: build here, measure on the devices an RPC tracker lists
            under ``key`` (MetaSchedule's RPC runner; as many candidates at once as servers).
            Modules are linked here (a cross target with its strategy's cross compiler). The
            database stays local, keyed by ``target``.
        session_timeout: Seconds one remote measurement (upload, load, run) may take.

    Returns:
        A TuneResult; kernels with ``trials`` candidates in the database run zero trials,
        those with fewer (a run killed mid-way, a smaller ``trials`` before) the rest.

    Raises:
        DatabaseError: A foreign, truncated or corrupted database folder.
    """
    mod, named, specs = build_ir(qgraph, target, example_inputs=example_inputs,
                                 dynamic_batch=dynamic_batch, static_batch=batch)
    symbolic = [(i, s.shape) for i, s in enumerate(specs)
                if any(isinstance(d, str) for d in s.shape)]
    if symbolic:
        raise ValueError(f"tuning needs static shapes; input {symbolic[0][0]} has the shape "
                         f"{list(symbolic[0][1])}: pass example_inputs= of the shape to tune for")
    if rpc is None and not _targets.runs_here(named):
        raise ValueError(f"target {named.name!r} does not run on this machine; tuning measures "
                         "locally unless rpc='host:port:key' names devices that run it")
    if rpc is not None:
        from ptqpasses_backends.tvm.remote import RpcDevice

        rpc = RpcDevice.parse(rpc)
    folder = database_dir(database, named)
    with locked(folder, exclusive=True):  # one tuning run per folder at a time
        return _tune_locked(mod, named, folder, database, kinds, trials, trials_per_iter,
                            builder_timeout, search, progress, rpc, session_timeout)


def _tune_locked(mod, named, folder, database, kinds, trials, trials_per_iter, builder_timeout,
                 search, progress, rpc=None, session_timeout=120.0) -> TuneResult:
    tgt = named.target()
    db = open_database(database, named, lock=False)
    strat = strategy_for(named)
    todo = kernels(mod, kinds)
    results: list[TaskResult] = []
    pending = []
    for name, kind, wl in todo:
        variant = _variant(wl, strat)
        if variant.intrin is None:
            continue  # (a variant with no intrinsic to tile around: nothing to search)
        # a run killed mid-way resumes: a kernel's records are its seed (where the variant
        # has a template) plus the candidates measured so far, so it gets the trials it lacks
        done = max(_records(db, wl) - (variant.seed is not None), 0)
        if done >= trials:
            results.append(TaskResult(name, kind, 0, 0.0, _best_ms(db, wl, tgt)))
        else:
            pending.append((name, kind, wl, trials - done, done > 0))
    if not pending:
        return TuneResult(folder, results)

    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=10,
                                          enable_cpu_cache_flush=False)
    if rpc is None:
        builder = _Builder(builder_timeout)
        runner = ms.runner.LocalRunner(timeout_sec=max(60.0, builder_timeout / 4),
                                       f_run_evaluator=_MIN_OF_REPEATS,
                                       evaluator_config=evaluator)
        servers = 1
    else:
        runner, servers = _rpc_runner(rpc, evaluator, session_timeout)
        cross = strat.cross_compiler if not _targets.runs_here(named) else None
        if cross and shutil.which(cross) is None:
            raise RuntimeError(f"tuning {named.name!r} over RPC links each candidate here with "
                               f"{cross!r}, which is not on PATH (Debian/Ubuntu: apt-get "
                               f"install gcc-{cross.removesuffix('-gcc')})")
        builder = _Builder(builder_timeout, export=functools.partial(
            _EXPORT_SO, shutil.which(cross) if cross else None))
    # (a round measures as many candidates as there are devices, at least)
    per_iter = trials_per_iter or max(min(trials, 16), servers)
    try:
        with tempfile.TemporaryDirectory(prefix="ptq_tune_") as work_dir, \
                _no_tvm_intrin_registry():
            for name, kind, wl, left, resumed in pending:
                results.append(_tune_one(name, kind, wl, db, _variant(wl, strat), tgt,
                                         left, per_iter, search, builder, runner, work_dir,
                                         progress, seeded=resumed))
    finally:
        builder.close()
    return TuneResult(folder, results)


def _tune_one(name, kind, wl, db, variant, tgt, trials, per_iter, search, builder, runner,
              work_dir, progress, seeded=False) -> TaskResult:
    """Seed ``wl`` with the fixed template (unless a resumed run ``seeded`` it), then search
    ``trials`` candidates into ``db``; if a candidate beats the template, the template is
    measured once more."""
    from tqdm.auto import tqdm

    bar = tqdm(total=trials, desc=f"tune {name} ({kind})", disable=not progress, unit="trial",
               leave=True)
    counter = _Progress(bar)
    ctx = ms.TuneContext(
        mod=wl, target=tgt, space_generator=space(variant),
        search_strategy=_search(search, trials), task_name=name, num_threads=1)
    t0 = time.perf_counter()
    seed = None if seeded else _template_seed(wl, variant, kind, tgt, builder)
    seed_ms = seed.measure(db, runner, tgt) if seed is not None else None
    if seed_ms is not None:
        bar.set_postfix_str(f"template {seed_ms:.3f} ms")
    ms.tune.tune_tasks(
        tasks=[ctx], task_weights=[1.0], work_dir=work_dir, max_trials_global=trials,
        max_trials_per_task=trials, num_trials_per_iter=per_iter, builder=builder,
        runner=runner, database=db, cost_model=_cost_model(trials),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter],
        task_scheduler="round-robin")
    best = _best_ms(db, wl, tgt)
    if seed_ms is not None and best is not None and best < seed_ms:
        seed.measure(db, runner, tgt)  # the template again, at another moment, before it loses
        best = _best_ms(db, wl, tgt)
    if seed is not None:
        shutil.rmtree(os.path.dirname(seed.artifact), ignore_errors=True)
    secs = time.perf_counter() - t0
    bar.set_postfix_str(f"best {best:.3f} ms" if best is not None else "no valid record")
    bar.close()
    return TaskResult(name, kind, counter.count, secs, best)


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
