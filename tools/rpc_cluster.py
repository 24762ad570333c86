"""A TVM RPC tracker and servers on this machine, as processes: for the tests, for
``ptq bench/tune --rpc`` tried locally, and for the README's measurements.

``start_tracker()`` runs ``python -m tvm.exec.rpc_tracker``, ``start_server(tracker=...,
key=...)`` a native ``tvm.exec.rpc_server`` registered with it (``tools.aarch64_device`` starts
the emulated aarch64 one the same way); ``wait_for_servers`` blocks until the tracker lists
them. Each is a ``Service``: its own process group, its log in a temporary file, the port it
bound, ``stop()``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence


def free_port() -> int:
    """A TCP port free on localhost now (the services take the next free one if it is gone)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceError(RuntimeError):
    """A tracker or server that did not come up; the message ends with its log."""


class Service:
    """A started tracker / server process; ``port`` is the one it bound."""

    def __init__(self, proc: subprocess.Popen, log: Path, port: int):
        self.proc, self.log, self.port = proc, log, port

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 5) -> str:
        return "\n  ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(argv: Sequence[str], *, what: str, bound: str = r"bind to [\w.]+:(\d+)",
           env: Optional[Mapping[str, str]] = None, timeout: float = 120) -> Service:
    """Start ``argv`` in its own process group, its output to a log file, and wait until the
    log shows ``bound`` (whose group 1 is the port)."""
    fd, log = tempfile.mkstemp(prefix="ptq_rpc_", suffix=".log")
    proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), stdout=fd,
                            stderr=fd, start_new_session=True)
    os.close(fd)
    service = Service(proc, Path(log), -1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(bound, service.log.read_text(errors="replace"))
        if m:
            service.port = int(m.group(1))
            return service
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    service.stop()
    raise ServiceError(f"{what} did not start within {timeout:.0f} s (exit {proc.poll()}); "
                       f"its log {log} ends:\n  {service.log_tail()}")


def start_tracker(port: int = 9190, host: str = "127.0.0.1") -> Service:
    """``python -m tvm.exec.rpc_tracker`` (needs ``tornado``: the ``rpc`` extra)."""
    return launch([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port",
                   str(port), "--port-end", str(port + 100)], what="the RPC tracker",
                  bound=r"bind to [\w.]+:(\d+)")


def start_server(*, tracker: str, key: str, port: int = 9290,
                 host: str = "127.0.0.1") -> Service:
    """A native ``tvm.exec.rpc_server`` registered with ``tracker`` under ``key``."""
    return launch([sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port",
                   str(port), "--port-end", str(port + 100), "--tracker", tracker, "--key", key],
                  what=f"the RPC server {key!r}")


def wait_for_servers(tracker: str, key: str, count: int, timeout: float = 120) -> None:
    """Block until the tracker lists ``count`` servers under ``key``."""
    from ptqpasses_backends.tvm.remote import RpcDevice

    device = RpcDevice.parse(f"{tracker}:{key}")
    deadline = time.monotonic() + timeout
    while True:
        have = device.servers()
        if have >= count:
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"the tracker {tracker} lists {have} of {count} servers under "
                               f"{key!r} after {timeout:.0f} s")
        time.sleep(0.5)
