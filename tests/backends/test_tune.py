"""Tuning smoke tests: small kernels, a few trials, into a temporary database.

Checks that compile applies the record (the kernel is marked ``ptq.tuned`` and stays bit-exact),
that a second ``tune`` of the same graph reuses the database (zero new trials) and a fresh
process loads it, and that kernels of one shape with other zero points / clamp bounds share
one record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tvm

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor, multipliers, weight


def _tune_target() -> str:
    """``host``, or where the host's strategy is AMX (whose tile kernels are hand-written TIR,
    not tuned) its AVX-512 VNNI strategy, which runs here and is tuned."""
    from ptqpasses_backends.tvm import registry, targets

    amx = registry.strategy_for(targets.resolve("host")).name == "x86-amx"
    return "x86-avx512-vnni" if amx else "host"


TARGET = _tune_target()


def _dense(both_variants: bool = False):
    """One dense on int8 ``x``; with ``both_variants`` also one on ``clamp(x, 0, 127)`` (the
    AVX2 pairwise variant)."""
    b = GraphBuilder()
    x = b.input("x")
    w = b.const(weight(2, (32, 64)))
    m = b.const(multipliers(3, 32, 0.01))
    y = b.call(P.linear.default, x, 3, w, None, m, -1, -128, 127, torch.int8)
    if both_variants:
        x7 = b.call(P.clamp.default, x, 0, 127)
        y = (y, b.call(P.linear.default, x7, 3, w, None, m, -1, -128, 127, torch.int8))
    return b.build(y), [int_tensor(4, (8, 64), torch.int8)]


# (x_zp, out_zp, qmin, qmax) of two convs of one shape: other padding values and epilogues
CONV_EPILOGUES = [(3, -1, -128, 127), (0, 5, -100, 100)]


def _convs(which):
    """One int8 conv2d (16 -> 32 channels, 3x3, 8x8 map) per entry of ``CONV_EPILOGUES`` picked
    by ``which``, all on the same input."""
    b = GraphBuilder()
    x = b.input("x")
    ys = []
    for i in which:
        x_zp, out_zp, qmin, qmax = CONV_EPILOGUES[i]
        w = b.const(weight(10 + i, (32, 16, 3, 3)))
        m = b.const(multipliers(20 + i, 32, 0.02))
        ys.append(b.call(P.conv2d.default, x, x_zp, w, None, [1, 1], [1, 1], [1, 1], 1, m,
                         out_zp, qmin, qmax, torch.int8))
    return b.build(tuple(ys) if len(ys) > 1 else ys[0]), [int_tensor(4, (1, 16, 8, 8),
                                                                     torch.int8)]


def _scheduled_kernels(gm, inputs, database, target=TARGET):
    """The graph's ptq kernels as ``compile(database=...)`` schedules them for ``target``."""
    from ptqpasses_backends.tvm.build import build_ir
    from ptqpasses_backends.tvm.pipeline import ApplyPtqSchedules
    from ptqpasses_backends.tvm.records import open_database
    from ptqpasses_backends.tvm.registry import strategy_for

    mod, named, _ = build_ir(gm, target, example_inputs=inputs, dynamic_batch=False)
    tgt = named.target()
    with tgt:
        out = ApplyPtqSchedules(strategy_for(named), tgt,
                                open_database(database, named))(mod)
    return [f for _, f in out.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs]


@pytest.mark.skipif(not host_has("avx2"), reason="tuning space uses the AVX2 / VNNI intrinsic")
def test_tune_applies_and_reuses_database(tvm_backend, tmp_path):
    gm, inputs = _dense(both_variants=True)
    db = tmp_path / "db"
    first = tvm_backend.tune(gm, TARGET, trials=2, database=db, example_inputs=inputs,
                             progress=False)
    # two workloads on AVX2 hosts without VNNI (int16 and pairwise layouts), else one
    pairwise = host_has("avx2") and not host_has("avx512vnni")
    assert [t.kind for t in first.tasks] == ["dense"] * (2 if pairwise else 1)
    assert all(t.trials > 0 for t in first.tasks)
    key = json.loads((first.database / "key.json").read_text())
    assert {"target", "tvm", "tvm_ffi", "llvm"} <= set(key)
    assert (first.database / "database_tuning_record.json").read_text().strip()

    kernels = _scheduled_kernels(gm, inputs, db)
    assert kernels
    for kernel in kernels:  # the records, not the fixed template, were applied
        assert "ptq.tuned" in kernel.attrs
    assert pairwise == any(k.attrs.get("ptq.variant") == "avx2-pairwise" for k in kernels)

    cm = tvm_backend.compile(gm, TARGET, example_inputs=inputs, database=db)
    assert_exact(cm(*inputs), gm(*inputs), "tuned dense")

    second = tvm_backend.tune(gm, TARGET, trials=2, database=db, example_inputs=inputs,
                              progress=False)
    assert second.trials == 0
    assert second.database == first.database

    # a fresh process (no intrinsic registered yet) loads the records
    code = ("import sys; from ptqpasses_backends.tvm.records import open_database; "
            "print(len(open_database(sys.argv[1], sys.argv[2])))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get(
        "PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(db), TARGET], capture_output=True,
                         text=True,
                         env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    records = (first.database / "database_tuning_record.json").read_text().split("\n")
    assert int(out.stdout.split()[-1]) == len([r for r in records if r.strip()])


@pytest.mark.skipif(not host_has("avx2") or host_has("avx512vnni"),
                    reason="the AVX2 template is the fixed schedule of AVX2 hosts without VNNI")
def test_avx2_template_is_exact_and_uses_vpmaddwd(tvm_backend):
    gm, inputs = _dense()
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), gm(*inputs), "AVX2 template dense")
    asm = cm.source("asm")
    assert "vpmaddwd" in asm
    assert "vpmaddubsw" not in asm  # saturates int16: not exact on full-range u8 x s8


@pytest.mark.skipif(not host_has("avx2"), reason="tuning space uses the AVX2 / VNNI intrinsic")
def test_equal_shapes_share_one_record(tvm_backend, tmp_path):
    import tvm_ffi

    from ptqpasses_backends.tvm.build import build_ir

    both, inputs = _convs([0, 1])
    mod, _, _ = build_ir(both, TARGET, example_inputs=inputs, dynamic_batch=False)
    convs = [f for _, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs]
    assert len(convs) == 2  # two kernels whose constants differ (two structural workloads)
    assert tvm_ffi.structural_hash(convs[0]) != tvm_ffi.structural_hash(convs[1])

    db = tmp_path / "db"
    first = tvm_backend.tune(_convs([0])[0], TARGET, trials=2, database=db,
                             example_inputs=inputs, progress=False)
    assert [t.trials > 0 for t in first.tasks] == [True]
    second = tvm_backend.tune(_convs([1])[0], TARGET, trials=2, database=db,
                              example_inputs=inputs, progress=False)
    assert [t.trials for t in second.tasks] == [0]  # the first conv's record
    assert len(tvm_backend.tune(both, TARGET, trials=2, database=db, example_inputs=inputs,
                                progress=False).tasks) == 1

    kernels = _scheduled_kernels(both, inputs, db)
    assert len(kernels) == 2 and all("ptq.tuned" in k.attrs for k in kernels)
    cm = tvm_backend.compile(both, TARGET, example_inputs=inputs, database=db)
    want = both(*inputs)
    assert all(len(torch.unique(y)) > 16 for y in want)  # epilogues not saturated
    assert_exact(cm(*inputs), want, "two convs tuned by one record")


@pytest.mark.skipif(not host_has("avx2"), reason="tuning space uses the AVX2 / VNNI intrinsic")
def test_public_flow_on_a_quantized_model_with_dynamic_batch(tvm_backend, tmp_path):
    """``quantize -> tune (2 trials) -> compile -> save -> load in a fresh process`` on the
    graph users get (a symbolic batch, no example inputs): tuning runs at batch 1 (it failed
    in the template seed with ``Cannot convert from type Array[ir.Var] to Array<IntImm>``),
    compile applies the records at batch 1, the saved module loads and stays bit-exact."""
    import ptqpasses
    from ptqpasses_tools.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    calib = [(torch.randn(4, 1, 8, 8),) for _ in range(2)]
    qgraph = ptqpasses.quantize(model, calib[0], calib, progress=False)
    first = tvm_backend.tune(qgraph, "host", trials=2, database=tmp_path / "db",
                             progress=False)
    assert first.tasks and all(t.trials > 0 or t.best_ms is not None for t in first.tasks)
    cm = tvm_backend.compile(qgraph, "host", database=tmp_path / "db")
    assert cm.meta["inputs"][0]["shape"][0] == 1
    x = torch.randn(1, 1, 8, 8)
    assert_exact(cm(x), qgraph(x), "tuned, batch 1")
    cm.save(tmp_path / "m")
    torch.save({"x": x, "y": qgraph(x)}, tmp_path / "io.pt")
    code = ("import sys, torch, ptqpasses_backends.tvm as bt; io = torch.load(sys.argv[1]); "
            "assert torch.equal(bt.load(sys.argv[2])(io['x']), io['y']); print('OK')")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root)] + sys.path)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "io.pt"),
                          str(tmp_path / "m")], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
    with pytest.raises(ValueError, match="static shapes"):
        tvm_backend.tune(qgraph, "host", trials=1, database=tmp_path / "db", batch=None,
                         progress=False)
