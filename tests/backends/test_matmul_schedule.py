"""The CPU schedules of ``ptq.matmul`` (``backends/tvm/cpu/matmul.py``): the plain register
tile (every LLVM target) and, for 8-bit operands on x86 AVX2, the per-call packed form on the
dense template. Bit-exact on tile-sized and odd shapes, broadcast and dynamic batches, every
operand dtype; applied (parallel + vectorized loops, the expected vector multiplies in the
assembly); tuned records win."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir, te
from tvm.s_tir import meta_schedule as ms

from ptqpasses_backends.tvm import registry, targets
from ptqpasses_backends.tvm.kernels import matmul as matmul_k
from ptqpasses_backends.tvm.cpu.matmul import is_packed, schedule_matmul
from ptqpasses_backends.tvm.pipeline import ApplyPtqSchedules
from tests.backends.conftest import P, GraphBuilder, assert_exact, kernel_probe
from tests.backends.strategies import int_tensor
from tests.backends.test_codegen import _kernel_asm


def _matmuls(cases):
    """One graph of independent ``ptq.matmul`` s: ``(a, b, a_zp, b_zp, out dtype)`` tensors."""
    b, outs, inputs = GraphBuilder(), [], []
    for i, (ta, tb, azp, bzp, odt) in enumerate(cases):
        xa, xb = b.input(f"a{i}"), b.input(f"b{i}")
        lo, hi = (0, 255) if odt == torch.uint8 else (-128, 127)
        outs.append(b.call(P.matmul.default, xa, azp, xb, bzp, 0.003 / (i + 1), 5, lo, hi, odt))
        inputs += [ta, tb]
    return b.build(tuple(outs)), inputs


def _int16(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-32768, 32768, shape, generator=g, dtype=torch.int16)


def _te_target() -> str:
    """The host, or where the host's family runs 8-bit matmuls as a hand-written kernel
    (AMX tiles: ``test_amx.py``), the family it falls back to for small shapes, which
    runs here too: the TE computes and schedules this file tests."""
    strategy = registry.strategy_for(targets.resolve("host").target())
    return "x86-avx512-vnni" if strategy.kernel("matmul") is not None else "host"


def _host_packs() -> bool:
    """Whether the tested family emits 8-bit matmuls in the packed form (x86 AVX2)."""
    target = targets.resolve(_te_target()).target()
    return registry.strategy_for(target).matmul_block is not None


def test_dynamic_batch_matmuls_are_scheduled_and_exact(tvm_backend):
    """A symbolic leading dim (shared by every input): MiniLM's attention shapes, odd M / N /
    K, and a 2-D operand whose rows are the symbolic dim (rows per tile fall back to 1)."""
    i8, u8 = torch.int8, torch.uint8
    gm, inputs = _matmuls([
        (int_tensor(0, (2, 12, 128, 32), i8), int_tensor(1, (2, 12, 32, 128), i8), 3, -2, i8),
        (int_tensor(2, (2, 3, 128, 128), u8), int_tensor(3, (2, 3, 128, 32), i8), 0, 1, u8),
        (int_tensor(4, (2, 7, 5), u8), int_tensor(5, (2, 5, 9), u8), 131, 77, i8),
        (int_tensor(6, (2, 37), i8), int_tensor(7, (2, 37, 24), u8), -7, 200, i8),
    ])
    seen = {}
    cm = tvm_backend.compile(gm, _te_target(), example_inputs=inputs, dynamic_batch=True,
                             relax_passes={"after_schedule": kernel_probe("matmul", seen)})
    assert_exact(cm(*inputs), gm(*inputs), "dynamic batch")
    small = [t[:1] for t in inputs]  # another batch size through the same module
    assert_exact(cm(*small), gm(*small), "dynamic batch, batch 1")
    assert len(seen) == 4
    for name, f in seen.items():
        assert "tir.is_scheduled" in f.attrs, name
        text = f.script()
        assert "T.parallel(" in text, name
    assert all(is_packed(f) == _host_packs() for f in seen.values())
    # the tile of the MiniLM-shaped kernels: 4 unrolled rows x 16 vector lanes
    assert sum("T.vectorized(T.int64(16))" in f.script() for f in seen.values()) >= 2


def test_broadcast_batches_odd_tiles_and_int16_are_exact(tvm_backend):
    """Static shapes: broadcast batch dims, M / N not multiples of the 4 x 16 tile, and int16
    operands (summed in int64: same tiling, 64-bit lanes)."""
    i8, u8 = torch.int8, torch.uint8
    gm, inputs = _matmuls([
        (int_tensor(0, (3, 1, 6, 33), i8), int_tensor(1, (2, 33, 24), i8), -128, 127, i8),
        (int_tensor(2, (5, 7), u8), int_tensor(3, (2, 7, 40), u8), 255, 0, u8),
        (int_tensor(4, (2, 1, 9, 3), i8), int_tensor(5, (1, 4, 3, 17), u8), 1, 128, i8),
        (_int16(6, (2, 6, 11)), _int16(7, (2, 11, 16)), -32768, 5, i8),
    ])
    seen = {}
    cm = tvm_backend.compile(gm, _te_target(), example_inputs=inputs, dynamic_batch=False,
                             relax_passes={"after_schedule": kernel_probe("matmul", seen)})
    assert_exact(cm(*inputs), gm(*inputs), "static shapes")
    assert len(seen) == 4 and all("tir.is_scheduled" in f.attrs for f in seen.values())
    assert any('"int64"' in f.script() for f in seen.values())  # the int16 kernel
    assert sum(is_packed(f) for f in seen.values()) == (3 if _host_packs() else 0)


def test_assembly_has_vector_integer_multiplies(tvm_backend):
    """x86 AVX2: the packed form on ``vpmaddwd``; AVX-512 VNNI: the packed form on
    ``vpdpwssd`` (zmm); aarch64 NEON (built, not run here) the plain tile: 32-bit lane
    multiplies on whole vector registers."""
    gm, inputs = _matmuls([(int_tensor(0, (1, 4, 16, 8), torch.int8),
                            int_tensor(1, (1, 4, 8, 32), torch.int8), 3, -2, torch.int8)])
    asm = tvm_backend.compile(gm, "x86-avx2", example_inputs=inputs).source("asm")
    body = _kernel_asm(asm, "ptq_matmul")
    assert "vpmaddwd" in body and "vpmulld" not in body
    # the intrinsic's operands stay in registers (no store per call; see avx2.wide_impl)
    assert not re.search(r"vmovdq[au]\s+%ymm\d+, \(%r\w+\)\n", body)
    asm = tvm_backend.compile(gm, "x86-avx512-vnni", example_inputs=inputs).source("asm")
    body = _kernel_asm(asm, "ptq_matmul")
    assert re.search(r"vpdpwssd\s+[^\n]*%zmm", body) and "vpmulld" not in body
    asm = tvm_backend.compile(gm, "aarch64-neon", example_inputs=inputs).source("asm")
    assert re.search(r"\bmul\s+v\d+\.4s", asm)


@pytest.mark.parametrize("a_shape,b_shape,a_dt,b_dt", [
    ((2, 12, 16, 32), (2, 12, 32, 48), torch.int8, torch.int8),  # whole 4 x 16 tiles
    ((3, 1, 7, 5), (2, 5, 9), torch.uint8, torch.int8),  # broadcast batch, odd M / N / K
    ((6, 37), (37, 24), torch.uint8, torch.uint8),  # no batch, N a multiple of 8 only
])
def test_plain_schedule_is_exact(a_shape, b_shape, a_dt, b_dt):
    """The plain tile on 8-bit operands, run here (this host's AVX2 family emits the packed
    form instead): the kernel built alone and compared with the reference op."""
    a = te.placeholder(a_shape, str(a_dt).replace("torch.", ""), name="a")
    b = te.placeholder(b_shape, str(b_dt).replace("torch.", ""), name="b")
    out = matmul_k.matmul(a, b, a_zp=7, b_zp=-3 if b_dt == torch.int8 else 140,
                          multiplier=0.004, out_zp=2, qmin=-128, qmax=127, out_dtype="int8")
    func = schedule_matmul(te.create_prim_func([a, b, out]))
    assert "tir.is_scheduled" in func.attrs and "T.parallel(" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=targets.resolve("host").target())
    ta, tb = int_tensor(0, a_shape, a_dt), int_tensor(1, b_shape, b_dt)
    got = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], "int8"))
    lib["main"](tvm.runtime.tensor(ta.numpy()), tvm.runtime.tensor(tb.numpy()), got)
    want = P.matmul.default(ta, 7, tb, -3 if b_dt == torch.int8 else 140, 0.004, 2, -128, 127,
                            torch.int8)
    assert_exact(torch.from_numpy(got.numpy()), want, f"plain {a_shape} x {b_shape}")


def test_tuned_record_wins_over_the_matmul_schedule(tvm_backend):
    from ptqpasses_backends.tvm.records import workload

    gm, inputs = _matmuls([(int_tensor(0, (1, 2, 8, 4), torch.int8),
                            int_tensor(1, (1, 2, 4, 8), torch.int8), 0, 0, torch.int8)])
    mod, named, _ = tvm_backend.build_ir(gm, "host", example_inputs=inputs)
    target = named.target()
    fam = registry.strategy_for(named)
    (gv, func), = [(gv, f) for gv, f in mod.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs]
    # a "tuned" record: the workload with only its output loops parallelized
    wl = workload(func)
    sch = s_tir.Schedule(wl, debug_mask="all", enable_check=False)
    sch.parallel(sch.get_loops(sch.get_sblock("out"))[0])
    db = ms.database.MemoryDatabase()
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(wl),
                                                     [0.001], target))
    with target:  # (each on a module of its own: the pass updates the module it is given)
        tuned = ApplyPtqSchedules(fam, target, db)(tvm.IRModule({gv: func}))[gv]
        fixed = ApplyPtqSchedules(fam, target)(tvm.IRModule({gv: func}))[gv]
    assert "ptq.tuned" in tuned.attrs and "ptq.tuned" not in fixed.attrs
    assert "tir.is_scheduled" in fixed.attrs and "T.parallel(" in fixed.script()
