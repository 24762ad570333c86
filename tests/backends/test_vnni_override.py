"""The fixed intrinsic replaces TVM's broken ``dot_16x4_vnni`` (what MetaSchedule looks up).

Imports only the x86 module of TVM's intrinsic registry (the whole registry takes ~50 s).
"""

import pytest

pytestmark = pytest.mark.slow


def test_override_tvm_vnni_builds_for_llvm22():
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule, TensorIntrin

    from ptqpasses_backends.tvm.x86 import vnni as intrinsics

    name = intrinsics.override_tvm_vnni()
    assert TensorIntrin.get(name).impl.script() == intrinsics.vnni_impl.script()
    a = te.placeholder((16, 64), "uint8", name="a")
    w = te.placeholder((2, 16, 16, 4), "int8", name="w")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((16, 32), lambda i, j: te.sum(
        a[i, k].astype("int32") * w[j // 16, k // 4, j % 16, k % 4].astype("int32"), axis=k),
        name="acc")
    sch = Schedule(te.create_prim_func([a, w, c]))
    blk = sch.get_sblock("acc")
    i, j, kk = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, 16])
    ko, ki = sch.split(kk, [None, 4])
    sch.reorder(i, jo, ko, ji, ki)
    sch.decompose_reduction(blk, ko)
    sch.tensorize(ji, name)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": "cascadelake"})
    lib = tvm.compile(sch.mod, target=target)
    mod = lib.mod if hasattr(lib, "mod") else lib
    assert "vpdpbusd" in mod.inspect_source("asm")


@pytest.mark.opt_in  # ~50 s: the whole registry parses every family's intrinsics
def test_the_full_registry_imports_after_the_override_and_keeps_it():
    """The real registry package, imported after the override, finds TVM's x86 module
    already imported: no duplicate registration, and the fixed intrinsic stays (subprocess:
    the registry import is slow and process-wide)."""
    import subprocess
    import sys
    code = ("from ptqpasses_backends.tvm.x86 import vnni as v\n"
            "name = v.override_tvm_vnni()\n"
            "import tvm.s_tir.tensor_intrin as full\n"
            "from tvm.s_tir import TensorIntrin\n"
            "assert hasattr(full, 'cuda') and hasattr(full, 'x86')\n"
            "assert TensorIntrin.get(name).impl.script() == v.vnni_impl.script()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
