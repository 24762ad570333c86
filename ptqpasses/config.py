"""QuantConfig: the user's quantization intent, with per-node overrides.

Resolution order for a node (first hit wins): ``keep_float``, ``by_node_regex``,
``by_module_name`` (innermost module first), ``by_module_type`` (innermost first), then the
global ``activation`` / ``weight`` specs. An override value of ``None`` keeps the node in
float; a :class:`Scheme` replaces both specs for that node.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch.fx as fx

from ptqpasses.meta import QSpec

#: The default activation observer is MSE: on the observer zoo (9 real-weight models, cost
#: policy) it had the best mean rank and the smallest worst-case gap on the models it was
#: chosen on, and the smallest worst-case gap on the held-out ones (README, "Which activation
#: observer"); histogram at the 99.99 percentile, the earlier default, lost 11 dB on MiniLM.
#: Linears over tokens quantize their input per token at run time (``QSpec.dynamic``): on the
#: same zoo, against static linears, MiniLM-L6 20.2 -> 25.8 dB without any int16 raise (the
#: tune half), MiniLM-L3 22.8 -> 31.8 dB (held out), no model worse (README, "Per-token").
DEFAULT_ACTIVATION = QSpec(dtype="uint8", symmetric=False, observer="mse", dynamic=True)
DEFAULT_WEIGHT = QSpec(dtype="int8", symmetric=True, per_channel=True, observer="minmax")


@dataclass(frozen=True)
class Scheme:
    """The specs one node is quantized with."""

    activation: QSpec = DEFAULT_ACTIVATION
    weight: QSpec = DEFAULT_WEIGHT


Override = Optional[Scheme]


class ConfigError(ValueError):
    """A QuantConfig that does not fit the model it is applied to."""


#: How much of the graph is integer (``QuantConfig.policy``):
#: ``"cost"``: conv / linear / matmul compute on integers; their outputs are quantized only
#: where an integer op reads them (else the op hands its dequantized accumulator to its float
#: consumers); any other integer-set op (add, mul, cat, pools, mean, tables) is integer only
#: where an integer op reads its output, so it removes a float <-> integer conversion instead
#: of adding one. ``"all"``: every op of the integer set is integer with an 8-bit output.
POLICIES = {"cost": "integer where an integer op reads the result",
            "all": "every op of the integer set, outputs requantized"}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        activation: spec for activations (per-tensor; uint8 asymmetric by default).
        weight: spec for conv/linear weights (int8 symmetric per-channel by default).
        by_module_name: module path (``"layer1.0.conv1"``) -> Scheme, or None for float.
        by_module_type: class or qualified class name (``"torch.nn.Linear"``/``"Linear"``)
            -> Scheme or None.
        by_node_regex: regex on fx node names -> Scheme or None.
        keep_float: node names or module paths that stay in float.
        policy: ``"cost"`` (default) or ``"all"``: see :data:`POLICIES`.
    """

    activation: QSpec = DEFAULT_ACTIVATION
    weight: QSpec = DEFAULT_WEIGHT
    by_module_name: Mapping[str, Override] = field(default_factory=dict)
    by_module_type: Mapping[Union[str, type], Override] = field(default_factory=dict)
    by_node_regex: Mapping[str, Override] = field(default_factory=dict)
    keep_float: tuple[str, ...] = ()
    policy: str = "cost"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.activation.per_channel:
            raise ConfigError("activations are quantized per tensor; per_channel=True is only "
                              "supported for weights")
        if self.weight.dtype != "int8":
            raise ConfigError(f"weights are int8 in the integer operator set, got "
                              f"{self.weight.dtype!r}")
        for pattern in self.by_node_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"by_node_regex: invalid regex {pattern!r}: {e}") from None

    # -- resolution -------------------------------------------------------------------

    def resolve(self, node: fx.Node) -> tuple[Override, str]:
        """Returns ``(scheme or None, why)`` for a node."""
        modules = _module_stack(node)
        if node.name in self.keep_float:
            return None, f"keep_float names node {node.name!r}"
        for path, _ in modules:
            if path in self.keep_float:
                return None, f"keep_float names module {path!r}"
        for pattern, value in self.by_node_regex.items():
            if re.fullmatch(pattern, node.name):
                return value, f"by_node_regex {pattern!r}"
        for path, _ in modules:
            if path in self.by_module_name:
                return self.by_module_name[path], f"by_module_name {path!r}"
        for path, type_name in modules:
            for key, value in self.by_module_type.items():
                if _type_matches(key, type_name):
                    return value, f"by_module_type {_type_key(key)!r}"
        return Scheme(self.activation, self.weight), "global"

    def validate(self, graph: fx.Graph) -> None:
        """Raises ConfigError when a name or regex refers to nothing in ``graph``."""
        node_names = {n.name for n in graph.nodes}
        module_paths = {path for n in graph.nodes for path, _ in _module_stack(n)}
        for name in self.by_module_name:
            if name not in module_paths:
                raise ConfigError(_missing("by_module_name", "module", name, module_paths))
        for name in self.keep_float:
            if name not in module_paths and name not in node_names:
                raise ConfigError(_missing("keep_float", "module or node", name,
                                           module_paths | node_names))
        for pattern in self.by_node_regex:
            if not any(re.fullmatch(pattern, n) for n in node_names):
                raise ConfigError(f"by_node_regex {pattern!r} matches no node of the graph")

    # -- serialisation (pipeline text, recipes) ---------------------------------------

    def to_dict(self) -> dict:
        def override(v):
            return None if v is None else {"activation": dataclasses.asdict(v.activation),
                                           "weight": dataclasses.asdict(v.weight)}
        return {
            "activation": dataclasses.asdict(self.activation),
            "weight": dataclasses.asdict(self.weight),
            "by_module_name": {k: override(v) for k, v in self.by_module_name.items()},
            "by_module_type": {_type_key(k): override(v) for k, v in self.by_module_type.items()},
            "by_node_regex": {k: override(v) for k, v in self.by_node_regex.items()},
            "keep_float": list(self.keep_float),
            "policy": self.policy,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantConfig":
        def override(v):
            return None if v is None else Scheme(QSpec(**v["activation"]), QSpec(**v["weight"]))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(
            activation=QSpec(**d.get("activation", dataclasses.asdict(DEFAULT_ACTIVATION))),
            weight=QSpec(**d.get("weight", dataclasses.asdict(DEFAULT_WEIGHT))),
            by_module_name={k: override(v) for k, v in d.get("by_module_name", {}).items()},
            by_module_type={k: override(v) for k, v in d.get("by_module_type", {}).items()},
            by_node_regex={k: override(v) for k, v in d.get("by_node_regex", {}).items()},
            keep_float=tuple(d.get("keep_float", ())),
            # (dicts written before the cost policy existed quantized every op: "all")
            policy=d.get("policy", "all"),
        )


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, qualified type name) of the modules that produced ``node``, innermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, str(t)) for path, t in reversed(list(stack.values())) if path]


def _type_key(key: Union[str, type]) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _type_matches(key: Union[str, type], type_name: str) -> bool:
    if isinstance(key, type):
        return type_name == _type_key(key)
    return type_name == key or type_name.rsplit(".", 1)[-1] == key or (
        key.startswith("torch.nn.") and type_name.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]
        and type_name.startswith("torch.nn."))


def _missing(option: str, what: str, name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{option}: the model has no {what} named {name!r}{hint}"
