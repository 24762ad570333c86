"""Graph facts kept in ``node.meta``: the keys, their value types, and accessors.

Every pass reads and writes quantization facts through these functions only, so the keys
live in one place and ``node.meta`` is the single store (no state on the GraphModule, no
side tables keyed by node name).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

QSPEC = "ptq.qspec"          # NodeQuant: what Annotate decided for this node
QPARAMS = "ptq.qparams"      # QParams of the node's (integer) output, after calibration
OBSERVED = "ptq.observed"    # on an observer call: name of the node whose output it watches
SOURCE = "ptq.source"        # name of the node in the float graph this node computes

_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16}


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: integer type, range, symmetry, granularity, observer.

    ``reduce_range`` drops one bit of the range (uint8 ``[0, 127]``, int8 ``[-64, 63]``, or
    ``[-63, 63]`` symmetric), as PyTorch's ``reduce_range`` does. The integer operators are
    unchanged (the range is the ``qmin``/``qmax`` of every op writing the tensor); backends
    use it to prove that a pair of u8 x s8 products fits int16, which lets x86 without VNNI
    run the fast ``vpmaddubsw`` dot product exactly (see backends/tvm/x86/avx2.py).

    ``dynamic`` (activations of a ``linear`` over tokens, an input ``[..., tokens, features]``
    of rank 3 or more): per-token quantization at run time, each row of the input with its
    own uint8 scale and zero point from its own min / max (``ptq.linear_dynamic``); nothing is
    observed for it, and the other fields but ``dtype`` (uint8) do not apply. On any other op
    (a linear over ``[batch, features]`` included) the spec reads as the static one
    (``static()``). The default activation spec has it (``config.DEFAULT_ACTIVATION``).
    """

    dtype: str = "uint8"
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0
    observer: str = "mse"  # (chosen by the observer zoo: README, "Which activation observer")
    percentile: float = 99.99
    reduce_range: bool = False
    dynamic: bool = False

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"QSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.dynamic and (self.dtype != "uint8" or self.per_channel):
            raise ValueError("QSpec(dynamic=True): per-token activations are uint8 and per "
                             f"row, got dtype {self.dtype!r}, per_channel={self.per_channel}")

    def static(self) -> "QSpec":
        """This spec without ``dynamic`` (what ops other than linear read it as)."""
        return dataclasses.replace(self, dynamic=False) if self.dynamic else self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def qrange(self) -> tuple[int, int]:
        info = torch.iinfo(self.torch_dtype)
        lo, hi = info.min, info.max
        if self.reduce_range:
            lo, hi = lo // 2, hi // 2  # uint8 [0, 127]; int8 [-64, 63]; int16 [-16384, 16383]
        if self.symmetric and lo < 0:
            return lo + 1, hi  # restricted range: symmetric around zero
        return lo, hi


class Role(enum.StrEnum):
    """What Annotate decided a node is (``NodeQuant.role``): a closed set. A StrEnum, so a
    role compares equal to its value (``Role.COMPUTE == "compute"``)."""

    INPUT = "input"         # a placeholder or constant whose output is observed
    COMPUTE = "compute"     # lowered to a ptq op
    FUSED = "fused"         # an activation folded into the clamp of ``fused_into``
    SHARE = "share"         # passes the qparams of its first input through
    FLOAT = "float"         # stays in float; ``reason`` says why
    OBSERVER = "observer"   # an observer call inserted by InsertObservers


@dataclass(frozen=True)
class NodeQuant:
    """Annotate's decision for one node.

    Attributes:
        role: a :class:`Role` (a string of the set is accepted and converted; any other
            value raises).
        output: spec of the observed output, or None when not observed here.
        weight: spec of the weight input (conv / linear).
        fused_into: name of the compute node whose clamp absorbs this activation.
        reason: for role "float", why (the coverage report's reason: the one place it is
            kept); for a float output, which rule decided.
        float_output: a "compute" node (conv / linear / matmul) whose consumers are all
            float: it computes on integers and hands its dequantized accumulator
            ``float32(acc) * s_x * s_w`` straight to them (no output quantization).
        dynamic: a "compute" linear whose input is quantized per token at run time
            (``QSpec.dynamic``): it reads a float tensor, nothing observes it for this node.
    """

    role: Role
    output: Optional[QSpec] = None
    weight: Optional[QSpec] = None
    fused_into: Optional[str] = None
    reason: str = ""
    float_output: bool = False
    dynamic: bool = False

    def __post_init__(self):
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise ValueError(f"NodeQuant: unknown role {self.role!r}; one of "
                             f"{', '.join(r.value for r in Role)}") from None

    def replace(self, **kw) -> "NodeQuant":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization parameters of an integer tensor."""

    scale: float
    zero_point: int
    dtype: str
    qmin: int
    qmax: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else _DTYPES[self.dtype]


#: The reason (coverage report) of the float add that gives a per-token linear
#: (``ptq.linear_dynamic``) its bias: the only float node lowering writes itself.
PER_TOKEN_BIAS = "the float bias of per-token linear"

#: The output "parameters" of a float-output integer op (``NodeQuant.float_output``): scale 1,
#: so its multiplier is ``s_x * s_w``; no zero point or clamp; float32.
FLOAT_OUTPUT = QParams(1.0, 0, "float32", 0, 0)


def get_qspec(node: fx.Node) -> Optional[NodeQuant]:
    return node.meta.get(QSPEC)


def set_qspec(node: fx.Node, value: NodeQuant) -> None:
    node.meta[QSPEC] = value


def get_qparams(node: fx.Node) -> Optional[QParams]:
    return node.meta.get(QPARAMS)


def set_qparams(node: fx.Node, value: QParams) -> None:
    node.meta[QPARAMS] = value


def observed_node(node: fx.Node) -> Optional[str]:
    return node.meta.get(OBSERVED)


def set_observed_node(node: fx.Node, name: str) -> None:
    node.meta[OBSERVED] = name


def source(node: fx.Node) -> str:
    """The float-graph node this node's value corresponds to (defaults to its own name)."""
    return node.meta.get(SOURCE, node.name)


def set_source(node: fx.Node, name: str) -> None:
    node.meta[SOURCE] = name


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')

#: fx meta keys that say where in the user's code a node comes from (torch.export sets them).
LOCATION_KEYS = ("nn_module_stack", "stack_trace")


def copy_location(dst: fx.Node, src: fx.Node) -> None:
    """``dst`` (a node a pass made) comes from where ``src`` came from."""
    for key in LOCATION_KEYS:
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]


def location(node: fx.Node) -> str:
    """Where in the user's model a node comes from: the innermost module path and the last
    source line outside torch, e.g. ``encoder.layer.3.attention.self.query
    (modeling_bert.py:212)``; "" when the graph does not say (a hand-built graph)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    module = paths[-1].removeprefix("L__self__.").removeprefix("L__self__") if paths else ""
    line = ""
    for frame in reversed(_FRAME.findall(node.meta.get("stack_trace") or "")):
        file, lineno = frame
        if "/torch/" not in file:
            line = f"{file.rsplit('/', 1)[-1]}:{lineno}"
            break
    return f"{module} ({line})" if module and line else module or line


def float_reason(node: fx.Node) -> Optional[str]:
    """Why ``node`` runs in float (its NodeQuant's reason), or None when it is not float."""
    q = get_qspec(node)
    return q.reason if q is not None and q.role is Role.FLOAT else None


def is_per_token_bias(node: fx.Node) -> bool:
    """Whether ``node`` is the float add that gives a per-token linear its bias."""
    reason = float_reason(node)
    return reason is not None and reason.startswith(PER_TOKEN_BIAS)


def set_float_reason(node: fx.Node, reason: str) -> None:
    """Marks ``node`` float with ``reason`` (keeping what is observed about its output)."""
    q = get_qspec(node)
    set_qspec(node, NodeQuant(Role.FLOAT, reason=reason) if q is None else q.replace(
        role=Role.FLOAT, reason=reason, fused_into=None, float_output=False))


# --- statistics recorded from data for the data-dependent recovery passes ----------------

BIAS_SHIFT = "ptq.bias_shift"        # conv/linear: E[float out] - E[quantized out] per channel
INPUT_ABSMAX = "ptq.input_absmax"    # linear: max |x| per input channel over calibration data
ADAROUND = "ptq.adaround"            # conv/linear: integer weights learned by AdaRound


def _put(node: fx.Node, key: str, value) -> None:
    """``node.meta[key] = value``; None removes the key."""
    if value is None:
        node.meta.pop(key, None)
    else:
        node.meta[key] = value


def bias_shift(node: fx.Node) -> Optional[torch.Tensor]:
    return node.meta.get(BIAS_SHIFT)


def set_bias_shift(node: fx.Node, value: Optional[torch.Tensor]) -> None:
    _put(node, BIAS_SHIFT, value)


def input_absmax(node: fx.Node) -> Optional[torch.Tensor]:
    return node.meta.get(INPUT_ABSMAX)


def set_input_absmax(node: fx.Node, value: Optional[torch.Tensor]) -> None:
    _put(node, INPUT_ABSMAX, value)


def adaround_weight(node: fx.Node) -> Optional[torch.Tensor]:
    return node.meta.get(ADAROUND)


def set_adaround_weight(node: fx.Node, value: Optional[torch.Tensor]) -> None:
    _put(node, ADAROUND, value)
