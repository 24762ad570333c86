"""TVM pipelines: ``ptqpasses_backends.tvm.emit`` gives the Relax IRModule before compilation; user
passes run on it, or at the named ``STAGES`` of ``compile(relax_passes=)``."""

import pytest
import torch
import tvm
from tvm import relax

import ptqpasses
from ptqpasses_backends import tvm as ptq_tvm
from ptqpasses_tools.digits import DigitsCNN


@pytest.fixture(scope="module")
def qgraph():
    data = [(torch.randn(4, 1, 8, 8),) for _ in range(2)]
    return ptqpasses.quantize(DigitsCNN(width=8).eval(), data[0], data, progress=False)


def _ptq_kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "ptq.kernel" in f.attrs}


def _te_kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    """The ptq kernels emitted as TE computes (scheduled by the pipeline; AMX's hand-written
    tile kernels come scheduled)."""
    return {n: f for n, f in _ptq_kernels(mod).items() if f.attrs.get("ptq.variant") != "amx"}


def _relax_op_names(mod: tvm.IRModule) -> set[str]:
    names = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return names


def test_emit_then_user_passes_then_compile(qgraph):
    mod = ptq_tvm.emit(qgraph, "host")
    assert isinstance(mod, tvm.IRModule) and "main" in [gv.name_hint for gv in mod.get_global_vars()]
    kinds = {str(f.attrs["ptq.kernel"]) for f in _ptq_kernels(mod).values()}
    assert {"conv2d", "dense"} <= kinds
    # The user's own passes on the emitted module; the signature attribute survives them.
    mod = tvm.transform.Sequential([relax.transform.FoldConstant(),
                                    relax.transform.DeadCodeElimination()])(mod)
    before = {name: f.script() for name, f in _ptq_kernels(mod).items()}
    cm = ptq_tvm.compile(mod)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        assert torch.equal(cm(x), qgraph(x))
    # compiling schedules copies of the kernels: the user's module is left as it was
    assert {name: f.script() for name, f in _ptq_kernels(mod).items()} == before
    assert not any("tir.is_scheduled" in f.attrs for f in _te_kernels(mod).values())


def test_user_passes_run_at_each_named_stage_in_order(qgraph):
    seen = []

    def probe(stage):
        @tvm.transform.module_pass(opt_level=0, name=f"probe_{stage}")
        def _probe(mod, _ctx):
            kernels = _ptq_kernels(mod)
            seen.append((stage, kernels, _relax_op_names(mod)))
            return mod
        return _probe

    cm = ptq_tvm.compile(qgraph, "host", relax_passes={s: probe(s) for s in ptq_tvm.STAGES})
    assert [s for s, _, _ in seen] == list(ptq_tvm.STAGES)
    by_stage = {s: (k, ops) for s, k, ops in seen}
    # start / before_schedule: kernels present, not yet scheduled; high-level Relax ops present.
    for stage in ("start", "before_schedule"):
        kernels, ops = by_stage[stage]
        assert kernels and not any("tir.is_scheduled" in f.attrs for f in kernels.values()
                                   if f.attrs.get("ptq.variant") != "amx")  # (come scheduled)
        assert "relax.call_tir" in ops and len(ops) > 1
    # after_schedule: the host's fixed template scheduled the conv/dense kernels.
    kernels, _ = by_stage["after_schedule"]
    assert any("tir.is_scheduled" in f.attrs for f in kernels.values())
    # after_legalize: nothing high-level is left, only calls into TIR (and VM builtins).
    _, ops = by_stage["after_legalize"]
    assert not {o for o in ops if o.startswith("relax.") and o not in (
        "relax.call_tir", "relax.call_pure_packed", "relax.null_value")}, ops
    # after_lowering: call_tir rewritten into explicit allocations.
    _, ops = by_stage["after_lowering"]
    assert "relax.call_tir" not in ops and any("alloc" in o for o in ops)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(cm(x), qgraph(x))


def test_a_plain_list_runs_on_the_emitted_module(qgraph):
    names = []

    @tvm.transform.module_pass(opt_level=0, name="count")
    def count(mod, _ctx):
        names.append(len(_ptq_kernels(mod)))
        return mod

    ptq_tvm.compile(qgraph, "host", relax_passes=[count])
    assert names and names[0] >= 2


def test_bad_relax_passes_name_the_stage_or_pass(qgraph):
    with pytest.raises(ValueError, match="unknown pipeline stage 'after_everything'.*after_legalize"):
        ptq_tvm.compile(qgraph, "host", relax_passes={"after_everything": []})
    with pytest.raises(TypeError, match="not a tvm.transform.Pass"):
        ptq_tvm.compile(qgraph, "host", relax_passes=[lambda m: m])

    @tvm.transform.module_pass(opt_level=0, name="broken_pass")
    def broken(mod, _ctx):
        raise RuntimeError("boom")

    with pytest.raises(ptq_tvm.RelaxPassError, match="'broken_pass' at stage 'after_schedule'.*boom"):
        ptq_tvm.compile(qgraph, "host", relax_passes={"after_schedule": broken})


def test_compile_refuses_modules_without_signature_or_of_another_family(qgraph):
    mod = ptq_tvm.emit(qgraph, "host")
    bare = tvm.IRModule(dict(mod.functions_items()))
    with pytest.raises(ValueError, match="no 'ptq.signature' attribute"):
        ptq_tvm.compile(bare)
    with pytest.raises(ValueError, match="emitted for .* cannot be compiled for 'aarch64-dotprod'"):
        ptq_tvm.compile(mod, "aarch64-dotprod")
    with pytest.raises(ValueError, match="example_inputs / dynamic_batch"):
        ptq_tvm.compile(mod, dynamic_batch=False)


def test_compile_refuses_an_x86_module_emitted_for_another_packing(qgraph):
    from ptqpasses_backends.tvm.compile import _layout
    from ptqpasses_backends.tvm.targets import resolve

    host = resolve("host")
    other = next((t for t in ("x86-avx512-vnni", "x86-avx2")
                  if host.family == "x86" and _layout(resolve(t)) != _layout(host)), None)
    if other is None:
        pytest.skip("host is not x86")
    mod = ptq_tvm.emit(qgraph, "host")  # AVX2 (vpmaddwd) and VNNI blocks differ
    with pytest.raises(ValueError, match=f"cannot be compiled for '{other}'.*emit it again"):
        ptq_tvm.compile(mod, other)


def test_fold_constant_leaves_ptq_kernels_alone():
    """Relax ``FoldConstant`` builds a ``call_tir`` of constants for a featureless ``llvm``
    target, where our AMX / AVX-512 VNNI kernels abort LLVM (DeBERTa-v2's linears on its
    relative embeddings). In our pipeline it folds the rest and leaves ``ptq.kernel`` calls,
    whatever the host."""
    import numpy as np
    from tvm import te

    from ptqpasses_backends.tvm.pipeline import SparePtqKernels

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4], "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = relax.const(np.arange(4, dtype="int32"))
            twice = bb.emit_te(lambda a: te.compute(a.shape, lambda i: a[i] * 2), c,
                               primfunc_name_hint="kernel")
            plus = bb.emit(relax.op.add(c, c))  # legalized to a plain PrimFunc: folded
            out = bb.emit_output(relax.op.add(relax.op.add(twice, plus), x))
        bb.emit_func_output(out)
    mod = bb.get()
    gv = mod.get_global_var("kernel")
    mod[gv] = mod[gv].with_attr("ptq.kernel", "linear")
    mod = relax.transform.LegalizeOps()(mod)

    def calls(m):
        seen = []
        relax.analysis.post_order_visit(m["main"], lambda e: seen.append(e.args[0].name_hint)
                                        if isinstance(e, relax.Call) and getattr(
                                            e.op, "name", "") == "relax.call_tir" else None)
        return seen

    assert calls(mod) == ["kernel", "add", "add", "add"]
    assert calls(relax.transform.FoldConstant()(mod)) == ["add"]  # TVM's: kernel evaluated
    spared = SparePtqKernels(relax.transform.FoldConstant())(mod)
    assert calls(spared) == ["kernel", "add", "add"]  # c + c folded, the kernel kept
    assert spared[gv].same_as(mod[gv])
    exe = tvm.compile(spared, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(np.ones(4, "int32"))).numpy()
    np.testing.assert_array_equal(got, np.arange(4) * 4 + 1)
