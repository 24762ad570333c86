"""The integer operator set: one table, :data:`OPS`, with one :class:`Op` per ATen op.

An entry says what the op is and how every stage treats it:

* Annotate (``passes/annotate.py``): its :attr:`Op.kind`, which arguments are activations
  (:func:`activation_inputs`), whether it has a weight, can absorb a ReLU-like clamp, or can
  hand float consumers its dequantized accumulator, and why a given node cannot be integer
  (:func:`unsupported`);
* lowering (``passes/lower_to_integer_ops.py``): :attr:`Op.rule`, the lowering rule it takes;
* the reference (``ops/reference.py``) and every backend: :attr:`Op.emits`, the ``ptq`` ops
  that rule may produce (each has a torch reference, and the TVM backend an emitter for each:
  ``tests/backends/test_op_table.py`` checks both).

Kinds:

* COMPUTE: lowered to a ``ptq`` op with its own output qparams (LOOKUP ones, elementwise
  functions of one tensor, become a 256-entry table on an 8-bit input);
* SHARE: runs on integers and passes its input's qparams through (max pooling);
* ACTIVATION: a ReLU-like clamp, folded into the clamp of a preceding conv / linear / add, or
  an integer clamp;
* VIEW: shape only (no rounding); a float one is not worth a line in the coverage report.

The sets the passes read (``COMPUTE``, ``WEIGHTED``, ``SHARE``, ...) are views of :data:`OPS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ptqpasses.graph_utils import get_attr_value, is_tensor_node

aten = torch.ops.aten


class Kind(enum.StrEnum):
    COMPUTE = "compute"
    LOOKUP = "lookup"
    SHARE = "share"
    ACTIVATION = "activation"
    VIEW = "view"


@dataclass(frozen=True)
class Op:
    """One ATen op of the integer set.

    Attributes:
        kind: what it is (:class:`Kind`).
        rule: the lowering rule of a COMPUTE / LOOKUP op (``conv2d``, ``linear``, ``matmul``,
            ``add``, ``mul``, ``cat``, ``avg_pool2d``, ``mean``, ``lut``); ``""`` otherwise.
        inputs: which arguments are activations: ``"first"`` (args[0]), ``"pair"`` (the
            tensors among args[0:2]) or ``"list"`` (the tensors of args[0]).
        weighted: a constant weight (and bias) argument, quantized per channel.
        fuses_activation: a ReLU-like sole user folds into its output clamp.
        float_output: can compute on integers and hand float consumers
            ``float32(acc) * s_x * s_w`` (``NodeQuant.float_output``).
        identity: a view that lowering erases (``dropout`` in eval, ``alias``). Not
            ``contiguous`` / ``clone``: a later ``view`` needs their layout (Swin's
            ``permute -> contiguous -> view``).
        check: ``check(gm, node)``: why this node cannot become an integer op, ``""`` when it
            can.
        emits: the ``ptq`` ops lowering may produce from it.
    """

    kind: Kind
    rule: str = ""
    inputs: str = "first"
    weighted: bool = False
    fuses_activation: bool = False
    float_output: bool = False
    identity: bool = False
    check: Callable[[fx.GraphModule, fx.Node], str] | None = None
    emits: tuple[str, ...] = ()


def op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


# -- why a node cannot be integer ------------------------------------------------------------

def _check_weighted(gm: fx.GraphModule, node: fx.Node) -> str:
    args = node.args
    w = get_attr_value(gm, args[1])
    if w is None:
        return "weight is not a constant"
    if len(args) > 2 and args[2] is not None and get_attr_value(gm, args[2]) is None:
        return "bias is not a constant"
    if node.target is aten.conv2d.default and w.dim() != 4:
        return "conv2d weight is not 4-D"
    if node.target is aten.conv2d.default and len(args) > 4 and isinstance(args[4], str):
        return f"string padding {args[4]!r} (capture with explicit padding)"
    return ""


def _check_binary(gm: fx.GraphModule, node: fx.Node) -> str:
    args = node.args
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(args[1], (int, float)) \
            and is_tensor_node(args[0]) and args[1] != 0:
        return ""  # scaling by a constant: a requantize
    if node.target is aten.div.Tensor:
        return "division by a tensor"
    if not all(is_tensor_node(x) for x in args[:2]):
        return f"{op_name(node)} with a scalar operand"
    if node.kwargs.get("alpha", 1) != 1:
        return "add with alpha != 1"
    return ""


def _check_cat(gm: fx.GraphModule, node: fx.Node) -> str:
    return "" if all(is_tensor_node(x) for x in node.args[0]) else "cat of non-tensors"


def _check_avg_pool(gm: fx.GraphModule, node: fx.Node) -> str:
    args, kw = node.args, node.kwargs
    ceil = args[4] if len(args) > 4 else kw.get("ceil_mode", False)
    include_pad = args[5] if len(args) > 5 else kw.get("count_include_pad", True)
    divisor = args[6] if len(args) > 6 else kw.get("divisor_override")
    padding = args[3] if len(args) > 3 else [0, 0]
    if ceil or divisor is not None or (not include_pad and any(padding)):
        return "avg_pool2d with ceil_mode, divisor_override or count_include_pad=False"
    return ""


def _check_adaptive_pool(gm: fx.GraphModule, node: fx.Node) -> str:
    size = list(node.args[1])
    return "" if size == [1, 1] else f"adaptive_avg_pool2d to {size} (only 1x1)"


def _check_mean(gm: fx.GraphModule, node: fx.Node) -> str:
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None:
        return "mean over an input of unknown shape"
    dims = [d % val.dim() for d in node.args[1]]
    if not all(isinstance(val.shape[d], int) for d in dims):
        return "mean over a dynamic dimension"
    return ""


# -- the table ---------------------------------------------------------------------------

_WEIGHTED = dict(kind=Kind.COMPUTE, weighted=True, fuses_activation=True, float_output=True,
                 check=_check_weighted)
_MATMUL = Op(Kind.COMPUTE, "matmul", "pair", float_output=True, check=_check_binary,
             emits=("matmul",))
_MUL = Op(Kind.COMPUTE, "mul", "pair", check=_check_binary, emits=("mul", "requantize"))
_POOL = dict(kind=Kind.COMPUTE, rule="mean", emits=("mean",))
_LOOKUP = Op(Kind.LOOKUP, "lut", emits=("lut",))
_ACTIVATION = Op(Kind.ACTIVATION, emits=("clamp",))
_VIEW = Op(Kind.VIEW)

#: ATen op -> its entry. Adding an integer op: one entry here, its ``ptq`` op(s) in
#: ``ops/reference.py`` (and a rule in the lowering if it needs a new one), an emitter in each
#: backend.
OPS: dict[torch._ops.OpOverload, Op] = {
    aten.conv2d.default: Op(rule="conv2d", emits=("conv2d",), **_WEIGHTED),
    aten.linear.default: Op(rule="linear", emits=("linear", "linear_dynamic", "quantize"),
                            **_WEIGHTED),
    aten.matmul.default: _MATMUL,
    aten.bmm.default: _MATMUL,
    aten.add.Tensor: Op(Kind.COMPUTE, "add", "pair", fuses_activation=True, check=_check_binary,
                        emits=("add",)),
    aten.mul.Tensor: _MUL,
    aten.div.Tensor: _MUL,
    aten.cat.default: Op(Kind.COMPUTE, "cat", "list", check=_check_cat, emits=("cat",)),
    aten.avg_pool2d.default: Op(Kind.COMPUTE, "avg_pool2d", check=_check_avg_pool,
                                emits=("avg_pool2d",)),
    aten.adaptive_avg_pool2d.default: Op(check=_check_adaptive_pool, **_POOL),
    aten.mean.dim: Op(check=_check_mean, **_POOL),
    **{t: _LOOKUP for t in (
        aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.hardswish.default,
        aten.hardsigmoid.default, aten.silu.default, aten.elu.default, aten.leaky_relu.default,
        aten.exp.default, aten.log_sigmoid.default, aten.mish.default, aten.softplus.default,
        aten.erf.default)},
    aten.max_pool2d.default: Op(Kind.SHARE, emits=("max_pool2d",)),
    **{t: _ACTIVATION for t in (
        aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
        aten.hardtanh_.default, aten.clamp.default)},
    **{t: _VIEW for t in (
        aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
        aten.transpose.int, aten.contiguous.default, aten.clone.default,
        aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.select.int,
        aten.expand.default, aten.t.default)},
    aten.dropout.default: Op(Kind.VIEW, identity=True),
    aten.alias.default: Op(Kind.VIEW, identity=True),
}


def _where(pred: Callable[[Op], bool]) -> set:
    return {t for t, op in OPS.items() if pred(op)}


#: ATen op -> lowering rule, for the ops lowered to a ``ptq`` op with their own qparams.
COMPUTE = {t: op.rule for t, op in OPS.items() if op.kind in (Kind.COMPUTE, Kind.LOOKUP)}
WEIGHTED = {t: op.rule for t, op in OPS.items() if op.weighted}
FUSES_ACTIVATION = _where(lambda op: op.fuses_activation)
FLOAT_OUTPUT = _where(lambda op: op.float_output)
ACTIVATIONS = _where(lambda op: op.kind is Kind.ACTIVATION)
VIEWS = _where(lambda op: op.kind is Kind.VIEW)
IDENTITY_VIEWS = _where(lambda op: op.identity)
SHARE = _where(lambda op: op.kind in (Kind.SHARE, Kind.ACTIVATION, Kind.VIEW))


def activation_inputs(node: fx.Node) -> list[fx.Node]:
    """The arguments of an integer-set ``node`` that are activations (quantized inputs)."""
    how = OPS[node.target].inputs if node.target in OPS else "first"
    if how == "list":
        return list(node.args[0])
    if how == "pair":
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return [node.args[0]]


def unsupported(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why ``node`` (an op of the set) cannot become an integer op, or ``""`` when it can."""
    op = OPS.get(node.target)
    if op is None:
        return f"{op_name(node)} is not in the integer operator set"
    return op.check(gm, node) if op.check is not None else ""


def in_coverage(node: fx.Node) -> bool:
    """Whether the coverage report counts ``node`` when it runs in float: an ATen op with an
    output, on float tensors, that is not a view (not ours, not a shape or size check, not id
    or mask arithmetic)."""
    t = node.target
    if node.op != "call_function" or t in VIEWS or not isinstance(t, torch._ops.OpOverload) \
            or t is aten.sym_size.int or t.namespace == "ptq" or not t._schema.returns:
        return False
    val = node.meta.get("val")
    return not (isinstance(val, torch.Tensor) and not val.is_floating_point())


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
