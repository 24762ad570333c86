"""Facts of an integer-operator fx graph that emission reads: ``ptq`` op names, arguments
by schema name, and the value range the graph guarantees for an integer tensor."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

_getitem = operator.getitem


def ptq_name(target) -> Optional[str]:
    """``"linear"`` for ``torch.ops.ptq.linear.default``; None for any other target."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "ptq":
        return target._schema.name.split("::")[-1]
    return None


def bind_args(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


#: aten ops whose integer output holds only values of their first input (views, copies,
#: selections, max): the input's value range carries over.
_RANGE_PRESERVING = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "squeeze",
    "unsqueeze", "contiguous", "clone", "slice", "select", "expand", "alias", "detach",
    "max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d", "narrow", "chunk",
    "split", "unbind", "getitem"}


def value_range(node: Any) -> Optional[tuple[int, int]]:
    """The integer range ``[lo, hi]`` the graph guarantees for ``node``'s values, or None when
    only its dtype bounds it.

    Every ``ptq`` op that writes integers clamps to its ``qmin`` / ``qmax`` arguments (``ptq``
    max_pool2d and the aten views and selections above keep their input's range).
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    name = ptq_name(node.target)
    if name is not None:
        bound = bind_args(node)
        if "qmin" in bound and "qmax" in bound and "dequantize" not in name:
            return int(bound["qmin"]), int(bound["qmax"])
        if name == "max_pool2d":
            return value_range(bound["x"])
        return None
    op = "getitem" if node.target is _getitem else \
        getattr(node.target, "__name__", "").split(".")[0]
    if op in _RANGE_PRESERVING and node.args:
        return value_range(node.args[0])
    return None
