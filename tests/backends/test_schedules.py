"""The fixed dot-product schedules, executed on this CPU with stand-in intrinsics.

VNNI and sdot code cannot run here, so the schedule (split, reorder, decompose_reduction,
tensorize on the packed layout) is checked by tensorizing with a plain-loop intrinsic of the
same 16x4 / 4x4 description, which any CPU runs; the real intrinsics are checked for
instruction selection in test_codegen.py.
"""

from __future__ import annotations

import pytest
import torch
import tvm
from tvm.s_tir import TensorIntrin

import dataclasses

from ptqpasses_backends.tvm import registry, targets
from ptqpasses_backends.tvm.aarch64 import sdot as arm_intrin
from ptqpasses_backends.tvm.build import _output_specs, input_specs
from ptqpasses_backends.tvm.cpu import dot as dot_schedule
from ptqpasses_backends.tvm.emit import emit_relax as emit
from ptqpasses_backends.tvm.pipeline import get_pipeline
from ptqpasses_backends.tvm.runtime import CompiledModule
from ptqpasses_backends.tvm.x86 import vnni as x86_intrin
from tests.backends.conftest import assert_exact
from tests.backends.test_codegen import _dense_conv_graph


def _standin(name, desc):
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, desc, desc)  # the description itself as implementation
    return name


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("fam_name,desc,lanes", [
    ("x86-avx512-vnni", x86_intrin.vnni_desc, 16), ("aarch64-dotprod", arm_intrin.sdot_desc, 4)])
def test_tensorized_schedule_is_exact(fam_name, desc, lanes, dtype):
    """Both activation re-encodings (+128 to uint8 for x86, -128 to int8 for aarch64)."""
    intrin = _standin(f"ptq_test_standin_{fam_name}", desc)
    base = registry.strategy_for(targets.resolve(fam_name))
    main = dataclasses.replace(base.main, layout=dataclasses.replace(base.main.layout,
                                                                     width_block=1),
                               schedule=lambda f, kind, t: dot_schedule.tensorize_acc(
                                   f, kind, intrin, lanes, 4))
    fam = dataclasses.replace(base, arch="x86", variants=(main,))
    gm, inputs = _dense_conv_graph(dtype)
    # Emit with the strategy's packing, but build and run for the host CPU.
    specs = input_specs(gm, inputs)
    mod = emit(gm, fam, specs)
    host = targets.resolve("host").target()
    exe = tvm.compile(mod, target=host, relax_pipeline=get_pipeline(fam, host))
    cm = CompiledModule(exe, {"target": "host", "family": "x86", "inputs": [
        s.to_json() for s in specs], "outputs": [s.to_json() for s in _output_specs(mod)],
        "output_treespec": None})
    assert_exact(cm(*inputs), gm(*inputs), f"{fam_name} schedule")
    scheduled = [f for _, f in exe_funcs(mod, fam, host) if "tir.is_scheduled" in f.attrs
                 and str(f.attrs["ptq.kernel"]) != "conv2d_depthwise"]  # (its own schedule)
    assert len(scheduled) == 3  # conv, grouped conv and dense were tensorized


def exe_funcs(mod, fam, target):
    from ptqpasses_backends.tvm.pipeline import ApplyPtqSchedules

    with target:
        out = ApplyPtqSchedules(fam, target)(mod)
    return [(gv, f) for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
