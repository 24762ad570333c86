"""How closely a compiled graph with float islands must match the torch integer graph: the
tolerances ``tools/fuzz.py`` and ``tools/zoo.py`` share.

Integer ops are bit-exact on every TVM family; float islands (LayerNorm, softmax, GELU: TVM's
kernels within a few ulps of ATen's) are not, so a graph holding one may differ:

* an integer output by at most ``ISLAND_LSB`` steps of its scale;
* a float output by at most ``ISLAND_FLOAT_RTOL`` of the largest reference magnitude;
* a float output by at most ``ISLAND_TOKEN_RTOL`` of it where a per-token linear
  (``ptq.linear_dynamic``) is in the graph: an ulp of difference in the island it reads can
  move a row's scale and flip the rounding of an input code (the per-token ops themselves are
  bit-exact: tests/backends/test_per_token.py).
"""

from __future__ import annotations

import torch

ISLAND_LSB = 2
ISLAND_FLOAT_RTOL = 1e-5
ISLAND_TOKEN_RTOL = 2 / 255


def has_per_token_linear(q: torch.fx.GraphModule) -> bool:
    return any(n.target is torch.ops.ptq.linear_dynamic.default for n in q.graph.nodes)


def float_rtol(q: torch.fx.GraphModule) -> float:
    """The float-output tolerance of ``q`` (a graph with float islands)."""
    return ISLAND_TOKEN_RTOL if has_per_token_linear(q) else ISLAND_FLOAT_RTOL
