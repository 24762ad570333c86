"""Compiled modules on another machine, over TVM RPC.

A device is named ``host:port:key`` (an RPC tracker and the key its servers registered under,
``python -m tvm.exec.rpc_server --tracker host:port --key key``) or ``host:port`` (one server,
no tracker). ``RemoteModule(compiled, "host:port:key")`` links the module for its target (the
strategy's cross compiler for a cross target), uploads it, and runs it there on torch tensors;
``time`` measures it with the remote clock. ``ptqpasses_backends.tvm.tune(..., rpc=...)``
measures tuning
candidates the same way (MetaSchedule's RPC runner).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import tvm
from tvm import relax

from ptqpasses_backends.tvm.runtime import CompiledModule, export_options


@dataclasses.dataclass(frozen=True)
class RpcDevice:
    """Where a remote device is reached: a tracker and a key, or one server (``key`` None)."""
    host: str
    port: int
    key: Optional[str] = None

    @classmethod
    def parse(cls, text: "str | RpcDevice") -> "RpcDevice":
        if isinstance(text, RpcDevice):
            return text
        parts = str(text).split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit() \
                or (len(parts) == 3 and not parts[2]):
            raise ValueError(f"RPC device {text!r}: expected host:port:key (a tracker and the "
                             f"key its servers registered under) or host:port (one server)")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f":{self.key}" if self.key else "")

    def connect(self, session_timeout: float = 0):
        """An RPC session on one device (through the tracker: the next free server under the
        key, waiting while all are busy)."""
        from tvm import rpc

        try:
            if self.key is None:
                return rpc.connect(self.host, self.port, session_timeout=session_timeout)
            tracker = rpc.connect_tracker(self.host, self.port)
            return tracker.request(self.key, priority=1, session_timeout=session_timeout)
        except Exception as e:  # noqa: BLE001  (TVM raises bare RuntimeErrors / TVMErrors)
            raise ConnectionError(f"cannot reach RPC device {self}: {e}") from e

    def servers(self) -> int:
        """How many servers the tracker lists under the key (1 without a tracker)."""
        if self.key is None:
            return 1
        from tvm import rpc

        try:
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot reach the RPC tracker {self.host}:{self.port}: "
                                  f"{e}") from e
        # (server_info keys read "server:<key>")
        return sum(1 for s in summary.get("server_info", [])
                   if str(s.get("key", "")).split(":", 1)[-1] == self.key)


class RemoteModule:
    """``compiled`` uploaded to an RPC device and callable there on torch tensors.

    Args:
        compiled: A ``CompiledModule`` (any CPU target; a cross target is linked with its
            strategy's cross compiler, which must be installed).
        device: ``host:port:key`` / ``host:port`` or an ``RpcDevice``.

    The session is held until ``close`` (or the end of a ``with`` block): a server serves one
    session at a time.
    """

    def __init__(self, compiled: CompiledModule, device: "str | RpcDevice"):
        if compiled.meta["family"] == "cuda":
            raise NotImplementedError("remote CUDA modules: not supported yet (CPU targets)")
        self.compiled = compiled
        self.device = RpcDevice.parse(device)
        self.session = self.device.connect()
        suffix, kwargs = export_options(compiled.meta, require_so=True)
        with tempfile.TemporaryDirectory(prefix="ptq_remote_") as tmp:
            path = Path(tmp) / f"module{suffix}"
            compiled.executable.export_library(str(path), **kwargs)
            self.session.upload(str(path))
        self._dev = self.session.cpu()
        self._vm = relax.VirtualMachine(self.session.load_module(path.name), self._dev)

    def close(self) -> None:
        """End the session (a server serves one session at a time: the next client waits)."""
        self._vm = self._dev = self.session = None

    def __enter__(self) -> "RemoteModule":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _args(self, args: Sequence[torch.Tensor]):
        self.compiled._check_inputs(args)
        return [tvm.runtime.tensor(np.ascontiguousarray(a.detach().cpu().numpy()), self._dev)
                for a in args]

    def __call__(self, *args: torch.Tensor):
        """The outputs, structured as ``CompiledModule.__call__`` returns them."""
        # (the stateful interface: a tuple of results stays on the device, and get_outputs
        # fetches its tensors one by one; a plain call would return a handle to it)
        self._vm.set_input("main", *self._args(args))
        self._vm.invoke_stateful("main")
        out = self._vm.get_outputs("main")
        outs = [torch.from_numpy(np.array(o.numpy()))
                for o in (out if isinstance(out, (list, tuple)) else [out])]
        return self.compiled._outputs(outs)

    def time(self, *args: torch.Tensor, number: int = 1, repeat: int = 5,
             min_repeat_ms: float = 0) -> list[float]:
        """Seconds per call (``repeat`` timings of ``number`` calls each), measured on the
        device by its own clock."""
        ev = self._vm.time_evaluator("main", self._dev, number=number, repeat=repeat,
                                     min_repeat_ms=min_repeat_ms)
        return [float(t) for t in ev(*self._args(args)).results]
