"""``CompiledModule``: run a compiled integer graph on torch tensors; save and load it.

On disk a module is two files: ``<stem>.so`` (or ``.tar`` for targets that cannot be linked
here) and ``<stem>.json`` holding the target, versions, input/output specs and the SHA-256 of
the library, so a corrupted or mismatched pair is refused with a clear error before TVM
touches it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
import tvm
from tvm import relax

from ptqpasses_backends.tvm import amx
from ptqpasses_backends.tvm.emit import TensorSpec
from ptqpasses_backends.tvm.targets import NamedTarget, runs_here, system_cpu
from ptqpasses.files import atomic_path, atomic_write_text

FORMAT = "ptqpasses-tvm-module/1"


class LoadError(RuntimeError):
    """A saved module that cannot be restored (missing, corrupted or mismatched)."""


def versions() -> dict:
    """Versions that must match between save and load."""
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "torch": torch.__version__}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stem(path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".so", ".json", ".tar") else p


class CompiledModule:
    """A compiled integer graph, callable on torch tensors.

    Args:
        lib: The built ``VMExecutable`` or a loaded runtime module.
        meta: Target / spec metadata (see ``save``).
    """

    def __init__(self, lib, meta: dict):
        self._lib = lib
        self.meta = meta
        self.inputs = [TensorSpec.from_json(d) for d in meta["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in meta["outputs"]]
        # One Relax VM per calling thread: a VM holds its frames and registers, so one VM
        # shared by threads corrupts itself; VMs over one executable share its code and
        # constants, and independent callers never wait on each other.
        self._local = threading.local()
        spec = meta.get("output_treespec")
        self._treespec = None if spec is None else pytree.treespec_loads(spec)

    @property
    def target(self) -> str:
        return self.meta["target"]

    @property
    def executable(self):
        """The Relax VM executable (or loaded runtime module), for tools that drive a
        ``relax.VirtualMachine`` themselves (``tools/profile.py``)."""
        return self._lib

    def _device(self):
        return tvm.cuda() if self.meta["family"] == "cuda" else tvm.cpu()

    def __call__(self, *args: torch.Tensor):
        if not self.meta.get("runnable", True):
            raise RuntimeError(f"module built for {self.target!r} cannot run on this machine")
        args = tuple(_as_tensor(a, i) for i, a in enumerate(args))
        self._check_inputs(args)
        main = getattr(self._local, "main", None)
        if main is None:
            if amx.needs_permission(self.meta):
                _request_amx()
            main = self._local.main = relax.VirtualMachine(self._lib, self._device())["main"]
        if self.meta["family"] == "cuda":
            dev = self._device()
            tvm_args = [tvm.runtime.tensor(a.detach().cpu().contiguous().numpy(), dev)
                        for a in args]
            outs = [torch.from_numpy(np.asarray(r.numpy())) for r in main(*tvm_args)]
        else:
            # CPU: no copies either way (DLPack); the VM allocates fresh outputs per call
            outs = [torch.from_dlpack(r) for r in main(*map(_cpu_arg, args))]
        return self._outputs(outs)

    def _outputs(self, outs: list):
        """The flat outputs in the structure of the graph's output (a tuple without one)."""
        if self._treespec is None:
            return tuple(outs)
        return pytree.tree_unflatten(outs, self._treespec)

    def _check_inputs(self, args: Sequence[torch.Tensor]) -> None:
        if len(args) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(args)}")
        bound: dict[str, int] = {}
        for i, (a, spec) in enumerate(zip(args, self.inputs)):
            dt = str(a.dtype).replace("torch.", "")
            ok_shape = len(a.shape) == len(spec.shape) and all(
                isinstance(s, str) or s == d for s, d in zip(spec.shape, a.shape))
            if dt != spec.dtype or not ok_shape:
                raise ValueError(f"input {i}: expected {spec.dtype}{list(spec.shape)}, "
                                 f"got {dt}{list(a.shape)}")
            for s, d in zip(spec.shape, a.shape):
                if isinstance(s, str) and bound.setdefault(s, int(d)) != int(d):
                    raise ValueError(f"input {i}: dim {s!r} is {int(d)} here but "
                                     f"{bound[s]} in an earlier input (inputs share it)")

    def source(self, fmt: str = "asm") -> str:
        """Generated code of every kernel module: ``asm`` / ``ll`` for LLVM targets, ``cuda``
        (alias ``cu``) for the CUDA kernels' source."""
        fmt = "cuda" if fmt == "cu" else fmt
        lib = self._lib.mod if hasattr(self._lib, "mod") else self._lib
        texts, stack = [], [lib]
        while stack:
            m = stack.pop()
            stack.extend(m.imports)
            try:
                texts.append(m.inspect_source(fmt))
            except Exception:  # noqa: BLE001  (modules without that format)
                pass
        return "\n".join(texts)

    def save(self, path) -> Path:
        """Write ``<stem>.so`` (``.tar`` for cross targets) and ``<stem>.json``; returns the
        library path."""
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        suffix, kwargs = export_options(self.meta)
        lib_path = stem.with_suffix(suffix)
        # each file written beside itself and renamed over the old one: a save killed or
        # failing half-way leaves the old files (a new library beside the old metadata is
        # refused by load: the metadata holds the library's hash)
        with atomic_path(lib_path) as tmp:
            self._lib.export_library(str(tmp), **kwargs)
            digest = _sha256(tmp)
        meta = dict(self.meta, format=FORMAT, library=lib_path.name, sha256=digest,
                    versions=versions())
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True))
        return lib_path


def export_options(meta: dict, *, require_so: bool = False) -> tuple[str, dict]:
    """(suffix, ``export_library`` keyword arguments) for a module of ``meta``: a ``.so`` linked
    by the host compiler, or by the strategy's cross compiler for a cross target; a ``.tar`` of
    objects for CUDA and for a cross target whose compiler is not installed (``require_so``:
    raise instead, saying what to install)."""
    cross_cc = meta.get("cross_compiler") if meta.get("cross", False) else None
    if cross_cc:  # (the strategy's cross compiler links a .so; without it, a .tar)
        cc = shutil.which(cross_cc)
        if cc:
            from tvm.support import cc as _cc  # (tvm.contrib.cc before TVM 0.27)

            return ".so", {"fcompile": _cc.cross_compiler(cc)}
        if require_so:
            raise RuntimeError(
                f"linking a module for {meta['target']!r} needs the cross compiler "
                f"{cross_cc!r}, which is not on PATH (Debian/Ubuntu: apt-get install "
                f"gcc-{cross_cc.removesuffix('-gcc')})")
        return ".tar", {}
    if meta["family"] == "cuda":
        return ".tar", {}
    return ".so", {}


def _as_tensor(a: Any, i: int) -> torch.Tensor:
    """Inputs are torch tensors; a numpy array is taken as one (shared, not copied)."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise TypeError(f"input {i}: expected a torch.Tensor (or numpy array), got "
                    f"{type(a).__name__}")

#: Byte alignment TVM assumes for tensor data (``kAllocAlignment``): a torch tensor whose data
#: is aligned goes in without a copy.
_ALIGNMENT = 64


def _cpu_arg(a: torch.Tensor):
    """A CPU torch tensor as a TVM tensor, shared through DLPack when it is contiguous and
    aligned (a fresh torch tensor is), else a contiguous aligned copy."""
    a = a.detach()
    if a.device.type != "cpu":
        a = a.cpu()
    if not a.is_contiguous() or a.data_ptr() % _ALIGNMENT:
        a = a.contiguous().clone(memory_format=torch.contiguous_format)
        if a.data_ptr() % _ALIGNMENT:
            return tvm.runtime.tensor(a.numpy(), tvm.cpu())
    return tvm.runtime.from_dlpack(a)


def _request_amx() -> None:
    """Ask Linux for the AMX tile state (once per process; idempotent), or say why not."""
    try:
        amx.kernels.request_amx_permission()
    except OSError as e:
        raise RuntimeError(f"this module runs AMX kernels, and the OS refused this process the "
                           f"AMX tile state ({e}); Linux 5.16 or newer is needed, or compile "
                           f"for 'x86-avx512-vnni'") from e


def load(path) -> CompiledModule:
    """Restore a module written by ``CompiledModule.save`` (``path``: stem, ``.so`` or ``.json``).

    Raises:
        LoadError: Missing files, unreadable metadata, a library whose hash differs from the
            metadata (corrupted or swapped), or different TVM / tvm-ffi versions.
    """
    stem = _stem(path)
    meta_path = stem.with_suffix(".json")
    if not meta_path.exists():
        raise LoadError(f"no metadata file {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"corrupted metadata {meta_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{meta_path} is not a {FORMAT} metadata file")
    for key in ("library", "sha256", "versions", "inputs", "outputs", "family", "target"):
        if key not in meta:
            raise LoadError(f"metadata {meta_path} lacks {key!r}")
    lib_path = stem.parent / meta["library"]
    if not lib_path.exists():
        raise LoadError(f"library {lib_path} named by {meta_path} is missing")
    digest = _sha256(lib_path)
    if digest != meta["sha256"]:
        raise LoadError(f"library {lib_path} does not match its metadata (sha256 {digest[:12]} "
                        f"!= {meta['sha256'][:12]}): corrupted or from another build")
    now = versions()
    for key in ("tvm", "tvm_ffi"):
        if meta["versions"].get(key) != now[key]:
            raise LoadError(f"{lib_path} was built with {key} {meta['versions'].get(key)}, "
                            f"this process has {now[key]}")
    # Re-checked here, not trusted from the file: the module may come from another machine.
    named = NamedTarget(meta["target"], meta["family"], meta.get("target_spec", {}))
    if lib_path.suffix != ".so" or not runs_here(named):
        raise LoadError(f"{lib_path} was built for {meta['target']!r} "
                        f"({meta.get('target_spec')}), which cannot be loaded for execution on "
                        f"this machine (CPU {system_cpu()!r})")
    try:
        lib = tvm.runtime.load_module(str(lib_path))
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"TVM could not load {lib_path}: {e}") from e
    return CompiledModule(lib, meta)
