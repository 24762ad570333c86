"""Which ATen ops the integer operator set covers, by how they are quantized.

* COMPUTE: lowered to a ``ptq`` op with its own output qparams.
* SHARE: the output reuses the input's qparams (no rounding); shape ops and max pooling
  run directly on integers, ReLU/clamp become an integer clamp.
* ACTIVATIONS: can be fused into the clamp of a preceding conv / linear / add.
* VIEWS: shape-only ops; a float one is not worth a line in the coverage report.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

WEIGHTED = {aten.conv2d.default: "conv2d", aten.linear.default: "linear"}
COMPUTE = {
    **WEIGHTED,
    aten.matmul.default: "matmul", aten.bmm.default: "matmul",
    aten.add.Tensor: "add", aten.mul.Tensor: "mul", aten.div.Tensor: "mul",
    aten.cat.default: "cat",
    aten.avg_pool2d.default: "avg_pool2d", aten.adaptive_avg_pool2d.default: "mean",
    aten.mean.dim: "mean",
}
#: Elementwise functions of one tensor: on an 8-bit input they become a 256-entry table.
LOOKUP = {
    aten.gelu.default: "lut", aten.sigmoid.default: "lut", aten.tanh.default: "lut",
    aten.hardswish.default: "lut", aten.hardsigmoid.default: "lut", aten.silu.default: "lut",
    aten.elu.default: "lut", aten.leaky_relu.default: "lut", aten.exp.default: "lut",
    aten.log_sigmoid.default: "lut", aten.mish.default: "lut", aten.softplus.default: "lut",
    aten.erf.default: "lut",
}
COMPUTE.update(LOOKUP)
FUSES_ACTIVATION = {aten.conv2d.default, aten.linear.default, aten.add.Tensor}
ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
               aten.hardtanh_.default, aten.clamp.default}
VIEWS = {
    aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
    aten.transpose.int, aten.contiguous.default, aten.clone.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.dropout.default, aten.slice.Tensor, aten.select.int,
    aten.expand.default, aten.alias.default, aten.t.default,
}
SHARE = VIEWS | {aten.max_pool2d.default} | ACTIVATIONS


def activation_bounds(node: fx.Node) -> tuple[float, float] | None:
    """The real-valued clamp (lo, hi) of a ReLU-like node with lo == 0, else None."""
    t, args = node.target, node.args
    if t in (aten.relu.default, aten.relu_.default):
        return 0.0, float("inf")
    if t is aten.relu6.default:
        return 0.0, 6.0
    if t in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = args[1] if len(args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else node.kwargs.get("max_val", 1.0)
        return (float(lo), float(hi)) if lo == 0 and hi > 0 else None
    if t is aten.clamp.default:
        lo = args[1] if len(args) > 1 else node.kwargs.get("min")
        hi = args[2] if len(args) > 2 else node.kwargs.get("max")
        if lo == 0 and (hi is None or hi > 0):
            return 0.0, float("inf") if hi is None else float(hi)
    return None


def op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)
