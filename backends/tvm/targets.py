"""Named TVM targets, as dicts, with the CPU features each one promises.

String targets (``"llvm -mcpu=..."``) are refused by TVM 0.27 and ``mcpu=native`` silently
falls back to ``generic``, so every target here is a dict and ``host`` asks LLVM for the real
CPU name.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path
from typing import Any, Mapping, Optional

import tvm

_X86 = "x86_64-linux-gnu"
_ARM = "aarch64-linux-gnu"


@dataclasses.dataclass(frozen=True)
class NamedTarget:
    """A target the emitter can serve.

    Attributes:
        name: Registry name, e.g. ``x86-avx512-vnni``.
        family: Emitter family: ``x86``, ``aarch64`` or ``cuda`` (selects packing/schedules).
        spec: The TVM target dict.
        features: LLVM features the target must have (checked with ``target_has_feature``).
    """

    name: str
    family: str
    spec: Mapping[str, Any]
    features: tuple[str, ...] = ()

    def target(self) -> tvm.target.Target:
        """Build the ``tvm.target.Target`` and check its promised features."""
        t = tvm.target.Target(dict(self.spec))
        missing = [f for f in self.features if not has_feature(t, f)]
        if missing:
            raise ValueError(f"target {self.name!r} ({dict(self.spec)}) lacks {missing}")
        return t


def system_cpu() -> str:
    """The host CPU name as LLVM sees it (``znver3``, ``cortex-a76``, ...)."""
    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def has_feature(target: tvm.target.Target, feature: str) -> bool:
    """Whether an llvm target has ``feature`` (``avx512vnni``, ``dotprod``, ``i8mm`` ...)."""
    if target.kind.name != "llvm":
        return False
    return bool(tvm.get_global_func("target.target_has_feature")(feature, target))


def _llvm(triple: str, cpu: str, **extra) -> dict:
    # num-cores is required by MetaSchedule (the tuning issue); harmless otherwise.
    return {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "num-cores": 1, **extra}


#: CPU flags (Linux ``/proc/cpuinfo`` names) -> the LLVM features the kernels depend on.
FLAG_FEATURES = {
    "x86": {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
            "avx512vl": "avx512vl", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni",
            "amx_tile": "amx-tile", "amx_int8": "amx-int8"},
    "aarch64": {"asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"},
}


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The CPU's feature flags as the kernel reports them (``flags`` on x86, ``Features`` on
    aarch64), or None where there is no such file (the CPU name decides then)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def host_mattr(arch: str, cpu: str, flags: Optional[frozenset]) -> list[str]:
    """LLVM ``mattr`` that makes target ``cpu`` have exactly the features ``flags`` show.

    LLVM names a CPU by its model number, which a hypervisor may not match with the features
    it passes through: an Intel Xeon with AMX was called ``rocketlake`` (no AMX), and a VM may
    hide AVX-512 from a CPU whose name implies it. The flags are the truth; the name only
    supplies the scheduling model.
    """
    if flags is None or arch not in FLAG_FEATURES:
        return []
    named = tvm.target.Target(_llvm(_X86 if arch == "x86" else _ARM, cpu))
    mattr = []
    for flag, feature in FLAG_FEATURES[arch].items():
        present, implied = flag in flags, has_feature(named, feature)
        if present and not implied:
            mattr.append(f"+{feature}")
        elif implied and not present:
            mattr.append(f"-{feature}")
    return mattr


@functools.cache
def _host() -> NamedTarget:
    machine = platform.machine().lower()
    arch = {"x86_64": "x86", "amd64": "x86", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if arch is None:
        raise ValueError(f"no TVM host target for machine {machine!r}")
    cpu = system_cpu()
    mattr = host_mattr(arch, cpu, cpu_flags())
    extra = {"mattr": mattr} if mattr else {}
    return NamedTarget("host", arch, _llvm(_X86 if arch == "x86" else _ARM, cpu, **extra))


#: The fixed named targets. ``host`` is resolved on use (it depends on the machine).
TARGETS: dict[str, NamedTarget | None] = {
    "host": None,
    "x86-avx2": NamedTarget("x86-avx2", "x86", _llvm(_X86, "haswell"), ("avx2",)),
    "x86-avx512": NamedTarget(
        "x86-avx512", "x86", _llvm(_X86, "skylake-avx512"), ("avx512f", "avx512bw")),
    "x86-avx512-vnni": NamedTarget(
        "x86-avx512-vnni", "x86", _llvm(_X86, "cascadelake"),
        ("avx512f", "avx512bw", "avx512vnni")),
    "x86-avx-vnni": NamedTarget("x86-avx-vnni", "x86", _llvm(_X86, "alderlake"),
                                ("avx2", "avxvnni")),
    "x86-amx": NamedTarget(
        "x86-amx", "x86", _llvm(_X86, "sapphirerapids"),
        ("avx512f", "avx512bw", "avx512vnni", "amx-tile", "amx-int8")),
    "aarch64-neon": NamedTarget("aarch64-neon", "aarch64", _llvm(_ARM, "cortex-a72"), ("neon",)),
    "aarch64-dotprod": NamedTarget(
        "aarch64-dotprod", "aarch64", _llvm(_ARM, "cortex-a76"), ("dotprod",)),
    "aarch64-i8mm": NamedTarget(
        "aarch64-i8mm", "aarch64", _llvm(_ARM, "neoverse-v1"), ("dotprod", "i8mm")),
    "cuda-sm80": NamedTarget("cuda-sm80", "cuda", {"kind": "cuda", "arch": "sm_80"}),
}

_FAMILY_OF_TRIPLE = {"x86_64": "x86", "aarch64": "aarch64"}


def resolve(target: str | Mapping[str, Any] | NamedTarget = "host") -> NamedTarget:
    """Turn a name, a target dict or a NamedTarget into a checked ``NamedTarget``.

    Raises:
        ValueError: For an unknown name, or a target whose family the emitter cannot serve.
    """
    if isinstance(target, NamedTarget):
        named = target
    elif isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(
                f"unknown TVM target {target!r}; known targets: {sorted(TARGETS)} "
                "(or pass a target dict such as {'kind': 'llvm', 'mtriple': ..., 'mcpu': ...})")
        named = _host() if target == "host" else TARGETS[target]
    elif isinstance(target, Mapping):
        named = NamedTarget(_name_of(target), _family_of(target), dict(target))
    else:
        raise TypeError(f"target must be a name or a dict, got {type(target).__name__}")
    named.target()  # validates the dict and the promised features
    return named


def _name_of(spec: Mapping[str, Any]) -> str:
    return "custom:" + ",".join(f"{k}={v}" for k, v in sorted(spec.items()))


def _family_of(spec: Mapping[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "cuda":
        return "cuda"
    if kind == "llvm":
        arch = str(spec.get("mtriple", "")).split("-")[0]
        if arch in _FAMILY_OF_TRIPLE:
            return _FAMILY_OF_TRIPLE[arch]
        raise ValueError(
            f"the ptq TVM emitter cannot serve llvm triple {spec.get('mtriple')!r}: "
            f"supported architectures are {sorted(_FAMILY_OF_TRIPLE)} (set 'mtriple')")
    raise ValueError(
        f"the ptq TVM emitter cannot serve target kind {kind!r}: supported kinds are "
        "'llvm' (x86_64, aarch64) and 'cuda'")


def runs_here(named: NamedTarget) -> bool:
    """Whether code built for ``named`` can execute on this machine's CPU."""
    if named.family == "cuda" or named.spec.get("kind") != "llvm":
        return False
    host = _host()
    if named.family != host.family:
        return False
    t = named.target()
    host_t = host.target()
    # Every feature the target's CPU has must be present on the host.
    probe = {f for features in FLAG_FEATURES.values() for f in features.values()}
    return all(has_feature(host_t, f) or not has_feature(t, f) for f in sorted(probe))
