"""The aarch64 families on an emulated aarch64 board: every integer op and whole graphs,
built here, linked with the cross compiler, uploaded over TVM RPC and run under qemu-user
(``tools/aarch64_device.py``), bit-exact against the torch reference (float islands: within
the tolerance of tests/backends/test_end_to_end.py). Remote tuning through a tracker.

``QEMU_CPU=max`` emulates dotprod and i8mm, so each strategy's own instructions run (``sdot``
for ``aarch64-dotprod`` and ``aarch64-i8mm``, TVM's default lowering for ``aarch64-neon``);
emulated timings mean nothing and are not checked.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import ptqpasses
from ptqpasses_backends.tvm.remote import RemoteModule
from tests.backends import test_int16, test_ops_exact as ops, test_per_token
from tests.backends.conftest import P, GraphBuilder, assert_exact
from tests.backends.models import Tables
from tests.backends.strategies import int_tensor
from ptqpasses_tools.digits import DigitsCNN
from ptqpasses_tools.models import bert_encoder, randomize_bn_stats, resnet18

#: One tracker and one emulated board per test process: these tests run in one xdist worker
#: (``--dist loadgroup``).
pytestmark = pytest.mark.xdist_group("aarch64")

AARCH64 = ["aarch64-dotprod", "aarch64-i8mm", "aarch64-neon"]

# Each example compiles one graph of every op and runs it on the emulated board (~1-2 s).
_DEEP = int(os.environ.get("PTQ_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_DEEP or 4, deadline=None, derandomize=False, database=None,
                    print_blob=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))


def _on_device(tvm_backend, device, gm, inputs, target, **compile_kw):
    """``gm`` compiled for ``target`` and run on ``device``: (remote outputs, reference)."""
    cm = tvm_backend.compile(gm, target, example_inputs=inputs, **compile_kw)
    assert cm.meta["cross"] and cm.meta["family"] == "aarch64"
    with RemoteModule(cm, device) as remote:
        return remote(*inputs), gm(*inputs)


@pytest.mark.parametrize("target", AARCH64)
@SETTINGS
@given(conv=ops.conv_case(), linear=ops.linear_case(), matmul=ops.matmul_case(),
       binary=ops.binary_case(), elementwise=ops.elementwise_case(), cat=ops.cat_case(),
       pool=ops.pool_case())
def test_every_integer_op_is_exact_on_the_device(tvm_backend, aarch64_device, target, conv,
                                                 linear, matmul, binary, elementwise, cat,
                                                 pool):
    """One drawn case of each op of tests/backends/test_ops_exact.py in one graph, plus the
    per-channel dequantize and a table lookup."""
    b, outs, inputs = GraphBuilder(), [], []
    outs += ops.conv_nodes(b, "conv", conv, inputs)
    outs += ops.linear_nodes(b, "linear", linear, inputs)
    outs += ops.matmul_nodes(b, "mm", matmul, inputs)
    outs += ops.add_mul_nodes(b, "bin", binary, inputs)
    outs += ops.elementwise_nodes(b, "ew", elementwise, inputs)
    outs += ops.cat_nodes(b, "cat", cat, inputs)
    outs += ops.pool_nodes(b, "pool", pool, inputs)
    x = b.input("pc")
    inputs.append(int_tensor(3, (2, 4, 3), torch.int8))
    outs.append(b.call(P.dequantize_per_channel.default, x, b.const(torch.rand(4) * 0.1),
                       b.const(torch.tensor([0, 3, -2, 5])), 1))
    t = b.input("lut")
    inputs.append(int_tensor(4, (2, 5, 7), torch.uint8))
    outs.append(b.call(P.lut.default, t, b.const(int_tensor(5, (256,), torch.int8)), 0))
    got, want = _on_device(tvm_backend, aarch64_device, b.build(tuple(outs)), inputs, target,
                           dynamic_batch=False)
    assert_exact(got, want, target)


@pytest.mark.parametrize("target", AARCH64)
@settings(SETTINGS, max_examples=_DEEP or 2)
@given(case=test_int16.int16_case())
def test_int16_ops_are_exact_on_the_device(tvm_backend, aarch64_device, target, case):
    gm, inputs = test_int16._op_graph(case)
    got, want = _on_device(tvm_backend, aarch64_device, gm, inputs, target,
                           dynamic_batch=False)
    assert_exact(got, want, f"int16 ops on {target}")


@pytest.mark.parametrize("target", AARCH64)
def test_per_token_linear_is_exact_on_the_device(tvm_backend, aarch64_device, target):
    """``ptq.linear_dynamic`` and ``fake_quantize_per_token`` (edge rows included: zeros,
    one sign, NaN, huge values) on each aarch64 family."""
    gm = test_per_token._graph(70, 33, seed=3)
    x = test_per_token._rows(70, (2, 37), 70)
    got, want = _on_device(tvm_backend, aarch64_device, gm, [x], target, dynamic_batch=False)
    assert_exact(got, want, f"per-token ops on {target}")


def _quantized(model, shape, **kw):
    data = [(torch.randn(*shape),) for _ in range(2)]
    return ptqpasses.quantize(model.eval(), data[0], data, progress=False, **kw)


@pytest.mark.parametrize("target", AARCH64)
def test_whole_graphs_are_exact_on_the_device(tvm_backend, aarch64_device, target):
    """The digits CNN (one module, two batch sizes), a residual CNN (ResNet-18 at 32x32), the
    table-lookup model; a BERT-style encoder within 1e-5 (its last LayerNorm runs in float)."""
    digits = _quantized(DigitsCNN(width=8), (4, 1, 8, 8))
    cm = tvm_backend.compile(digits, target)
    assert cm.inputs[0].shape[0] == "batch"
    with RemoteModule(cm, aarch64_device) as remote:
        for n in (1, 5):
            x = torch.randn(n, 1, 8, 8)
            assert_exact(remote(x), digits(x), f"digits CNN, batch {n}")
    for name, q, shape in [
            ("resnet18", _quantized(randomize_bn_stats(resnet18(num_classes=10), seed=2),
                                    (2, 3, 32, 32)), (2, 3, 32, 32)),
            ("tables", _quantized(Tables(), (2, 3, 6, 6)), (2, 3, 6, 6))]:
        x = torch.randn(*shape) * 2
        got, want = _on_device(tvm_backend, aarch64_device, q, [x], target)
        assert_exact(got, want, name)
    enc = _quantized(bert_encoder(take_embeddings=True), (2, 16, 64),
                     dynamic_dims={0: {1: "seq"}})
    x = torch.randn(2, 9, 64)
    got, want = _on_device(tvm_backend, aarch64_device, enc, [x], target)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


#: The key of the native x86 RPC server (``x86_server``) at the tests' tracker.
X86_KEY = "x86-local"


@pytest.fixture(scope="module")
def x86_server(rpc_tracker):
    """A native TVM RPC server (this machine's CPU) registered with ``rpc_tracker``."""
    from ptqpasses_tools import rpc_cluster

    with rpc_cluster.start_server(tracker=rpc_tracker, key=X86_KEY,
                                  port=rpc_cluster.free_port()):
        rpc_cluster.wait_for_servers(rpc_tracker, X86_KEY, 1)
        yield f"{rpc_tracker}:{X86_KEY}"


def test_tuning_over_rpc_measures_on_each_device(tvm_backend, aarch64_device, x86_server,
                                                 tmp_path):
    """A tracker with two servers, the emulated aarch64 board and a native x86 one: one dense
    kernel tuned for each device's target through its key (built and linked here, measured
    there), its records in the local database under that target, applied by ``compile`` and
    bit-exact on the device it was tuned for; a second ``tune`` measures nothing."""
    from tests.backends.test_tune import _dense, _scheduled_kernels

    gm, inputs = _dense()
    db = tmp_path / "db"
    for target, device in [("aarch64-dotprod", aarch64_device), ("x86-avx2", x86_server)]:
        first = tvm_backend.tune(gm, target, trials=2, database=db, example_inputs=inputs,
                                 rpc=device, progress=False)
        assert [(t.kind, t.trials) for t in first.tasks] == [("dense", 2)], target
        assert first.tasks[0].best_ms is not None, target  # measured there
        assert (first.database / "database_tuning_record.json").read_text().strip()
        assert all("ptq.tuned" in k.attrs
                   for k in _scheduled_kernels(gm, inputs, db, target)), target
        cm = tvm_backend.compile(gm, target, example_inputs=inputs, database=db)
        with RemoteModule(cm, device) as remote:
            assert_exact(remote(*inputs), gm(*inputs), f"tuned dense on {target}")
        again = tvm_backend.tune(gm, target, trials=2, database=db, example_inputs=inputs,
                                 rpc=device, progress=False)
        assert again.trials == 0 and again.database == first.database


def test_rpc_errors_name_what_is_wrong(tvm_backend, rpc_tracker):
    from ptqpasses_backends.tvm.remote import RpcDevice
    from tests.backends.test_tune import _dense

    gm, inputs = _dense()
    with pytest.raises(ValueError, match="expected host:port:key"):
        RpcDevice.parse("localhost")
    with pytest.raises(ValueError, match="goes through an RPC tracker"):
        tvm_backend.tune(gm, "aarch64-dotprod", trials=1, example_inputs=inputs,
                         rpc="127.0.0.1:1", progress=False)
    with pytest.raises(ConnectionError, match="lists no server under the key 'nobody'"):
        tvm_backend.tune(gm, "aarch64-dotprod", trials=1, example_inputs=inputs,
                         rpc=f"{rpc_tracker}:nobody", progress=False)
    with pytest.raises(ValueError, match="does not run on this machine.*rpc="):
        tvm_backend.tune(gm, "aarch64-dotprod", trials=1, example_inputs=inputs,
                         progress=False)


def test_ptq_bench_and_tune_with_rpc(aarch64_device, tmp_path, capsys):
    """``ptq bench --rpc`` times the digits model on the emulated board (checked bit-exact
    there first); ``ptq tune --rpc`` tunes it for aarch64 through the tracker."""
    import numpy as np

    from ptqpasses_tools import cli

    assert cli.main(["bench", "--rpc", aarch64_device, "--target", "aarch64-dotprod",
                     "--models", "digits", "--runs", "3", "--out", str(tmp_path / "b")]) == 0
    report = __import__("json").loads((tmp_path / "b" / "bench-remote.json").read_text())
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["exact"] and row["median_ms"] > 0, row
    assert report["target"] == "aarch64-dotprod" and report["device"] == aarch64_device
    assert "| digits b1 | aarch64-dotprod | yes |" in capsys.readouterr().out

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 1, 8, 8))
            .astype(np.float32))
    model = ["tools.digits:DigitsCNN", "--input", "1x1x8x8:float32"]
    assert cli.main(["quantize", *model, "--calib", str(tmp_path / "x.npy"), "--no-guard",
                     "--out", str(tmp_path / "recipe")]) == 0
    assert cli.main(["tune", *model, "--recipe", str(tmp_path / "recipe"), "--target",
                     "aarch64-dotprod", "--trials", "1", "--kinds", "dense", "--database",
                     str(tmp_path / "db"), "--rpc", aarch64_device]) == 0
    out = capsys.readouterr().out
    assert "| ptq_dense | dense | 1 |" in out, out
    assert cli.main(["tune", *model, "--recipe", str(tmp_path / "recipe"), "--rpc",
                     "nohost"]) == 2
    assert "--rpc: RPC device 'nohost'" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("ptqpasses_backends.tvm.amx",
                                    fromlist=["x"]).kernels.cpu_has_amx(),
                    reason="the CPU has no AMX")
def test_amx_module_runs_on_a_native_rpc_server(tvm_backend, x86_server):
    """An AMX build (``host`` here) uploaded to the native RPC server: its kernels ask for the
    tile state in the server's process themselves."""
    from tests.backends.test_amx import CONVS, DENSES, _graph, _variants

    gm, inputs = _graph(CONVS[1:2], DENSES[2:3])
    cm = tvm_backend.compile(gm, "host", example_inputs=inputs, dynamic_batch=False)
    assert "amx" in _variants(cm).values()
    with RemoteModule(cm, x86_server) as remote:
        assert_exact(remote(*inputs), gm(*inputs), "AMX over RPC")
