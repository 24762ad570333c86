"""The strategy registry: which :class:`~ptqpasses_backends.tvm.strategy.Strategy` a target gets.

The choice is made from the target's features (for ``host``: the CPU's own flags, see
``targets.host_mattr``), best instruction first; ``why`` says what decided it. Adding a
family is one folder exporting its strategy and one entry in :data:`ORDER`.
"""

from __future__ import annotations

from typing import Union

import tvm

from ptqpasses_backends.tvm import aarch64, amx, cuda, x86
from ptqpasses_backends.tvm.strategy import Strategy
from ptqpasses_backends.tvm.targets import NamedTarget, has_feature

#: Per architecture: (strategy, LLVM features it needs), best first; the last one needs none.
ORDER: dict[str, list[tuple[Strategy, tuple[str, ...]]]] = {
    "x86": [
        (amx.AMX, ("avx512f", "avx512bw", "avx512vnni", "amx-tile", "amx-int8")),
        (x86.AVX512_VNNI, ("avx512f", "avx512bw", "avx512vnni")),
        (x86.AVX_VNNI, ("avx2", "avxvnni")),
        (x86.AVX2, ("avx2",)),
        (x86.GENERIC, ()),
    ],
    "aarch64": [(aarch64.DOTPROD, ("dotprod",)), (aarch64.NEON, ())],
    "cuda": [(cuda.CUDA, ())],
}


def _select(target: Union[NamedTarget, tvm.target.Target]) -> tuple[Strategy, tuple[str, ...]]:
    if isinstance(target, NamedTarget):
        arch, tgt = target.family, target.target()
    else:
        tgt = target
        arch = "cuda" if tgt.kind.name == "cuda" else (
            "aarch64" if str(tgt.attrs.get("mtriple", "")).startswith("aarch64") else "x86")
    if arch not in ORDER:
        raise ValueError(f"no strategy for architecture {arch!r}; known: {sorted(ORDER)}")
    for strategy, needs in ORDER[arch]:
        if all(has_feature(tgt, f) for f in needs):
            return strategy, needs
    raise AssertionError("unreachable: the last strategy of each architecture needs nothing")


def strategy_for(target: Union[NamedTarget, tvm.target.Target]) -> Strategy:
    """The strategy of ``target`` (a NamedTarget, or a ``tvm.target.Target``)."""
    return _select(target)[0]


def why(target: Union[NamedTarget, tvm.target.Target]) -> str:
    """One line: which strategy ``target`` gets and the features that decided it."""
    strategy, needs = _select(target)
    has = f"target has {', '.join(needs)}" if needs else "no dot-product feature needed"
    return f"{strategy.name} ({has}): {strategy.summary}"


def all_strategies() -> list[Strategy]:
    """Every registered strategy (tests, documentation)."""
    return [s for entries in ORDER.values() for s, _ in entries]
