"""Tuning databases under faults: foreign, corrupted and truncated folders give clear errors
(nothing loaded half-way), a torn last line from a killed run is dropped with a warning, two
processes tuning into one folder take turns without losing records, and a killed run resumes
from its records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptqpasses_backends.tvm.records import DatabaseError, open_database
from tests.backends.conftest import assert_exact, host_has
from tests.backends.test_tune import TARGET, _dense

pytestmark = pytest.mark.skipif(not host_has("avx2"),
                                reason="tuning space uses the AVX2 / VNNI intrinsic")

ROOT = Path(__file__).resolve().parents[2]
RECORDS = "database_tuning_record.json"


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().split("\n") if ln.strip()]


@pytest.fixture(scope="module")
def tuned(tvm_backend, tmp_path_factory):
    gm, inputs = _dense()
    root = tmp_path_factory.mktemp("db")
    result = tvm_backend.tune(gm, TARGET, trials=2, database=root, example_inputs=inputs,
                              progress=False)
    return root, result.database


def _copy(tuned, tmp_path) -> tuple[Path, Path]:
    root, folder = tuned
    shutil.copytree(root, tmp_path / "db")
    return tmp_path / "db", tmp_path / "db" / folder.name


def test_foreign_folder_is_refused(tuned, tmp_path):
    root, folder = _copy(tuned, tmp_path)
    key = json.loads((folder / "key.json").read_text())
    # a folder copied from another machine under this name (any CPU but this one's)
    key["target"]["mcpu"] = "znver4" if key["target"].get("mcpu") != "znver4" else "znver3"
    (folder / "key.json").write_text(json.dumps(key))
    with pytest.raises(DatabaseError, match=r"another target or toolchain .*\['target'\]"):
        open_database(root, TARGET)


def test_corrupted_record_is_refused_naming_the_line(tuned, tmp_path):
    root, folder = _copy(tuned, tmp_path)
    lines = _lines(folder / RECORDS)
    assert len(lines) >= 2
    lines[0] = lines[0][: len(lines[0]) // 2] + "#garbage#"
    (folder / RECORDS).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatabaseError, match=f"{RECORDS} line 1 is not a MetaSchedule record"):
        open_database(root, TARGET)


def test_record_tvm_cannot_read_is_refused(tuned, tmp_path):
    root, folder = _copy(tuned, tmp_path)
    (folder / "database_workload.json").write_text("")  # records now name no workload
    with pytest.raises(DatabaseError, match="TVM could not load the tuning records"):
        open_database(root, TARGET)


def test_torn_last_line_is_dropped_with_a_warning(tuned, tmp_path):
    root, folder = _copy(tuned, tmp_path)
    n = len(_lines(folder / RECORDS))
    with open(folder / RECORDS, "a") as f:
        f.write(_lines(folder / RECORDS)[0][:40])  # an append cut short: no newline
    with pytest.warns(UserWarning, match="dropped a last line cut short"):
        db = open_database(root, TARGET)
    assert len(db) == n and len(_lines(folder / RECORDS)) == n


def _tune_script(db: Path, trials: int, kill_after: int = 0) -> str:
    """A process tuning ``_dense`` into ``db``; ``kill_after`` > 0 SIGKILLs itself once that
    many candidates were measured (records of a round are committed before the callback)."""
    return textwrap.dedent(f"""
        import os, signal, json, sys
        import ptqpasses_backends.tvm.tune
        t = sys.modules["ptqpasses_backends.tvm.tune"]  # (the package's `tune` is the function)
        from tests.backends.test_tune import TARGET, _dense
        if {kill_after}:
            @t.derived_object
            class Dying(t.ms.measure_callback.PyMeasureCallback):
                def __init__(self, bar):
                    super().__init__()
                    self.count = 0
                def apply(self, scheduler, task_id, candidates, *results):
                    self.count += len(candidates)
                    if self.count >= {kill_after}:
                        os.kill(os.getpid(), signal.SIGKILL)
            t._Progress = Dying
        gm, inputs = _dense()
        r = t.tune(gm, TARGET, trials={trials}, trials_per_iter=2, database={str(db)!r},
                   example_inputs=inputs, progress=False)
        print(json.dumps([task.trials for task in r.tasks]))
    """)


def _run(script: str, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_two_processes_tuning_one_folder_take_turns(tmp_path):
    db = tmp_path / "db"
    procs = [_run(_tune_script(db, trials=2)) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    trials = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert trials == [[0], [2]]  # the second waited, then found the first's records
    (folder,) = [f for f in db.iterdir() if f.is_dir()]
    lines = _lines(folder / RECORDS)
    assert len(open_database(db, TARGET)) == len(lines) >= 3  # seed + 2, none lost


def test_killed_tuning_run_resumes_from_its_records(tvm_backend, tmp_path):
    db = tmp_path / "db"
    killed = _run(_tune_script(db, trials=4, kill_after=2))
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -9, err[-2000:]
    (folder,) = [f for f in db.iterdir() if f.is_dir()]
    before = len(_lines(folder / RECORDS))
    assert before >= 3  # the seed and the first round
    gm, inputs = _dense()
    result = tvm_backend.tune(gm, TARGET, trials=4, trials_per_iter=2, database=db,
                              example_inputs=inputs, progress=False)
    assert [t.trials for t in result.tasks] == [4 - (before - 1)]
    again = tvm_backend.tune(gm, TARGET, trials=4, database=db, example_inputs=inputs,
                             progress=False)
    assert again.trials == 0
    cm = tvm_backend.compile(gm, TARGET, example_inputs=inputs, database=db)
    assert_exact(cm(*inputs), gm(*inputs), "resumed tuning")
