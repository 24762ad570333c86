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

Safety: a folder is locked (``flock`` on ``.lock``) exclusively while ``tune`` writes it and
shared while a database is loaded, so two processes tuning into one folder take turns (the
second skips what the first tuned: no lost or interleaved records). Loading checks the key and
that every line is JSON before TVM reads the files: a foreign, truncated or corrupted folder
raises ``DatabaseError`` naming the file and line. The one repair: a last line without its
newline (an append cut short by a killed ``tune``) is dropped with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import tvm
from tvm.s_tir import meta_schedule as ms

from ptqpasses_backends.tvm import targets as _targets
from ptqpasses_backends.tvm.registry import strategy_for

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


class DatabaseError(RuntimeError):
    """A tuning database folder that cannot be used (foreign, truncated or corrupted)."""


FILES = ("database_workload.json", "database_tuning_record.json")


def database_dir(root: str | os.PathLike | None, target: Any = "host") -> Path:
    """The folder of ``target``'s records under ``root`` (created, with its ``key.json``).

    Raises:
        DatabaseError: The folder's ``key.json`` names another target or toolchain (a folder
            copied or renamed by hand).
    """
    named = _targets.resolve(target)
    root = Path(root if root is not None else DEFAULT_ROOT).expanduser()
    key = json.loads(json.dumps({"target": dict(named.spec), **versions(), "keying": KEYING,
                                 "schema": SCHEMA}, default=str))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', named.name)}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    if not key_file.exists():
        from ptqpasses.files import atomic_write_text

        atomic_write_text(key_file, json.dumps(key, indent=1, sort_keys=True) + "\n")
    else:
        try:
            found = json.loads(key_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatabaseError(f"{key_file} is corrupted ({e}); delete the folder "
                                f"{folder} to tune again") from None
        if found != key:
            diff = sorted(k for k in set(key) | set(found) if key.get(k) != found.get(k))
            raise DatabaseError(f"{folder} holds records of another target or toolchain "
                                f"(key.json differs in {diff}); it was copied or renamed by "
                                "hand: move it away")
    return folder


@contextlib.contextmanager
def locked(folder: Path, exclusive: bool):
    """``flock`` of ``folder/.lock``: exclusive while writing records, shared while loading.
    Waits for the holder (one tuning run at a time per folder)."""
    with open(folder / ".lock", "a+") as f:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"waiting for another process tuning into {folder}")
            fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_lines(path: Path) -> None:
    """Every line of a JSONDatabase file parses as a JSON list; a torn last line (no newline:
    an append cut short) is dropped with a warning; anything else raises DatabaseError."""
    if not path.exists():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] if lines[-1].strip() else b""
    for i, line in enumerate(lines[:-1]):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), list)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise DatabaseError(f"{path} line {i + 1} is not a MetaSchedule record (corrupted); "
                                f"delete the folder {path.parent} to tune again")
    if torn:
        warnings.warn(f"{path}: dropped a last line cut short ({len(torn)} bytes; a tuning run "
                      "was killed while writing it)")
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))


def open_database(root: str | os.PathLike | None, target: Any = "host", *,
                  lock: bool = True) -> ms.database.Database:
    """The JSONDatabase of ``target`` under ``root``, loaded under a shared lock (``lock``:
    False where the caller holds the folder's exclusive lock).

    Loading replays each record's trace, so the project's tensor intrinsics the records may
    name are registered first (they are otherwise registered lazily, when a schedule uses
    them: a fresh process compiling with a database failed with "TensorIntrin ... is not
    registered").

    Raises:
        DatabaseError: A foreign, truncated or corrupted folder (see the module docstring).
    """
    named = _targets.resolve(target)
    for variant in strategy_for(named).variants:
        if variant.intrin is not None:
            variant.intrin()
    folder = database_dir(root, named)
    with locked(folder, exclusive=False) if lock else contextlib.nullcontext():
        for name in FILES:
            _check_lines(folder / name)
        try:
            return ms.database.JSONDatabase(work_dir=str(folder), module_equality=KEYING)
        except Exception as e:  # noqa: BLE001  (TVM raises RuntimeError / TVMError)
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise DatabaseError(f"TVM could not load the tuning records in {folder}: {first}; "
                                "delete the folder to tune again") from None


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
