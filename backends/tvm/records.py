"""Tuning records: where they live, how they are keyed, and how one is applied to a kernel.

Database layout: ``root/<target name>-<key>/`` holds MetaSchedule's JSONDatabase
(``database_workload.json``, ``database_tuning_record.json``) and ``key.json``. The key hashes
the target dict (for ``host``: the real CPU name and its feature flags), the TVM, tvm-ffi and
LLVM versions, the record keying and :data:`SCHEMA`, so a record is never applied to another
CPU or toolchain.

Keying: within a folder a workload is the kernel's anchor block (MetaSchedule's
``module_equality="anchor-block"``: the ``acc`` reduction, its shapes, strides and operand
dtypes), not the whole PrimFunc. Convs of one shape differ in constants baked into their
``x_enc`` / ``out`` blocks (padding value, output zero point, clamp bounds, output dtype): with
structural keys ResNet-18 b1 had 20 workloads, with anchor keys 12. A record is applied by
replaying its trace on the kernel at hand (``tuned_kernel``), never by taking the recorded
kernel; TVM's schedule primitives check each step, so the replayed kernel computes exactly what
the emitted one does.

``tune.py`` writes records, ``pipeline.ApplyPtqSchedules`` reads them (neither imports the
other).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import tvm
from tvm.s_tir import meta_schedule as ms

from backends.tvm import targets as _targets
from backends.tvm.registry import strategy_for

#: Where ``tune`` keeps records when no ``database`` is given.
DEFAULT_ROOT = Path(os.environ.get("PTQ_TVM_TUNING_DB", "~/.cache/ptqpasses/tvm-tuning"))

#: How records are keyed within a database folder (MetaSchedule's ``module_equality``): by the
#: kernel's ``acc`` block, so that kernels differing only in epilogue constants share a record.
KEYING = "anchor-block"

#: Bumped when the computes or the template change so that old traces no longer replay (2:
#: the template's weight-block split, the strategies).
SCHEMA = 2


def versions() -> dict:
    """The toolchain versions a record depends on."""
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "llvm": int(tvm.target.codegen.llvm_version_major())}


def database_dir(root: str | os.PathLike | None, target: Any = "host") -> Path:
    """The folder of ``target``'s records under ``root`` (created, with its ``key.json``)."""
    named = _targets.resolve(target)
    root = Path(root if root is not None else DEFAULT_ROOT).expanduser()
    key = {"target": dict(named.spec), **versions(), "keying": KEYING, "schema": SCHEMA}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', named.name)}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    if not key_file.exists():
        key_file.write_text(json.dumps(key, indent=1, sort_keys=True, default=str) + "\n")
    return folder


def open_database(root: str | os.PathLike | None, target: Any = "host") -> ms.database.Database:
    """The JSONDatabase of ``target`` under ``root``.

    Loading replays each record's trace, so the project's tensor intrinsics the records may
    name are registered first (they are otherwise registered lazily, when a schedule uses
    them: a fresh process compiling with a database failed with "TensorIntrin ... is not
    registered").
    """
    named = _targets.resolve(target)
    for variant in strategy_for(named).variants:
        if variant.intrin is not None:
            variant.intrin()
    return ms.database.JSONDatabase(work_dir=str(database_dir(root, named)),
                                    module_equality=KEYING)


def workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The IRModule a kernel is tuned and looked up as (the same normalization both ways)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def tuned_kernel(db: ms.database.Database, func: tvm.tirx.PrimFunc,
                 target: tvm.target.Target) -> Optional[tvm.tirx.PrimFunc]:
    """``func`` scheduled by its best record in ``db``, or None if it has none.

    The record may have been tuned on another kernel with the same ``acc`` block (other zero
    points, clamp bounds or output dtype), so its trace is replayed on ``func`` itself
    (MetaSchedule's ``query_schedule`` would return the recorded kernel, constants included).
    The schedule primitives check every step (tensorization included), so a replayed kernel
    computes what ``func`` computes; a trace that does not fit ``func`` warns and returns None
    (the fixed schedule applies).
    """
    wl = workload(func)
    if not db.has_workload(wl):
        return None
    rec = db.query_tuning_record(wl, target=target, workload_name="main")
    if rec is None:
        return None
    from tvm import s_tir

    symbol = func.attrs.get("global_symbol") if func.attrs else None
    sch = s_tir.Schedule(wl)
    try:
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as exc:  # noqa: BLE001  (the fixed schedule applies instead)
        first = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
        warnings.warn(f"the tuned record of kernel {symbol} does not replay on it (fixed "
                      f"schedule used): {first[0]}")
        return None
    out = sch.mod["main"]
    out = out.with_attr("global_symbol", symbol) if symbol is not None else out.without_attr(
        "global_symbol")
    return out.with_attr("tir.is_scheduled", True).with_attr("ptq.tuned", True)
