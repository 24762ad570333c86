"""Cross-target builds: packed layouts in the IR, dot-product instructions in the assembly,
CUDA source. Code for targets this CPU lacks is built and read, never run."""

from __future__ import annotations

import re

import pytest
import torch
import tvm

from tests.backends.conftest import P, GraphBuilder, assert_exact, host_has
from tests.backends.strategies import int_tensor, multipliers, weight


def _dense_conv_graph(dtype=torch.int8):
    """conv, flatten+linear, grouped conv, depthwise conv on one ``dtype`` input."""
    zp = -3 if dtype == torch.int8 else 131
    b = GraphBuilder()
    x = b.input("x")
    w = b.const(weight(0, (32, 8, 3, 3)))
    m = b.const(multipliers(1, 32, 0.002))
    c = b.call(P.conv2d.default, x, zp, w, None, [1, 1], [1, 1], [1, 1], 1, m, 0, -128, 127,
               torch.int8)
    f = b.call(torch.ops.aten.flatten.using_ints, c, 1)
    w2 = b.const(weight(2, (24, 32 * 6 * 6)))
    m2 = b.const(multipliers(3, 24, 0.001))
    y = b.call(P.linear.default, f, 0, w2, None, m2, 0, -128, 127, torch.int8)
    wg = b.const(weight(5, (32, 4, 3, 3)))  # grouped: 2 groups of 4 -> 16 channels
    gc = b.call(P.conv2d.default, x, zp, wg, None, [2, 2], [1, 1], [1, 1], 2, m, 0, -128, 127,
                torch.int8)
    wd = b.const(weight(6, (8, 1, 3, 3)))  # depthwise: not a dot-product kernel
    dc = b.call(P.conv2d.default, x, zp, wd, None, [1, 1], [1, 1], [1, 1], 8,
                b.const(multipliers(7, 8, 0.01)), 0, -128, 127, torch.int8)
    return b.build((c, y, gc, dc)), [int_tensor(4, (2, 8, 6, 6), dtype)]


DOT_KERNELS = ("ptq_conv2d", "ptq_dense", "ptq_conv2d1")  # conv, dense, grouped conv


@pytest.fixture(scope="module")
def graph():
    return _dense_conv_graph()


_BUILT = {}


def _build(tvm_backend, graph, target):
    if target not in _BUILT:
        gm, inputs = graph
        _BUILT[target] = tvm_backend.compile(gm, target, example_inputs=inputs)
    return _BUILT[target]


def _kernel_param_shapes(mod: tvm.IRModule, name: str) -> list:
    """Shapes of the arguments ``main`` passes to the PrimFunc ``name`` (via call_tir)."""
    shapes = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if getattr(call, "op", None) != tvm.ir.Op.get("relax.call_tir"):
                continue
            if call.args[0].name_hint == name:
                shapes += [[int(d) if isinstance(d, tvm.tirx.IntImm) else str(d)
                            for d in arg.ty.shape] for arg in call.args[1].fields]
    return shapes


def test_weights_are_prepacked_in_vnni_blocks(tvm_backend, graph):
    gm, inputs = graph
    mod, _, _ = tvm_backend.build_ir(gm, "x86-avx512-vnni", example_inputs=inputs)
    conv = _kernel_param_shapes(mod, "ptq_conv2d")
    dense = _kernel_param_shapes(mod, "ptq_dense")
    assert [2, 3, 3, 2, 16, 4] in conv  # [K/16, R, S, C/4, 16, 4]
    assert [2, 288, 16, 4] in dense  # [N/16, K/4, 16, 4] (N = 24 padded to 32)
    assert [2, 1, 3, 3, 1, 16, 4] in _kernel_param_shapes(mod, "ptq_conv2d1")  # [G, ...]
    mod, _, _ = tvm_backend.build_ir(gm, "aarch64-dotprod", example_inputs=inputs)
    assert [8, 3, 3, 2, 4, 4] in _kernel_param_shapes(mod, "ptq_conv2d")
    assert [6, 288, 4, 4] in _kernel_param_shapes(mod, "ptq_dense")


def test_avx2_weights_are_prepacked_in_vpmaddwd_blocks(tvm_backend, graph):
    """AVX2 without VNNI: int8 weights in ``[O/16, ..., K/2, 16, 2]`` blocks, int16 activations;
    convs reduce over the output width padded to the 4-column register tile."""
    gm, inputs = graph
    mod, _, _ = tvm_backend.build_ir(gm, "x86-avx2", example_inputs=inputs)
    assert [2, 3, 3, 4, 16, 2] in _kernel_param_shapes(mod, "ptq_conv2d")  # C = 8 -> 4 pairs
    assert [2, 576, 16, 2] in _kernel_param_shapes(mod, "ptq_dense")  # K = 1152, N 24 -> 32
    assert [2, 1, 3, 3, 2, 16, 2] in _kernel_param_shapes(mod, "ptq_conv2d1")
    for name in DOT_KERNELS:
        assert re.search(r'x_enc = T.sblock_alloc_buffer\(\(.*\), "int16"\)', mod[name].script())
    # output widths 6 (conv) and 3 (grouped, stride 2) are computed 8 and 4 wide
    assert re.search(r"acc = T.sblock_alloc_buffer\(\(batch, T.int64\(6\), T.int64\(8\),",
                     mod["ptq_conv2d"].script())
    assert re.search(r"acc = T.sblock_alloc_buffer\(\(batch, T.int64\(3\), T.int64\(4\),",
                     mod["ptq_conv2d1"].script())


@pytest.mark.parametrize("target,register", [("x86-avx512-vnni", "zmm"),
                                             ("x86-avx-vnni", "ymm")])
def test_vnni_assembly_has_vpdpbusd(tvm_backend, graph, target, register):
    """AVX-512 VNNI tiles run ``vpdpbusd`` on zmm registers; AVX-VNNI (no AVX-512) on ymm,
    VEX-encoded (``{vex}``)."""
    asm = _build(tvm_backend, graph, target).source("asm")
    for kernel in DOT_KERNELS:
        body = _kernel_asm(asm, kernel)
        found = re.findall(r"^\s*(\{vex\}\s*)?vpdpbusd\s+[^\n]*%(\w)mm", body, re.M)
        assert found, f"no vpdpbusd in {kernel}"
        assert {reg for _, reg in found} == {register[0]}, (kernel, found[:4])
        assert all(vex for vex, _ in found) == (register == "ymm"), found[:4]
    assert "vpdpbusd" not in _kernel_asm(asm, "ptq_conv2d_depthwise")


def _function_asm(asm: str, name: str) -> str:
    """The assembly of every function whose symbol contains ``name`` (the kernel and its
    ``__tvm_ffi_`` wrapper), each from its label to its ``.size`` directive."""
    bodies = re.findall(rf"^((?:__tvm_ffi_)?{name}(?:_compute_)?):\n(.*?)^\s*\.size\s+\1",
                        asm, re.S | re.M)
    assert bodies, f"function {name} not in assembly"
    return "\n".join(body for _, body in bodies)


def _kernel_asm(asm: str, name: str) -> str:
    """:func:`_function_asm` plus the parallel-loop bodies (``.L__tvm_parallel_lambda*``,
    separate local functions) that the kernel launches."""
    body = _function_asm(asm, name)
    return "\n".join([body, *_parallel_bodies(asm, body, name)])


def _parallel_bodies(asm: str, body: str, name: str) -> list[str]:
    """The assembly of the parallel-loop bodies that a function's ``body`` launches."""
    parts = []
    for label in sorted(set(re.findall(r"(\.L__tvm_parallel_lambda[\w.]*)\(%rip\)", body))):
        found = re.search(rf"^{re.escape(label)}:\n(.*?)^\s*\.size\s+{re.escape(label)},",
                          asm, re.S | re.M)
        assert found, f"parallel body {label} of {name} not in assembly"
        parts.append(found.group(1))
    return parts


def test_avx2_tiles_allocate_nothing(tvm_backend, graph):
    """The intrinsic's temporaries stay in registers: a named temporary in its TVMScript
    became a local buffer, which the parallel loop allocated with TVMBackendAllocWorkspace
    (and freed) once per register tile."""
    asm = _build(tvm_backend, graph, "x86-avx2").source("asm")
    for kernel in DOT_KERNELS:
        bodies = _parallel_bodies(asm, _function_asm(asm, kernel), kernel)
        assert bodies, kernel
        assert not any("TVMBackendAllocWorkspace" in b for b in bodies), kernel


I8 = torch.int8


def _wide_tiles_graph():
    """A conv with 64 output channels on 7-pixel rows, a dense and a matmul on 8 static rows:
    shapes whose register tiles could take more than 16 zmm accumulators."""
    b = GraphBuilder()
    x, t, u = b.input("x"), b.input("t"), b.input("u")
    c = b.call(P.conv2d.default, x, 3, b.const(weight(0, (64, 16, 1, 1))), None, [1, 1],
               [0, 0], [1, 1], 1, b.const(multipliers(1, 64, 0.004)), 0, -128, 127, I8)
    d = b.call(P.linear.default, t, 0, b.const(weight(2, (64, 32))), None,
               b.const(multipliers(3, 64, 0.004)), 0, -128, 127, I8)
    m = b.call(P.matmul.default, t, 1, u, -2, 1e-3, 0, -128, 127, I8)
    return b.build((c, d, m)), [int_tensor(4, (1, 16, 7, 7), I8),
                                int_tensor(5, (1, 8, 32), I8), int_tensor(6, (1, 32, 64), I8)]


@pytest.mark.parametrize("target", ["x86-avx512-vnni", "x86-avx-vnni", "x86-avx2"])
def test_register_tiles_stay_off_the_heap(tvm_backend, target):
    """Every x86 template tile is under 1024 bytes, TVM's limit for a stack buffer: a larger
    one became TVMBackendAllocWorkspace memory once per tile, which LLVM could not keep in
    registers (a store after every vpdpbusd; dense 2.5x slower on a Zen 4 core). The tile's
    requantize is vector code, not gathers."""
    gm, inputs = _wide_tiles_graph()
    cm = tvm_backend.compile(gm, target, example_inputs=inputs)
    asm = cm.source("asm")
    kernels = sorted(set(re.findall(r"^(ptq_(?:conv2d|dense|matmul)\d*)_compute_:$", asm, re.M)))
    assert len(kernels) == 3, kernels
    for kernel in kernels:
        body = "\n".join(_parallel_bodies(asm, _function_asm(asm, kernel), kernel))
        if "matmul" not in kernel:  # (AVX-VNNI runs matmuls on the plain CPU tile)
            assert re.search(r"\bvp(dpbusd|maddwd)\b", body), kernel
        assert "TVMBackendAllocWorkspace" not in body, kernel
        assert not re.search(r"\bvp?gather", body), kernel
    if target == "x86-avx512-vnni" and host_has("avx512vnni"):
        assert_exact(cm(*inputs), gm(*inputs), target)


def test_avx2_builds_without_vnni_and_runs_exact(tvm_backend, graph):
    cm = _build(tvm_backend, graph, "x86-avx2")
    asm = cm.source("asm")
    assert "vpdpbusd" not in asm
    for kernel in DOT_KERNELS:
        body = _kernel_asm(asm, kernel)
        assert "vpmaddwd" in body, f"no vpmaddwd in {kernel}"
        # int16 pairs in lane order: no saturating u8 x s8 form, no horizontal reduction
        assert "vpmaddubsw" not in body and "vphaddd" not in body, kernel
    gm, inputs = graph
    assert_exact(cm(*inputs), gm(*inputs), "x86-avx2")


def test_vnni_runs_exact_when_host_has_it(tvm_backend, graph):
    if not host_has("avx512vnni"):
        pytest.skip("host CPU has no AVX-512 VNNI: VNNI code is built and inspected, not run")
    cm = _build(tvm_backend, graph, "x86-avx512-vnni")
    gm, inputs = graph
    assert_exact(cm(*inputs), gm(*inputs), "x86-avx512-vnni")


@pytest.mark.parametrize("target", ["aarch64-dotprod", "aarch64-i8mm"])
def test_aarch64_dotprod_assembly_has_sdot(tvm_backend, graph, target):
    asm = _build(tvm_backend, graph, target).source("asm")
    for kernel in DOT_KERNELS:
        assert re.search(r"\b[su]dot\b", _function_asm(asm, kernel)), kernel


def test_aarch64_neon_builds_without_sdot(tvm_backend, graph):
    asm = _build(tvm_backend, graph, "aarch64-neon").source("asm")
    assert not re.search(r"\bsdot\b", asm)


def test_cross_module_refuses_to_run_and_exports_tar(tvm_backend, graph, tmp_path):
    cm = _build(tvm_backend, graph, "aarch64-dotprod")
    with pytest.raises(RuntimeError, match="cannot run on this machine"):
        cm(*graph[1])
    lib = cm.save(tmp_path / "arm")
    assert lib.suffix in (".tar", ".so") and lib.exists()
    with pytest.raises(tvm_backend.LoadError, match="cannot be loaded for execution"):
        tvm_backend.load(tmp_path / "arm")


def test_cuda_builds_and_source_has_kernels(tvm_backend, graph):
    src = _build(tvm_backend, graph, "cuda-sm80").source("cuda")
    kernels = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", src)
    assert any(k.startswith("ptq_conv2d") for k in kernels), kernels
    assert any(k.startswith("ptq_dense") for k in kernels), kernels


@pytest.mark.parametrize("name", [
    "llvm.x86.avx512.vpdpbusd.512", "llvm.aarch64.neon.sdot.v4i32.v16i8",
    "llvm.aarch64.neon.udot.v4i32.v16i8", "llvm.aarch64.neon.usdot.v4i32.v16i8",
    "llvm.aarch64.neon.smmla.v4i32.v16i8"])
def test_int8_intrinsics_exist_in_bundled_llvm(name):
    assert int(tvm.target.codegen.llvm_lookup_intrinsic_id(name)) != 0


def test_avx2_quantize_glue_stores_whole_vectors(tvm_backend):
    """A float32 -> int8 quantize island (SmoothQuant's ``x / s`` then quantize, rows of 384)
    is vectorized by 32 lanes in the glue schedule: by 16, LLVM re-vectorized it across the
    outer loop into per-element ``vinsertps`` loads and ``vpextrb`` stores (3.2x slower)."""
    b = GraphBuilder()
    x = b.input("x")  # float32 [B, 128, 384]
    f = b.call(torch.ops.aten.div.Tensor, x, b.const(torch.linspace(0.5, 1.5, 384)))
    gm = b.build(b.call(P.quantize.default, f, 0.03, -5, -128, 127, torch.int8))
    inputs = [torch.randn(1, 128, 384, generator=torch.Generator().manual_seed(0))]
    cm = tvm_backend.compile(gm, "x86-avx2", example_inputs=inputs, dynamic_batch=False)
    asm = cm.source("asm")
    names = sorted(set(re.findall(r"^(fused_\w*clip\w*?)(?:_compute_)?:$", asm, re.M)))
    assert names, "no fused quantize function in the assembly"
    for name in names:
        body = _kernel_asm(asm, name)
        assert "vcvttps2dq" in body, f"{name} not vectorized"
        assert "vpextrb" not in body and "vinsertps" not in body, f"{name}: scattered bytes"
    assert_exact(cm(*inputs), gm(*inputs), "x86-avx2")
