"""An emulated aarch64 board on this x86 machine: a TVM RPC server under qemu-user.

Every part comes from Debian packages and PyPI wheels (../shared/TVM_NOTES.md, "aarch64 without
an ARM machine"):

- ``qemu-user-static`` runs aarch64 Linux binaries (``qemu-aarch64-static -L <sysroot>``; no
  binfmt registration needed), ``gcc-aarch64-linux-gnu`` links the modules built here;
- an aarch64 Python 3.11 and its libraries, unpacked from Debian's ``arm64`` packages into a
  sysroot folder (nothing installed system-wide for arm64);
- TVM and its Python dependencies as ``manylinux_2_28_aarch64`` wheels, unzipped into one
  folder on the emulated Python's path.

``python -m tools.aarch64_device setup`` does all of it, idempotently: the result lives in a
cache folder (``$PTQ_AARCH64_CACHE``, default ``~/.cache/ptqpasses/aarch64``) and a second run
checks it and returns. ``python -m tools.aarch64_device serve --tracker HOST:PORT --key KEY``
starts the RPC server (``tvm.exec.rpc_server``) under emulation, registered with a tracker or
listening on ``--port``. ``QEMU_CPU=max`` gives the emulated CPU dotprod, i8mm and SVE, so
every aarch64 strategy's kernels run there; emulated timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

#: Debian ``arm64`` packages of the sysroot: Python 3.11 and what it and TVM load.
DEB_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
    "libstdc++6", "libgcc-s1", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0",
    "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1",
    "libcrypt1", "libdb5.3", "libgomp1",
)
#: Host packages: the emulator and the cross compiler.
HOST_PACKAGES = ("qemu-user-static", "gcc-aarch64-linux-gnu")
#: aarch64 wheels of the RPC server's Python side (TVM pinned to the host's versions: a
#: module built here must load there).
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "numpy", "ml_dtypes",
          "typing_extensions", "psutil", "cloudpickle")
PYTHON_VERSION = "3.11"
QEMU = "qemu-aarch64-static"
CROSS_CC = "aarch64-linux-gnu-gcc"
#: Written last by ``setup``: its presence means the cache is complete.
_STAMP = "ready"


class DeviceSetupError(RuntimeError):
    """The emulated device cannot be set up here; the message says what is missing."""


def cache_dir() -> Path:
    return Path(os.environ.get("PTQ_AARCH64_CACHE",
                               Path.home() / ".cache" / "ptqpasses" / "aarch64"))


def sysroot(cache: Optional[Path] = None) -> Path:
    return (cache or cache_dir()) / "sysroot"


def site_dir(cache: Optional[Path] = None) -> Path:
    return (cache or cache_dir()) / "site"


def python_binary(cache: Optional[Path] = None) -> Path:
    return sysroot(cache) / "usr" / "bin" / f"python{PYTHON_VERSION}"


def is_ready(cache: Optional[Path] = None) -> bool:
    """True when ``setup`` finished into ``cache`` and the host tools are installed."""
    cache = cache or cache_dir()
    return ((cache / _STAMP).exists() and launcher(cache).exists()
            and shutil.which(QEMU) is not None and shutil.which(CROSS_CC) is not None)


def _run(cmd: Sequence[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DeviceSetupError(f"{what} failed ({' '.join(cmd[:4])} ...: exit "
                               f"{proc.returncode}):\n  " + "\n  ".join(tail))
    return proc


def _host_tools(log) -> None:
    """qemu-user-static and the cross compiler, from apt when missing (root only)."""
    if shutil.which(QEMU) and shutil.which(CROSS_CC):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise DeviceSetupError(
            f"{QEMU} and {CROSS_CC} are needed: install them (Debian/Ubuntu: "
            f"apt-get install {' '.join(HOST_PACKAGES)}) and rerun")
    log(f"installing {' '.join(HOST_PACKAGES)} (apt)")
    _run(["apt-get", "update", "-qq"], "apt-get update")
    _run(["apt-get", "install", "-y", "-qq", *HOST_PACKAGES], "apt-get install",
         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _arm64_sources(log) -> None:
    """Register arm64 as a foreign architecture so ``apt-get download`` finds its packages."""
    have = _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split()
    if "arm64" in have:
        return
    if os.geteuid() != 0:
        raise DeviceSetupError("arm64 is not a dpkg architecture here: run as root, or "
                               "`dpkg --add-architecture arm64 && apt-get update` first")
    log("dpkg --add-architecture arm64; apt-get update")
    _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture")
    _run(["apt-get", "update", "-qq"], "apt-get update")


def _sysroot(cache: Path, log) -> None:
    root = sysroot(cache)
    if python_binary(cache).exists():
        return
    _arm64_sources(log)
    with tempfile.TemporaryDirectory(prefix="ptq_arm64_debs_") as tmp:
        log(f"apt-get download {len(DEB_PACKAGES)} arm64 packages")
        _run(["apt-get", "download", "-qq", *(f"{p}:arm64" for p in DEB_PACKAGES)],
             "apt-get download", cwd=tmp)
        part = root.with_name(root.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(part)], f"dpkg -x {deb.name}")
        shutil.rmtree(root, ignore_errors=True)
        part.rename(root)


def _site(cache: Path, log) -> None:
    site = site_dir(cache)
    if (site / "tvm").is_dir() and (site / "numpy").is_dir():
        return
    with tempfile.TemporaryDirectory(prefix="ptq_arm64_wheels_") as tmp:
        log(f"pip download {len(WHEELS)} aarch64 wheels")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              "--platform", "manylinux_2_28_aarch64", "--python-version", PYTHON_VERSION,
              "-d", tmp, *WHEELS], "pip download (aarch64 wheels)")
        part = site.with_name(site.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(part)
        shutil.rmtree(site, ignore_errors=True)
        part.rename(site)


def environment(cache: Optional[Path] = None) -> dict:
    """The environment of an emulated aarch64 process (qemu's library prefix and CPU, the
    wheels on the Python path)."""
    cache = cache or cache_dir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV"))}
    env.update(QEMU_LD_PREFIX=str(sysroot(cache)), QEMU_CPU="max",
               PYTHONPATH=str(site_dir(cache)), PYTHONNOUSERSITE="1", TVM_NUM_THREADS="1")
    return env


def launcher(cache: Optional[Path] = None) -> Path:
    """A host shell script that runs the emulated Python: the aarch64 Python's own
    ``sys.executable`` (``-0``), so the worker processes it starts (TVM's RPC server runs its
    sessions in a ``PopenWorker`` of ``sys.executable``) run under qemu too, without binfmt."""
    return sysroot(cache) / "usr" / "bin" / f"python{PYTHON_VERSION}-qemu"


def _write_launcher(cache: Path) -> None:
    root, qemu = sysroot(cache), shutil.which(QEMU) or QEMU
    path = launcher(cache)
    path.write_text(f'#!/bin/sh\nexec "{qemu}" -0 "$0" -L "{root}" '
                    f'"{python_binary(cache)}" "$@"\n')
    path.chmod(0o755)


def python_command(args: Sequence[str], cache: Optional[Path] = None) -> list[str]:
    """argv running the emulated Python with ``args``."""
    return [str(launcher(cache)), *args]


def setup(cache: Optional[Path] = None, log=print) -> Path:
    """Set up (or check) the emulated device in ``cache``; returns the cache folder.

    Raises:
        DeviceSetupError: a step failed or needs root; the message names it.
    """
    cache = cache or cache_dir()
    if is_ready(cache):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _STAMP).unlink(missing_ok=True)
    _host_tools(log)
    _sysroot(cache, log)
    _site(cache, log)
    _write_launcher(cache)
    log("checking: import tvm under emulation (~15 s)")
    out = _run(python_command(["-c", "import platform, subprocess, sys, tvm; print("
                               "platform.machine(), tvm.__version__, subprocess.check_output("
                               "[sys.executable, '-c', 'import platform; "
                               "print(platform.machine())'], text=True).strip())"], cache),
               "import tvm under qemu", env=environment(cache), timeout=600).stdout.split()
    if out[:1] != ["aarch64"] or out[-1:] != ["aarch64"]:
        raise DeviceSetupError(f"the emulated Python reports {out}, not aarch64")
    (cache / _STAMP).write_text(" ".join(out) + "\n")
    log(f"ready: {cache} ({' '.join(out)})")
    return cache


def server_command(*, host: str = "127.0.0.1", port: int = 9190, port_end: Optional[int] = None,
                   tracker: Optional[str] = None, key: str = "aarch64-emulated",
                   cache: Optional[Path] = None) -> list[str]:
    """argv of ``tvm.exec.rpc_server`` under emulation."""
    args = ["-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port),
            "--port-end", str(port_end or port + 100)]
    if tracker:
        args += ["--tracker", tracker, "--key", key]
    return python_command(args, cache)


def start_server(cache: Optional[Path] = None, *, timeout: float = 300, **kw):
    """Start the emulated RPC server (``server_command``'s arguments) and wait until it has
    bound its port (importing TVM under emulation takes 15-60 s): a ``tools.rpc_cluster``
    ``Service`` (``.port``, ``.stop()``)."""
    from ptqpasses_tools.rpc_cluster import launch

    cache = cache or cache_dir()
    if not is_ready(cache):
        raise DeviceSetupError(f"the emulated aarch64 device is not set up in {cache}: run "
                               f"`python -m tools.aarch64_device setup`")
    return launch(server_command(cache=cache, **kw), env=environment(cache), timeout=timeout,
                  what="the emulated aarch64 RPC server")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.aarch64_device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install / check the emulated device (idempotent)")
    s.add_argument("--cache", type=Path, default=None)
    v = sub.add_parser("serve", help="run the aarch64 TVM RPC server under emulation")
    v.add_argument("--cache", type=Path, default=None)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=9190)
    v.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    v.add_argument("--key", default="aarch64-emulated", help="device key at the tracker")
    args = p.parse_args(argv)
    try:
        cache = setup(args.cache)
    except DeviceSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "setup":
        return 0
    cmd = server_command(host=args.host, port=args.port, tracker=args.tracker, key=args.key,
                         cache=cache)
    os.execvpe(cmd[0], cmd, environment(cache))


if __name__ == "__main__":
    sys.exit(main())
