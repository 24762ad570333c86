"""One compiled module called from many Python threads at once (a web server's or a data
loader's thread pool): every call returns what one thread gets, and nothing crashes.

Before each thread had its own Relax VM, 8 threads on one module failed with TVM internal
errors (``pc_ < instr_offset.size()``, ``reg < register_file.size()``) and then a segfault."""

from __future__ import annotations

import threading

import torch
from torch import nn

from tests.backends.models import SmallCNN

THREADS, CALLS = 8, 150


def _hammer(fn, inputs, want) -> list[str]:
    """Calls ``fn`` from THREADS threads, CALLS times each, cycling through ``inputs``; returns
    the errors (an exception or a wrong output), empty when all calls agreed with ``want``."""
    errors: list[str] = []
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()  # all threads enter their first call together
        try:
            for k in range(CALLS):
                j = (t + k) % len(inputs)
                got = fn(inputs[j])
                if not torch.equal(got, want[j]):
                    errors.append(f"thread {t} call {k}: output differs from one thread's")
                    return
        except Exception as e:  # noqa: BLE001  (reported below, with the thread)
            errors.append(f"thread {t}: {e!r}"[:300])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_compiled_module_from_eight_threads(tvm_backend):
    gm = torch.fx.symbolic_trace(SmallCNN())
    cm = tvm_backend.compile(gm, "host", example_inputs=[torch.rand(2, 3, 12, 12)])
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(1 + i % 3, 3, 12, 12, generator=g) * 4 - 2 for i in range(6)]
    want = [gm(x)[0] for x in xs]  # the torch integer graph: the module equals it bit for bit
    assert all(torch.equal(cm(x)[0], w) for x, w in zip(xs, want))
    assert _hammer(lambda x: cm(x)[0], xs, want) == []


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_dynamo_backend_from_eight_threads(tvm_backend):
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = _Net().eval()
        calib = [(torch.randn(4, 3, 10, 10),) for _ in range(2)]
        backend = tvm_backend.dynamo_backend(calib, target="host")
        compiled = torch.compile(model, backend=backend)
        xs = [torch.randn(4, 3, 10, 10) for _ in range(4)]
        with torch.no_grad():
            backend.calibrate(compiled, progress=False)
            want = [compiled(x) for x in xs]
            assert [s.served_by for s in backend.report()] == ["tvm"]

            def call(x):
                with torch.no_grad():  # (grad mode is per thread; a guard of the graph)
                    return compiled(x)

            assert _hammer(call, xs, want) == []
    finally:
        torch._dynamo.reset()

