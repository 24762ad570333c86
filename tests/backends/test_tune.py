"""Tuning smoke test: one small kernel, a few trials, into a temporary database.

Checks that compile applies the record (the kernel is marked ``ptq.tuned`` and stays bit-exact)
and that a second ``tune`` of the same graph reuses the database (zero new trials).
"""

from __future__ import annotations

import json

import pytest
import torch
import tvm

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor, multipliers, weight


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


def _scheduled_kernels(gm, inputs, database):
    from backends.tvm import family, targets
    from backends.tvm.compile import build_ir
    from backends.tvm.pipeline import ApplyPtqSchedules
    from backends.tvm.tune import open_database

    mod, named, _ = build_ir(gm, "host", example_inputs=inputs, dynamic_batch=False)
    tgt = named.target()
    with tgt:
        out = ApplyPtqSchedules(family.get_family(named.family, tgt), tgt,
                                open_database(database, named))(mod)
    return [f for _, f in out.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs]


@pytest.mark.skipif(not host_has("avx2"), reason="tuning space uses the AVX2 / VNNI intrinsic")
def test_tune_applies_and_reuses_database(tvm_backend, tmp_path):
    gm, inputs = _dense(both_variants=True)
    db = tmp_path / "db"
    first = tvm_backend.tune(gm, "host", trials=2, database=db, example_inputs=inputs,
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

    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, database=db)
    assert_exact(cm(*inputs), gm(*inputs), "tuned dense")

    second = tvm_backend.tune(gm, "host", trials=2, database=db, example_inputs=inputs,
                              progress=False)
    assert second.trials == 0
    assert second.database == first.database


@pytest.mark.skipif(not host_has("avx2") or host_has("avx512vnni"),
                    reason="the AVX2 template is the fixed schedule of AVX2 hosts without VNNI")
def test_avx2_template_is_exact_and_uses_vpmaddwd(tvm_backend):
    gm, inputs = _dense()
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert_exact(cm(*inputs), gm(*inputs), "AVX2 template dense")
    asm = cm.source("asm")
    assert "vpmaddwd" in asm
    assert "vpmaddubsw" not in asm  # saturates int16: not exact on full-range u8 x s8
