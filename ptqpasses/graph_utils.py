"""Small helpers shared by passes: constants, attribute lookup, node predicates."""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten


def get_attr_value(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node, or None for any other node."""
    if node.op != "get_attr":
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Registers ``value`` as a buffer of ``gm`` and returns a get_attr node for it."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().clone())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def first_user_position(gm: fx.GraphModule) -> fx.Node:
    """The first non-placeholder node: where new get_attr constants go."""
    return next(n for n in gm.graph.nodes if n.op != "placeholder")


def remove_unused_attributes(gm: fx.GraphModule) -> None:
    """Deletes buffers/parameters of the root that no get_attr node refers to any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
    for name in list(gm._parameters):
        if name not in used:
            del gm._parameters[name]
    gm.delete_all_unused_submodules()


def is_call(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_tensor_node(node: Any) -> bool:
    """True for fx nodes that produce a tensor (not shapes, tuples, or scalars)."""
    if not isinstance(node, fx.Node) or node.op == "output":
        return False
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    return node.target not in (operator.getitem, aten.sym_size.int)
