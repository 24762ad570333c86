"""Shared helpers: build small integer graphs by hand and compile them once."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import ptqpasses.ops  # noqa: F401  (registers torch.ops.ptq)

P = torch.ops.ptq


class GraphBuilder:
    """Build an ``fx.GraphModule`` node by node (constants become ``get_attr`` buffers)."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self._n = 0

    def input(self, name: str = "x") -> fx.Node:
        return self.graph.placeholder(name)

    def const(self, tensor: torch.Tensor) -> fx.Node:
        self._n += 1
        name = f"c{self._n}"
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)

    def call(self, op, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(op, tuple(args), kwargs)

    def build(self, outputs) -> fx.GraphModule:
        self.graph.output(outputs)
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.lint()
        return gm


def host_has(feature: str) -> bool:
    from ptqpasses_backends.tvm import targets

    return targets.has_feature(targets.resolve("host").target(), feature)


@pytest.fixture(scope="session")
def tvm_backend():
    import ptqpasses_backends.tvm as bt

    return bt


def assert_exact(got, want, what: str = ""):
    """Bit-exact comparison of tensors or sequences of tensors."""
    if isinstance(want, torch.Tensor):
        got, want = [got], [want]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, (what, i, g.dtype, w.dtype)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        if not torch.equal(g, w):
            diff = (g.to(torch.float64) - w.to(torch.float64)).abs()
            raise AssertionError(f"{what} output {i}: {int((diff > 0).sum())} of {diff.numel()} "
                                 f"elements differ, max {diff.max().item()}")


def assert_island_close(got, want, what: str = ""):
    """A compiled graph with float islands (layer norm, softmax, GELU: within a few ulps of
    ATen, not bit-exact) against the torch reference. Ulp differences everywhere, and where a
    per-token linear reads an island, an ulp can move a row's scale and flip one input code
    (one step of that row, ~1e-4 of the output here): output SQNR against the reference
    >= 80 dB (measured 93.6-141.7 dB on BERT-like encoders) and no element off by more than
    1e-3 of the output's largest value."""
    from ptqpasses.report import sqnr

    db = sqnr(want, got)
    worst = float((got.double() - want.double()).abs().max())
    assert db >= 80.0 and worst <= 1e-3 * float(want.abs().max()), (what, db, worst)


def kernel_probe(kind: str, seen: dict):
    """A Relax pass (for ``compile(relax_passes={stage: ...})``) that records the module's
    PrimFuncs tagged ``ptq.kernel == kind`` into ``seen`` (name -> PrimFunc) at that stage."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=f"probe_{kind}")
    def probe(mod, _ctx):
        seen.update({gv.name_hint: f for gv, f in mod.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc) and f.attrs
                     and str(f.attrs.get("ptq.kernel", "")) == kind})
        return mod

    return probe



@pytest.fixture(scope="session")
def rpc_tracker():
    """A TVM RPC tracker on localhost (``tools.rpc_cluster``), as ``"127.0.0.1:port"``."""
    pytest.importorskip("tornado", reason="the RPC tracker needs tornado (the rpc extra)")
    from ptqpasses_tools import rpc_cluster

    with rpc_cluster.start_tracker(port=rpc_cluster.free_port()) as tracker:
        yield f"127.0.0.1:{tracker.port}"


#: The key the emulated aarch64 board registers under at the tests' tracker.
AARCH64_KEY = "aarch64-emulated"


@pytest.fixture(scope="session")
def aarch64_device(rpc_tracker):
    """An emulated aarch64 board (``tools/aarch64_device.py``: a TVM RPC server under
    qemu-user) registered with ``rpc_tracker``, as ``"127.0.0.1:port:aarch64-emulated"``.

    Skipped where the device is not set up (``python -m tools.aarch64_device setup``), except
    when ``PTQ_REQUIRE_AARCH64=1`` (``.ci/run`` sets it up and requires it): then a missing
    device fails the tests that need it.
    """
    import os

    from ptqpasses_tools import aarch64_device, rpc_cluster

    if not aarch64_device.is_ready():
        msg = ("the emulated aarch64 device is not set up: python -m tools.aarch64_device "
               "setup")
        if os.environ.get("PTQ_REQUIRE_AARCH64") == "1":
            pytest.fail(msg + " (PTQ_REQUIRE_AARCH64=1)")
        pytest.skip(msg)
    with aarch64_device.start_server(port=rpc_cluster.free_port(), tracker=rpc_tracker,
                                     key=AARCH64_KEY):
        rpc_cluster.wait_for_servers(rpc_tracker, AARCH64_KEY, 1)
        yield f"{rpc_tracker}:{AARCH64_KEY}"
