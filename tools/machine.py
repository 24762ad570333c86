"""Facts about the machine a benchmark runs on: CPU model, flags and LLVM name, the ptqpasses
strategy ``host`` gets, library versions, the one-core peak of each instruction
(:mod:`ptqpasses_tools.peak`), thread pinning, and which threads did the work."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ptqpasses_tools.tables import error_line

def set_threads(n: int, cores: list[int]) -> list[int]:
    """n threads for torch, TVM's pool (ORT sessions take theirs when made); pins every thread
    of the process to the first n of ``cores``. Returns the cores used."""
    import tvm

    torch.set_num_threads(n)
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    use = cores[:n]
    if hasattr(os, "sched_setaffinity"):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), use)
            except OSError:  # a thread that just ended
                pass
    return use


def machine() -> dict:
    """CPU model and flags, core count, load, library versions."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": [],
            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu"] in ("", "x86_64"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                             "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
                                 if f in flags]
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    vers = {"torch": torch.__version__}
    for mod in ("tvm", "onnxruntime", "torchao", "onnx", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (not installed)
            vers[mod] = None
    info["versions"] = vers
    try:
        from ptqpasses_backends.tvm import registry, targets
        info["llvm_cpu"] = targets.system_cpu()
        info["strategy"] = registry.why(targets.resolve("host"))
    except Exception:  # noqa: BLE001
        pass
    return info


def thread_ticks() -> dict[int, int]:
    """user + system CPU ticks of each thread of this process (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def busy_threads(ticks: dict[int, int]) -> int | None:
    """Threads that did at least a quarter of the busiest one's CPU work; None when the calls
    were too short to register (ticks are 10 ms)."""
    top = max(ticks.values(), default=0)
    if top < 10:
        return None
    return sum(t >= top / 4 for t in ticks.values())


def measure_peak() -> dict:
    """One-core peaks (GMAC/s) from ptqpasses_tools.peak: the best fp32 and int8 kernels it has."""
    from ptqpasses_tools import peak as peak_tool
    try:
        raw = peak_tool.measure()
    except Exception as e:  # noqa: BLE001  (no compiler: report without % of peak)
        return {"error": error_line(e)}
    out = {"raw": raw}
    for key in ("fp32", "int8"):
        vals = [v for k, v in raw.items() if k.startswith(key)]
        out[key] = max(vals) if vals else None
    return out


def peak_kernels(pk: dict, key: str) -> str:
    """The measured peak kernels of one precision, ``name rate`` each."""
    raw = pk.get("raw") or {}
    return ", ".join(f"{k} {v:.1f}" for k, v in raw.items() if k.startswith(key)) or "none"
