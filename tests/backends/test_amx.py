"""The AMX strategy (``backends/tvm/amx``): tile kernels for dense / conv2d, bit-exact against
the reference through the public flow, the VNNI template for shapes too small for tiles.

Code generation is checked on any x86 machine (``x86-amx`` cross-builds: ``tdpbusd``,
``tileloadd``, ``ldtilecfg`` in the assembly); the numerics run where the CPU has the
``amx_int8`` / ``amx_tile`` flags (one and two threads: every pool task configures its tiles).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import tvm

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor, multipliers, weight

I8, U8 = torch.int8, torch.uint8
HAS_AMX = host_has("amx-int8") and host_has("amx-tile")

#: (c, h, w, o, k, stride, pad, dil, in dtype, x_zp, out dtype, out_zp, bias) — the stem
#: (C=3: (s, c) folded), 3x3 on 14..7 maps (row tiles, the flat pixel grid), stride 2, 1x1
#: (im2col), dilation, odd sizes and channel counts, reductions shallower than a tile.
CONVS = [
    (3, 32, 30, 64, 7, 2, 3, 1, I8, -3, I8, 0, True),
    (64, 14, 14, 64, 3, 1, 1, 1, U8, 130, I8, -2, True),
    (64, 16, 15, 128, 3, 2, 1, 1, I8, 5, U8, 7, False),
    (64, 12, 12, 128, 1, 2, 0, 1, I8, 0, I8, 1, True),
    (96, 7, 7, 80, 3, 1, 1, 1, U8, 0, U8, 3, True),
    (70, 17, 19, 24, 3, 1, 2, 2, U8, 200, I8, 0, True),
    (128, 7, 7, 1000, 1, 1, 0, 1, U8, 9, I8, -5, False),
    # shallow reductions (MobileNetV2's expand convs: 16, 24 channels), zero-padded to 64
    (16, 12, 12, 96, 1, 1, 0, 1, U8, 3, I8, 0, True),
    (24, 9, 9, 32, 1, 1, 0, 1, I8, -7, U8, 2, True),
    # a float output (float32(acc) * m: the cost policy's conv before a float op)
    (64, 10, 10, 48, 3, 1, 1, 1, U8, 17, torch.float32, 0, True),
]
#: (shape after the batch, k, n, in dtype, x_zp, out dtype, out_zp)
DENSES = [((512,), 512, 1000, I8, 2, I8, 0), ((37, 147), 147, 64, U8, 100, U8, 3),
          ((64, 768), 768, 768, I8, -1, I8, 2), ((16, 64), 64, 16, U8, 0, I8, 0),
          ((20, 20), 20, 48, I8, 4, I8, -1), ((6, 96), 96, 40, U8, 9, torch.float32, 0)]


def _graph(convs=CONVS, denses=DENSES, batch: int = 1, seed: int = 0):
    b, outs, inputs = GraphBuilder(), [], []
    for i, (c, h, w, o, k, s, p, d, dt, xzp, odt, ozp, bias) in enumerate(convs):
        x = b.input(f"conv_in{i}")
        lo, hi = {I8: (-128, 127), U8: (0, 255)}.get(odt, (0, 0))
        bias_c = b.const(torch.randint(-20000, 20000, (o,), dtype=torch.int32,
                                       generator=torch.Generator().manual_seed(i))) \
            if bias else None
        outs.append(b.call(P.conv2d.default, x, xzp, b.const(weight(i, (o, c, k, k))), bias_c,
                           [s, s], [p, p], [d, d], 1,
                           b.const(multipliers(i + 50, o, 0.02 / (c * k * k) ** 0.5)), ozp,
                           max(lo, ozp) if i % 2 else lo, hi, odt))
        inputs.append(int_tensor(seed + i, (batch, c, h, w), dt))
    for i, (shape, k, n_out, dt, xzp, odt, ozp) in enumerate(denses):
        x = b.input(f"dense_in{i}")
        lo, hi = {I8: (-128, 127), U8: (0, 255)}.get(odt, (0, 0))
        bias_c = b.const(torch.randint(-9000, 9000, (n_out,), dtype=torch.int32,
                                       generator=torch.Generator().manual_seed(i)))
        outs.append(b.call(P.linear.default, x, xzp, b.const(weight(100 + i, (n_out, k))),
                           bias_c, b.const(multipliers(i + 150, n_out, 0.02 / k ** 0.5)), ozp,
                           lo, hi, odt))
        inputs.append(int_tensor(seed + 100 + i, (batch, *shape), dt))
    return b.build(tuple(outs)), inputs


@contextlib.contextmanager
def _pool(threads: int):
    """TVM's thread pool at ``threads`` for the block, one thread after."""
    pool = tvm.get_global_func("runtime.config_threadpool")
    pool(0, threads)
    try:
        yield
    finally:
        pool(0, 1)


def _variants(cm) -> dict:
    return {name: v[0] for name, v in cm.meta["variants"].items()}


def test_amx_code_is_generated_for_the_amx_target(tvm_backend):
    """Cross-built for ``x86-amx`` on any x86 machine: every large kernel runs on tiles, the
    small one (1 row, static shapes) on the VNNI template, and the reason is recorded."""
    gm, inputs = _graph(CONVS[:2], DENSES[:2])
    mod = tvm_backend.emit(gm, "x86-amx", example_inputs=inputs, dynamic_batch=False)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs}
    variants = sorted(str(f.attrs.get("ptq.variant", "")) for f in kernels.values())
    assert variants == ["", "amx", "amx", "amx"], variants  # the 1-row dense: VNNI
    cm = tvm_backend.compile(gm, "x86-amx", example_inputs=inputs, dynamic_batch=False)
    assert cm.meta["strategy"] == "x86-amx"
    why = cm.meta["variants"]["linear_default"]
    assert why[0] == "main" and "rows" in why[1], why
    asm = cm.source("asm")
    for instruction in ("tdpbusd", "tileloadd", "ldtilecfg", "tilestored", "tilerelease"):
        assert re.search(rf"\b{instruction}\b", asm), instruction
    # every tile kernel asks Linux for the tile state itself (arch_prctl through syscall)
    assert len(re.findall(r"call\w*\s+\*?syscall\b", asm)) >= 3, "no arch_prctl in the kernels"


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX (amx_int8 / amx_tile flags)")
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_kernels_are_exact_with_dynamic_batch(tvm_backend, threads):
    gm, inputs = _graph(batch=2)
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=True)
    assert cm.meta["strategy"] == "x86-amx"
    # (with a symbolic batch every GEMM may be large: all on tiles)
    assert list(_variants(cm).values()).count("amx") == len(CONVS) + len(DENSES)
    with _pool(threads):
        assert_exact(cm(*inputs), gm(*inputs), f"AMX, {threads} thread(s)")
        other = _graph(batch=3, seed=7)[1]
        assert_exact(cm(*other), gm(*other), "AMX, another batch size")


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX (amx_int8 / amx_tile flags)")
def test_amx_module_saves_and_loads(tvm_backend, tmp_path):
    """A fresh process loading the module asks for the tile state itself (else SIGILL)."""
    import subprocess
    import sys
    from pathlib import Path

    gm, inputs = _graph(CONVS[1:2], DENSES[2:3])
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs)
    cm.save(tmp_path / "m")
    torch.save({"inputs": inputs, "want": gm(*inputs)}, tmp_path / "io.pt")
    code = ("import sys, torch; import ptqpasses_backends.tvm as bt; d = torch.load(sys.argv[2]); "
            "got = bt.load(sys.argv[1])(*d['inputs']); "
            "print(all(torch.equal(g, w) for g, w in zip(got, d['want'])))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"),
                          str(tmp_path / "io.pt")], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX (amx_int8 / amx_tile flags)")
def test_amx_module_runs_in_a_process_that_never_asked_for_tiles(tvm_backend, tmp_path):
    """The saved library run by plain TVM (``load_module`` + Relax VM, no ptqpasses, no
    permission asked), as a TVM RPC server or a C++ host would: the kernels ask for the tile
    state themselves (it was a SIGILL before)."""
    import subprocess
    import sys

    import numpy as np

    gm, inputs = _graph(CONVS[1:2], DENSES[2:3])
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert "amx" in _variants(cm).values()
    cm.save(tmp_path / "m")
    for i, (x, y) in enumerate(zip(inputs, gm(*inputs))):
        np.save(tmp_path / f"x{i}.npy", x.numpy())
        np.save(tmp_path / f"y{i}.npy", y.numpy())
    code = (
        "import sys, numpy as np, tvm; from tvm import relax; d = sys.argv[1]; "
        "vm = relax.VirtualMachine(tvm.runtime.load_module(d + '/m.so'), tvm.cpu()); "
        f"xs = [tvm.runtime.tensor(np.load(f'{{d}}/x{{i}}.npy')) for i in range({len(inputs)})]; "
        "out = vm['main'](*xs); "
        "print(all(np.array_equal(o.numpy(), np.load(f'{d}/y{i}.npy')) "
        "for i, o in enumerate(out)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().endswith("True")


def _residual_graph(relu: bool):
    """conv -> add(residual) as in a ResNet block: the conv's only consumer is the add; a
    second add whose conv has another consumer too (not fusable); a residual that is itself
    a later conv (the downsample branch, emitted after the add's first operand)."""
    b = GraphBuilder()
    x = b.input("x")  # int8 [B, 64, 10, 10]
    r = b.input("r")  # uint8 [B, 48, 10, 10]

    def conv(inp, i, c, o, zp, k=3, p=1):
        return b.call(P.conv2d.default, inp, zp, b.const(weight(200 + i, (o, c, k, k))),
                      None, [1, 1], [p, p], [1, 1], 1,
                      b.const(multipliers(300 + i, o, 0.02 / (c * k * k) ** 0.5)), -3,
                      -128, 127, I8)

    y1 = conv(x, 0, 64, 48, 2)
    down = conv(x, 1, 64, 48, 2, k=1, p=0)
    lo = 5 if relu else -128  # (a fused ReLU: qmin = out_zp)
    s1 = b.call(P.add.default, y1, -3, 9000, down, -3, 16384, 1.3e-4, 5, lo, 127, I8)
    y2 = conv(x, 2, 64, 48, 2)
    s2 = b.call(P.add.default, r, 128, 16384, y2, -3, 7000, 2.1e-4, -1, -128, 127, I8)
    return b.build((s1, s2, y2)), [int_tensor(0, (2, 64, 10, 10), I8),
                                  int_tensor(1, (2, 48, 10, 10), U8)]


def test_residual_add_is_emitted_into_the_conv_epilogue(tvm_backend):
    """Emitted for ``x86-amx`` on any machine: one conv kernel takes the residual (the add
    whose conv output nothing else reads), the other add stays a kernel of its own, and the
    plain call of the fused conv is gone."""
    gm, inputs = _residual_graph(False)
    mod = tvm_backend.emit(gm, "x86-amx", example_inputs=inputs)
    convs = [f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
             and f.attrs and str(f.attrs.get("ptq.kernel", "")) == "conv2d"]
    assert sum(any(p.name == "res" for p in f.params) for f in convs) == 1
    assert len(convs) == 3, [f.attrs["ptq.kernel"] for f in convs]  # y1 (fused), down, y2


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX (amx_int8 / amx_tile flags)")
@pytest.mark.parametrize("relu", [False, True])
def test_residual_add_in_the_conv_epilogue(tvm_backend, relu):
    """The add of a residual block runs in its conv's epilogue (no add kernel, no int8 round
    trip), bit-exact with conv then add; an add whose conv output is also read elsewhere
    stays an add of its own."""
    gm, inputs = _residual_graph(relu)
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs)
    why = cm.meta["variants"]
    assert "epilogue" in why["conv2d_default"][1] and "epilogue" not in why[
        "conv2d_default_2"][1], why
    assert_exact(cm(*inputs), gm(*inputs), "residual add in the epilogue")
    other = [int_tensor(5, (3, 64, 10, 10), I8), int_tensor(6, (3, 48, 10, 10), U8)]
    assert_exact(cm(*other), gm(*other), "residual add, another batch size")


#: (a shape after the batch, b shape after the batch, a dtype, a_zp, b dtype, b_zp, out dtype,
#: out_zp): MiniLM's attention products (uint8 scores x uint8 keys, probabilities x values,
#: float out), odd M / K / N (row, k-group and channel tails; K over one 64-deep step),
#: int8 operands, 8-bit outputs, one leading dim.
MATMULS = [
    ((3, 40, 32), (3, 32, 40), U8, 124, U8, 126, torch.float32, 0),
    ((3, 40, 40), (3, 40, 32), U8, 0, U8, 135, torch.float32, 0),
    ((2, 37, 70), (2, 70, 33), I8, -3, U8, 200, I8, 2),
    ((20, 64), (64, 17), U8, 5, I8, -7, U8, 3),
    ((2, 20, 130), (2, 130, 48), I8, 0, I8, 0, torch.float32, 0),
]


def _matmul_graph(cases=MATMULS, batch: int = 2, seed: int = 0):
    b, outs, inputs = GraphBuilder(), [], []
    for i, (sa, sb, adt, azp, bdt, bzp, odt, ozp) in enumerate(cases):
        x, y = b.input(f"a{i}"), b.input(f"b{i}")
        lo, hi = {I8: (-128, 127), U8: (0, 255)}.get(odt, (0, 0))
        outs.append(b.call(P.matmul.default, x, azp, y, bzp, 2e-4 * (i + 1), ozp, lo, hi, odt))
        inputs += [int_tensor(seed + 2 * i, (batch, *sa), adt),
                   int_tensor(seed + 2 * i + 1, (batch, *sb), bdt)]
    return b.build(tuple(outs)), inputs


def test_attention_matmuls_run_on_tiles(tvm_backend):
    """Cross-built for ``x86-amx`` on any x86 machine: 8-bit matmuls with static M >= 4,
    N >= 16 run ``matmul_amx`` (both operands packed per call; recorded in the variants);
    fewer than 4 rows stays on the VNNI block form."""
    small = [((2, 3, 32), (2, 32, 40), U8, 1, U8, 2, torch.float32, 0)]
    gm, inputs = _matmul_graph(MATMULS[:2] + small)
    cm = tvm_backend.compile(gm, "x86-amx", example_inputs=inputs, dynamic_batch=True)
    variants = _variants(cm)
    assert variants == {"matmul_default": "amx", "matmul_default_1": "amx"}, variants
    assert re.search(r"\btdpbusd\b", cm.source("asm"))


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX (amx_int8 / amx_tile flags)")
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_matmul_is_exact(tvm_backend, threads):
    """Every case of ``MATMULS`` bit-exact with the reference, symbolic batch (the kernel's
    parallel loop over batch entries), two batch sizes, one and two threads."""
    gm, inputs = _matmul_graph()
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=True)
    assert set(_variants(cm).values()) == {"amx"}, _variants(cm)
    with _pool(threads):
        assert_exact(cm(*inputs), gm(*inputs), f"AMX matmul, {threads} thread(s)")
        other = _matmul_graph(batch=3, seed=11)[1]
        assert_exact(cm(*other), gm(*other), "AMX matmul, another batch size")
