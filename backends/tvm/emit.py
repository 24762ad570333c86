"""Walk an integer-operator fx graph and build a Relax IRModule with ``BlockBuilder``.

``torch.ops.ptq.*`` nodes become int8 TE kernels or integer Relax ops (``ptq_ops``); every
other node (integer pass-throughs such as view/permute on int8, and float islands such as
gelu between dequantize and quantize) is handed to the converters of TVM's own
``relax.frontend.torch`` importer, which read and write the same node -> value table, except
``layer_norm``, float32 ``softmax``, ``tanh``, ``erf`` and exact ``gelu``, emitted here
(``_layer_norm``, ``_softmax``, ``_tanh``, ``_erf``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
from typing import Any, Optional, Sequence

import numpy as np
import torch
import tvm
from torch import fx
from tvm import relax, tirx
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

import ptqpasses.ops  # noqa: F401  (registers torch.ops.ptq)
from ptqpasses_backends.tvm import ptq_ops
from ptqpasses_backends.tvm.strategy import Strategy
from ptqpasses_backends.tvm.fxgraph import bind_args, ptq_name as _ptq_name
from ptqpasses_backends.tvm.kernels import conv2d as conv_k
from ptqpasses_backends.tvm.kernels import erf as erf_k
from ptqpasses_backends.tvm.kernels import layer_norm as layer_norm_k
from ptqpasses_backends.tvm.kernels import softmax as softmax_k
from ptqpasses_backends.tvm.kernels import tanh as tanh_k


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: dtype and shape, whose dims are ints or symbol names
    (``"batch"`` for the dynamic batch; torch.export's own symbols such as ``"s1"``)."""

    shape: tuple
    dtype: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(tuple(d["shape"]), d["dtype"])


class EmitError(RuntimeError):
    """A node the emitter cannot translate (names the node and its op)."""


class Emitter:
    """Translate one fx integer graph into Relax.

    Args:
        gm: The integer-operator graph.
        strategy: The target's strategy (layouts, kernel variants).
    """

    def __init__(self, gm: fx.GraphModule, strategy: Strategy):
        self.gm = gm
        self.strategy = strategy
        #: The node being emitted (handlers read graph facts of its inputs through it).
        self.node: Optional[fx.Node] = None
        #: Per packed kernel node: the strategy's variant it got, and why (``compile`` reports
        #: it).
        self.variants: dict[str, tuple[str, str]] = {}
        self.bb = relax.BlockBuilder()
        self.env: dict[fx.Node, Any] = {}
        #: Values kept channel-last (NHWC) between the ops that can take them (convs, pools,
        #: elementwise integer ops; ``ptq_ops.LAYOUTS``); their NCHW form goes into ``env``
        #: only when a consumer needs it (``nchw``: one transpose, shared).
        self.nhwc_env: dict[fx.Node, Any] = {}
        #: Per argument of the node being emitted: the layout of the value passed
        #: (``NCHW`` / ``NHWC``); whether the handler's result is NHWC (``out_nhwc``).
        self.arg_layouts: dict[str, str] = {}
        self.out_nhwc = False
        #: Kernel results whose kernel can take their consumer into its epilogue: value ->
        #: builder of the fused call (the AMX conv: ``with_residual(ResidualAdd, res,
        #: res_dtype)``, which ``ptq_ops.add`` calls); ``fused`` lists the nodes folded
        #: into their producer's epilogue (their producer's plain call is then dead code).
        self.epilogue_fusions: dict[Any, Any] = {}
        self.fused: list[str] = []
        #: Float values whose kernel can store them quantized (the CPU row softmax): value
        #: -> builder of that call (``ptq_ops.quantize`` calls it, and lists itself in
        #: ``fused``).
        self.quantize_epilogues: dict[Any, Any] = {}
        #: torch's symbolic input sizes by name (``s0``...): their size in the module (a
        #: ``tir.Var``, or an int where the input spec made the size static).
        self.sizes: dict[str, Any] = {}
        #: What the module knows of those sizes: torch's value ranges of the input symbols
        #: (capture's bounds, ``seq <= 128``), bound on their ``tir.Var`` s; proves
        #: ``min(seq, 128) == seq`` and that a slice by computed bounds is in range.
        self.analyzer = tvm.sym.Analyzer()
        #: 0-d integer tensors computed from sizes (``torch.tensor(min(seq, 128))`` and its
        #: arithmetic, DeBERTa's attention span): their value as a ``PrimExpr``, which
        #: ``item`` returns (TVM's converter would read it back as a fresh, unrelated var).
        self.scalars: dict[fx.Node, Any] = {}
        #: A float tensor's per-token codes and row parameters (``ptq_ops._token_quantized``),
        #: computed once for every per-token linear reading it.
        self.per_token: dict[Any, tuple] = {}
        self._float = ExportedProgramImporter()
        self._float.env = self.env
        self._float.block_builder = self.bb

    # -- values ------------------------------------------------------------------------
    def numpy(self, value) -> np.ndarray:
        """A graph constant (get_attr node, tensor or number) as a NumPy array."""
        if isinstance(value, fx.Node):
            if value.op != "get_attr":
                raise EmitError(f"expected a constant (get_attr) for {value.name}, got {value.op}")
            value = _fetch_attr(self.gm, value.target)
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)

    def _lookup(self, value):
        if isinstance(value, fx.Node):
            return self.nchw(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._lookup(v) for v in value)
        return value

    # -- layouts -------------------------------------------------------------------------
    def nchw(self, node: fx.Node):
        """``node``'s value in the graph's own layout (transposed once from NHWC if needed)."""
        if node not in self.env and node in self.nhwc_env:
            self.env[node] = self.bb.emit(
                relax.op.permute_dims(self.nhwc_env[node], [0, 3, 1, 2]))
        return self.env[node]

    def nhwc(self, node: fx.Node):
        """A 4-D ``node``'s value channel-last (transposed once from NCHW if needed)."""
        if node not in self.nhwc_env:
            self.nhwc_env[node] = self.bb.emit(
                relax.op.permute_dims(self.env[node], [0, 2, 3, 1]))
        return self.nhwc_env[node]

    def is_nhwc(self, node) -> bool:
        """Whether ``node``'s value exists channel-last."""
        return isinstance(node, fx.Node) and node in self.nhwc_env

    def ndim(self, node) -> Optional[int]:
        """The rank of a node's value (None for non-tensors)."""
        if not isinstance(node, fx.Node):
            return None
        value = self.env.get(node, self.nhwc_env.get(node))
        ty = getattr(value, "ty", None)
        return getattr(ty, "ndim", None)

    def _arg(self, name: str, value, want: Optional[str]):
        """A handler argument: ``want`` is ``NHWC`` (4-D tensors channel-last), ``ANY`` (as it
        is, NHWC preferred) or None (graph layout); records the layout passed."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(name, v, want) for v in value)
        if not isinstance(value, fx.Node):
            return value
        if want == "ANY" and self.ndim(value) == 4:
            want = "NHWC" if self.is_nhwc(value) else None
        if want == "NHWC" and self.ndim(value) == 4:
            self.arg_layouts[name] = "NHWC"
            return self.nhwc(value)
        self.arg_layouts.setdefault(name, "NCHW")
        return self.nchw(value)

    # -- driver --------------------------------------------------------------------------
    def run(self, inputs: Sequence[TensorSpec]) -> tvm.IRModule:
        """Emit ``main(*inputs) -> tuple of outputs``; returns the IRModule."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            raise EmitError(f"graph has {len(placeholders)} inputs, {len(inputs)} specs given")
        params, symbols = [], {}
        for node, spec in zip(placeholders, inputs):
            # One tir.Var per symbol name, shared by every input that uses it.
            shape = [symbols.setdefault(d, tirx.Var(d, "int64")) if isinstance(d, str)
                     else int(d) for d in spec.shape]
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == len(shape):
                for d, size in zip(val.shape, shape):
                    if not isinstance(d, int):
                        self.sizes.setdefault(str(d), size)
                        self._bind_range(d, size)
            var = relax.Var(node.name, relax.TensorType(shape, spec.dtype))
            self.env[node] = var
            params.append(var)
        live = _live_nodes(self.gm.graph)
        with self.bb.function("main", params):
            with self.bb.dataflow():
                outputs = None
                for node in self.gm.graph.nodes:
                    if node.op == "placeholder":
                        continue
                    if node.op == "output":
                        outputs = self._outputs(node)
                        break
                    if node not in live:
                        continue  # dead code: torch.export's ``_guards_fn``, assertions
                    self._emit_node(node)
                out = self.bb.emit_output(relax.Tuple(outputs))
            self.bb.emit_func_output(out)
        return self.bb.get()

    def _bind_range(self, d, var) -> None:
        """Bind ``var`` (a ``tir.Var``) to the range torch's shape environment gives the
        input symbol ``d`` (a ``SymInt``)."""
        if not isinstance(var, tirx.Var):
            return
        try:
            expr = d.node.expr
            r = d.node.shape_env.var_to_range[expr]
            lo, hi = int(r.lower), r.upper
            hi = int(hi) if hi.is_finite else None
        except Exception:  # noqa: BLE001  (no shape environment: an unbounded symbol)
            return
        if hi is not None and hi >= lo:
            self.analyzer.bind(var, tvm.ir.Range.from_min_extent(lo, hi - lo + 1))
        else:
            self.analyzer.update(var, tvm.sym.ConstIntBound(lo, tvm.sym.ConstIntBound.POS_INF))

    def _outputs(self, node: fx.Node) -> list:
        flat = []

        def visit(v):
            if isinstance(v, (list, tuple)):
                for x in v:
                    visit(x)
            elif isinstance(v, fx.Node):
                flat.append(self.nchw(v))
            else:
                raise EmitError(f"unsupported graph output {v!r}")

        visit(node.args[0])
        return flat

    def _emit_node(self, node: fx.Node) -> None:
        """Emit ``node`` into ``env`` (or ``nhwc_env`` for a channel-last result)."""
        try:
            if node.op == "get_attr":
                value = _fetch_attr(self.gm, node.target)
                if isinstance(value, torch.Tensor):
                    value = relax.const(value.detach().cpu().numpy())
                self.env[node] = value
                return
            if node.op != "call_function":
                raise EmitError(f"unsupported node kind {node.op!r}")
            name = _ptq_name(node.target)
            if name is None:
                if self.strategy.nhwc and self._emit_float_nhwc(node):
                    return
                for n in node.all_input_nodes:  # TVM's converters read ``env`` themselves
                    self.nchw(n)
                self.env[node] = self._pin_shape(node, self._emit_other(node))
                return
            if name not in ptq_ops.HANDLERS:
                raise EmitError(f"no emitter for ptq op {name!r}")
            bound = bind_args(node)
            self.node = node
            rule = ptq_ops.LAYOUTS.get(name) if self.strategy.nhwc else None
            wants = (rule(self, bound) if rule is not None else None) or {}
            self.arg_layouts, self.out_nhwc = {}, bool(wants)
            # Constants (weights, bias, multipliers) stay fx nodes: handlers read the
            # tensors from the graph to pack them; activations become Relax values.
            args = {k: v if k in _CONSTANT_ARGS and isinstance(v, fx.Node)
                    else self._arg(k, v, wants.get(k)) for k, v in bound.items()}
            value = ptq_ops.HANDLERS[name](self, args)
            if not self.out_nhwc:
                value = self._pin_shape(node, value)
            (self.nhwc_env if self.out_nhwc else self.env)[node] = value
        except EmitError as e:
            if str(e).startswith("node "):
                raise
            raise EmitError(f"node {node.name!r} ({_op_name(node)}){_at(node)}: {e}") from e
        except Exception as e:  # noqa: BLE001  (re-raised with the node named)
            raise EmitError(
                f"node {node.name!r} ({_op_name(node)}){_at(node)} could not be emitted: "
                f"{type(e).__name__}: {e}") from e

    def _pin_shape(self, node: fx.Node, value):
        """``value`` with the shape torch recorded for ``node`` where TVM's shape inference
        lost it (a broadcast of sizes it cannot prove equal): a ``match_cast``, checked at
        run time, so later ops (``emit_te``) see a shape; and boolean where torch's value is."""
        val = node.meta.get("val")
        ty = getattr(value, "ty", None)
        if not isinstance(val, torch.Tensor) or not isinstance(ty, relax.TensorType):
            return value
        if val.dtype == torch.bool and ty.dtype != "bool":
            # a mask TVM's converters made int (``new_ones(dtype=bool) & ...``); ``where``
            # and SDPA need it boolean, as torch has it
            value = self.bb.emit(relax.op.astype(value, "bool"))
            ty = value.ty
        want = []
        for d in val.shape:
            if isinstance(d, int):
                want.append(int(d))
            elif str(d) in self.sizes:
                want.append(self.sizes[str(d)])
            else:
                return value  # an expression of symbols: TVM's own form will do
        if getattr(ty.shape, "values", None) is not None:
            return value  # a known shape, in whatever form (casting min(s, 128) to s loops)
        if ty.ndim not in (-1, len(want)):
            return value
        return self.bb.match_cast(value, relax.TensorType(want, ty.dtype))

    def _sym_size(self, node: fx.Node):
        """``aten.sym_size.int``: a Python int when the dim is static in the emitted module
        (e.g. a graph captured with a dynamic batch, compiled for one batch size), else the
        dim's symbolic ``PrimExpr``. TVM's converter wraps static sizes in a Relax constant,
        which shape lists mixing ints and PrimExprs (view/reshape/expand) cannot take."""
        x = self.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = x.ty.shape
        if shape is None or not hasattr(shape, "values"):
            raise EmitError(f"shape of {node.args[0]} unknown for sym_size")
        size = shape.values[int(dim)]
        return int(size.value) if isinstance(size, tirx.IntImm) else size

    def _prim(self, value):
        """A size argument (int, or a node's ``PrimExpr``) as an int or ``PrimExpr``; None
        for anything else."""
        if isinstance(value, fx.Node):
            value = self.env.get(value)
        if isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, tirx.IntImm):
            return int(value.value)
        if _is_prim(value) and "int" in str(value.ty.dtype):
            return value
        return None

    def _sym_min_max(self, node: fx.Node):
        """``torch.sym_min`` / ``sym_max`` of sizes (DeBERTa's ``min(max(q, k), 128)``, the
        attention span): the operand the size bounds prove the answer (``seq`` where capture
        bounded ``seq <= 128``), else TIR's ``min`` / ``max``."""
        a, b = (self._prim(v) for v in node.args[:2])
        if a is None or b is None:
            raise EmitError(f"{_op_name(node)} of {node.args[:2]!r}: only sizes (ints and "
                            "symbolic sizes) are supported")
        is_min = node.target is torch.sym_min
        if isinstance(a, int) and isinstance(b, int):
            return min(a, b) if is_min else max(a, b)
        if self.analyzer.can_prove(_as_expr(a) <= _as_expr(b)):
            return a if is_min else b
        if self.analyzer.can_prove(_as_expr(b) <= _as_expr(a)):
            return b if is_min else a
        return (tirx.min if is_min else tirx.max)(_as_expr(a), _as_expr(b))

    def _scalar_tensor_of(self, value, dtype: str):
        """A 0-d ``dtype`` tensor holding the size ``value`` (int or ``PrimExpr``)."""
        if isinstance(value, int):
            return relax.const(value, dtype)
        t = self.bb.emit(relax.op.reshape(
            relax.op.shape_to_tensor(relax.ShapeExpr([_as_expr(value)])), []))
        return t if dtype == "int64" else self.bb.emit(relax.op.astype(t, dtype))

    def _scalar(self, node: fx.Node, key: str):
        """Integer arithmetic on a 0-d tensor made of a size (``scalar_tensor(sym_min)``,
        ``+ - *`` on it, ``item``) computed as a ``PrimExpr`` beside the tensor, so that
        ``item`` gives back an expression of the input sizes. None: not such a node."""
        val = node.meta.get("val")
        if key == "item.default":
            src = node.args[0]
            return self.scalars.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 0 or val.is_floating_point() \
                or val.dtype == torch.bool:
            return None
        dtype = str(val.dtype).replace("torch.", "")
        if key == "scalar_tensor.default":
            value = self._prim(node.args[0])
            if value is None or isinstance(node.args[0], int):
                return None  # a constant: TVM's converter
        else:
            args = [self.scalars.get(a) if isinstance(a, fx.Node) else self._prim(a)
                    for a in node.args[:2]]
            if any(a is None for a in args) or not any(
                    isinstance(a, fx.Node) and a in self.scalars for a in node.args[:2]):
                return None
            if node.kwargs.get("alpha", 1) != 1:
                return None
            x = [_as_expr(a) for a in args]
            value = {"neg.default": lambda: -x[0],
                     "add.Tensor": lambda: x[0] + x[1], "add.Scalar": lambda: x[0] + x[1],
                     "sub.Tensor": lambda: x[0] - x[1], "sub.Scalar": lambda: x[0] - x[1],
                     "rsub.Scalar": lambda: x[1] - x[0], "rsub.Tensor": lambda: x[1] - x[0],
                     "mul.Tensor": lambda: x[0] * x[1], "mul.Scalar": lambda: x[0] * x[1]}[key]()
            value = self.analyzer.simplify(value)
            if isinstance(value, tirx.IntImm):
                value = int(value.value)
        self.scalars[node] = value
        return self._scalar_tensor_of(value, dtype)

    def _clamp(self, node: fx.Node):
        """``clamp`` with a bound computed from sizes (a ``PrimExpr``, DeBERTa's
        ``att_span * 2 - 1``), which TVM's converter takes only as a number or tensor: the
        bound becomes a 0-d tensor of ``x``'s dtype. None: TVM's converter."""
        args = list(node.args) + [None] * (3 - len(node.args))
        bounds = [args[1] if args[1] is not None else node.kwargs.get("min"),
                  args[2] if args[2] is not None else node.kwargs.get("max")]
        prims = [self._prim(b) if isinstance(b, fx.Node) else None for b in bounds]
        if not any(_is_prim(p) for p in prims):
            return None
        x = self.env[node.args[0]]
        dtype = str(x.ty.dtype)
        for bound, p, op in zip(bounds, prims, (relax.op.maximum, relax.op.minimum)):
            if bound is None:
                continue
            if p is not None:
                t = self._scalar_tensor_of(p, "int64")
                t = t if dtype == "int64" else self.bb.emit(relax.op.astype(t, dtype))
            elif isinstance(bound, fx.Node):
                t = self.env[bound]
            else:
                t = relax.const(bound, dtype)
            x = self.bb.emit(op(x, t))
        return x

    # -- float values channel-last ------------------------------------------------------
    def takes_nhwc_float(self, node: fx.Node) -> bool:
        """Whether ``node`` can run channel-last on a float input (an elementwise op of
        :data:`_NHWC_FLOAT_OPS` that broadcasts nothing, a float 1x1 / depthwise conv, or a
        ``ptq.quantize``), judged from the op and torch's recorded shapes (``node`` and its
        inputs need not be emitted yet)."""
        if node.op != "call_function":
            return False
        name = _ptq_name(node.target)
        if name is not None:
            return name == "quantize"
        key = getattr(node.target, "__name__", None)
        if key == "conv2d.default":
            return self._float_conv_form(node, need_value=False) is not None
        if key not in _NHWC_FLOAT_OPS:
            return False
        val = node.meta.get("val")
        shapes = [getattr(n.meta.get("val"), "shape", None) for n in node.all_input_nodes]
        return not isinstance(val, torch.Tensor) or all(
            sh is not None and tuple(sh) == tuple(val.shape) for sh in shapes)

    def _nchw_type(self, node) -> Optional[tuple]:
        """``(dtype, [n, c, h, w])`` of a 4-D tensor value emitted in either layout, else
        None."""
        if not isinstance(node, fx.Node):
            return None
        nhwc = node not in self.env and node in self.nhwc_env
        ty = getattr(self.nhwc_env[node] if nhwc else self.env.get(node), "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None:
            return None
        shape = list(ty.shape.values)
        return str(ty.dtype), ([shape[0], shape[3], shape[1], shape[2]] if nhwc else shape)

    def _emit_float_nhwc(self, node: fx.Node) -> bool:
        """Emit a float op channel-last where its inputs exist channel-last (a conv's float
        output, a channel-last ``dequantize``, float ops emitted so): elementwise ops on the
        NHWC values of one shape as they are, float 1x1 and depthwise convs on their
        channel-last kernels without the transposes around them. MobileNetV2's guard-raised
        float stretches (hardtanh, depthwise, pointwise convs, residual adds) then run between
        its int8 convs with no layout change (one Zen 4 core: the stem's transposes and NCHW
        re-encode took 0.9 of 5.3 ms). False: emitted in NCHW."""
        if not self.takes_nhwc_float(node):
            return False
        key = getattr(node.target, "__name__", None)
        if key == "conv2d.default":
            if not self.is_nhwc(node.args[0]):
                return False
            value = self._float_conv(node, nhwc=True)
        else:
            inputs = node.all_input_nodes
            types = [self._nchw_type(n) for n in inputs]
            if (not inputs or not all(self.is_nhwc(n) for n in inputs)
                    or any(t is None for t in types)
                    or not all(self.analyzer.can_prove_equal(p, q) for t in types[1:]
                               for p, q in zip(t[1], types[0][1]))):
                return False
            # the converter reads ``env``: give it the channel-last values for this node
            with self._env_as({n: self.nhwc_env[n] for n in inputs}):
                value = self._emit_other(node)
        if value is None:
            return False
        self.nhwc_env[node] = value
        return True

    @contextlib.contextmanager
    def _env_as(self, values: dict):
        """``env`` with ``values`` in place of its entries for those nodes (what TVM's
        converters read) while the block runs; restored after."""
        saved = {n: self.env.get(n, _MISSING) for n in values}
        self.env.update(values)
        try:
            yield
        finally:
            for n, v in saved.items():
                if v is _MISSING:
                    self.env.pop(n, None)
                else:
                    self.env[n] = v

    def _emit_other(self, node: fx.Node):
        if node.target is torch.ops.aten.sym_size.int:
            return self._sym_size(node)
        if node.target in _SYM_MIN_MAX:
            return self._sym_min_max(node)
        key = "getitem" if node.target is _getitem else getattr(node.target, "__name__", None)
        if key in _SCALAR_KEYS:
            y = self._scalar(node, key)
            if y is not None:
                return y
        own = _OWN_EMITTERS.get(key)
        if own is not None:
            y = getattr(self, own)(node)
            if y is not None:
                return y
        convert = self._float.convert_map.get(key)
        if convert is None and key is not None and key.split(".")[0].endswith("_"):
            convert = self._inplace(node, key)
        if convert is None:
            raise EmitError(f"no TVM converter for op {_op_name(node)}")
        if key in _FLOAT_MATH:
            return self._on_float_input(node, convert)
        return convert(node)

    def _inplace(self, node: fx.Node, key: str):
        """An in-place op TVM has no converter for (``div_``: DeBERTa's ``pos_query_layer /=
        scale``) as its functional form, where nothing else reads the tensor it writes (it
        and the views it is made of have no other user, and it is no input or constant).
        TVM converts ``add_`` / ``mul_`` functionally as well."""
        name, _, overload = key.partition(".")
        convert = self._float.convert_map.get(f"{name[:-1]}.{overload}")
        if convert is None:
            return None
        if not _writes_only_its_own(node):
            raise EmitError("in place, on a tensor that other nodes read (or an input or "
                            "constant); write it out of place in the model "
                            f"(x = x.{name[:-1]}(...)), or keep_float the node")
        return convert

    def _on_float_input(self, node: fx.Node, convert):
        """A float function of an integer tensor (DeBERTa-v2's ``log`` of relative
        positions): torch computes it in the output's float dtype; TVM's op refuses ints."""
        x, val = node.args[0], node.meta.get("val")
        xv = self.env.get(x) if isinstance(x, fx.Node) else None
        xty = getattr(xv, "ty", None)
        if not (isinstance(val, torch.Tensor) and val.is_floating_point()
                and isinstance(xty, relax.TensorType)
                and str(xty.dtype).startswith(("int", "uint", "bool"))):
            return convert(node)
        cast = self.bb.emit(relax.op.astype(xv, str(val.dtype).replace("torch.", "")))
        with self._env_as({x: cast}):
            return convert(node)

    def _repeat(self, node: fx.Node):
        """``x.repeat(batch, 1, 1)`` with a symbolic count (DeBERTa's relative positions):
        TVM's ``tile`` takes only ints, so ``reshape -> broadcast_to -> reshape``
        (``(d0, d1) -> (1, d0, 1, d1) -> (r0, d0, r1, d1) -> (r0*d0, r1*d1)``). None: all
        counts are ints (TVM's converter)."""
        x = self.env[node.args[0]]
        reps = [self.env[r] if isinstance(r, fx.Node) else r for r in node.args[1]]
        if all(isinstance(r, int) for r in reps):
            return None
        shape = list(x.ty.shape.values)
        shape = [1] * (len(reps) - len(shape)) + shape  # repeat may add leading dims
        reps = [r if isinstance(r, int) or not isinstance(r, tirx.IntImm) else int(r)
                for r in reps]
        inter = [v for d in shape for v in (1, d)]
        wide = [v for r, d in zip(reps, shape) for v in (r, d)]
        y = self.bb.emit(relax.op.reshape(x, inter))
        y = self.bb.emit(relax.op.broadcast_to(y, wide))
        return self.bb.emit(relax.op.reshape(y, [r * d for r, d in zip(reps, shape)]))

    def _slice(self, node: fx.Node):
        """``x[:, :seq]`` of a constant table (BERT's position ids): where torch gave the
        result the length of an input's symbolic size (capture bounded that size by the
        table), the slice is in bounds, and its length is ``seq``, not TVM's
        ``min(seq, 128)``, which no broadcast with ``seq`` could match. None: TVM's converter."""
        val = node.meta.get("val")
        args = list(node.args) + [None] * (5 - len(node.args))
        x, dim, start, end, step = args[:5]
        if step in (None, 1) and any(_is_prim(self._prim(v)) for v in (start, end)):
            y = self._slice_in_bounds(node)
            if y is not None:
                return y
        if not isinstance(val, torch.Tensor) or not isinstance(end, fx.Node) \
                or start not in (None, 0) or step not in (None, 1):
            return None
        dim = int(dim or 0) % val.dim()
        size = val.shape[dim]
        if isinstance(size, int) or str(size) not in self.sizes:
            return None
        return self.bb.emit(relax.op.strided_slice(self.env[x], [dim], [0], [self.env[end]],
                                                   [1], assume_inbound=True))

    def _slice_in_bounds(self, node: fx.Node):
        """``x[start:end]`` by bounds computed from sizes (DeBERTa's ``rel_embeddings[128 -
        span : 128 + span]``, whose bounds torch only knows as unbacked ``item`` values): a
        slice of length ``end - start`` where the size bounds prove ``0 <= start <= end <=
        x.shape[dim]`` (TVM's converter would clamp both ends, a shape nothing downstream
        matches). None: not proved (TVM's converter)."""
        args = list(node.args) + [None] * (4 - len(node.args))
        x = self.env[node.args[0]]
        shape = getattr(x.ty.shape, "values", None)
        if shape is None:
            return None
        dim = int(args[1] or 0) % len(shape)
        start = 0 if args[2] is None else self._prim(args[2])
        end = shape[dim] if args[3] is None else self._prim(args[3])
        if start is None or end is None:
            return None
        start, end = _as_expr(start), _as_expr(end)
        prove = self.analyzer.can_prove
        if not (prove(start >= 0) and prove(start <= end) and prove(end <= shape[dim])):
            return None
        y = self.bb.emit(relax.op.strided_slice(x, [dim], [start], [end], [1],
                                                assume_inbound=True))
        want = list(shape)
        want[dim] = self.analyzer.simplify(end - start)
        return self.bb.match_cast(y, relax.TensorType(want, x.ty.dtype))

    def _im2col(self, node: fx.Node):
        """``aten.im2col`` (``nn.Unfold``; ConvBERT's span-based dynamic conv): ``[N, C, H,
        W]`` -> ``[N, C*kh*kw, L]`` (or unbatched ``[C, H, W]`` -> ``[C*kh*kw, L]``), column
        ``c*kh*kw + i*kw + j`` of block ``l = oh*out_w + ow`` holding ``x[n, c, oh*sh - ph +
        i*dh, ow*sw - pw + j*dw]``, zero outside the input (as ATen, for any dtype). One TE
        gather: exact, H and W may be symbolic."""
        a = bind_args(node)
        x = self.env[a["self"]]
        kh, kw = (int(v) for v in a["kernel_size"])
        dh, dw = (int(v) for v in a["dilation"])
        ph, pw = (int(v) for v in a["padding"])
        sh, sw = (int(v) for v in a["stride"])
        if x.ty.ndim not in (3, 4):
            raise EmitError(f"im2col of a {x.ty.ndim}-D input (3-D or 4-D)")
        bb, op = self.bb, relax.op
        unbatched = x.ty.ndim == 3
        if unbatched:
            x = bb.emit(op.expand_dims(x, 0))
        y = bb.emit_te(_im2col_te, x, (kh, kw), (dh, dw), (ph, pw), (sh, sw),
                       primfunc_name_hint="im2col")
        return bb.emit(op.squeeze(y, [0])) if unbatched else y

    def _layer_norm(self, node: fx.Node):
        """``aten.layer_norm`` with float64 row statistics.

        TVM's ``nn.layer_norm`` sums each row serially in float32; on a residual stream with
        outlier channels (MiniLM: rows of 384 with |x| up to ~20) its mean and variance are
        off by tens of ulps, so its output is up to ~6e-5 from ATen's (whose cascaded Welford
        moments are close to exact), and the quantize that follows flips an LSB now and then.
        Here the mean and biased variance are accumulated in float64 and rounded to float32;
        the rest is ATen's float32 arithmetic: ``rstd = 1 / sqrt(var + eps)``,
        ``(x - mean) * rstd * weight + bias``. Not bit-exact against ATen (its moments are
        float32 Welford sums), but within the rounding of the exact result. One kernel
        (``kernels/layer_norm.py``); several normalized axes are flattened into one row.
        """
        x = self.env[node.args[0]]
        normalized_shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        args = list(node.args) + [None] * (5 - len(node.args))
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        bias = args[3] if args[3] is not None else node.kwargs.get("bias")
        eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
        dtype = x.ty.dtype
        if dtype != "float32":
            raise EmitError(f"layer_norm on {dtype} input (float32 only)")
        n = 1
        for d in normalized_shape:
            n *= int(d)
        op, bb = relax.op, self.bb
        shape = x.ty.shape
        flat = len(normalized_shape) != 1
        if flat:  # normalized over several trailing axes: one row of their product
            lead = list(shape.values[:len(shape.values) - len(normalized_shape)])
            x = bb.emit(op.reshape(x, lead + [n]))
        w, b = (None if t is None else self._lookup(t) for t in (weight, bias))
        if flat:
            w, b = (None if t is None else bb.emit(op.reshape(t, [n])) for t in (w, b))
        y = bb.emit_te(layer_norm_k.layer_norm_last_axis, x, w, b, float(eps),
                       primfunc_name_hint="layer_norm")
        if flat:
            y = bb.emit(op.reshape(y, shape))
        return y

    def _batch_norm(self, node: fx.Node):
        """``aten.batch_norm`` in inference: a batch norm ``FoldBatchNorm`` could not fold.

        TVM's converter sends ``batch_norm.default`` to its ``_native_batch_norm_legit_no_training``
        handler, which reads that op's argument positions (momentum, eps) from this one's
        (training, momentum): it normalised with the batch's own statistics and eps = 0.1.
        Here, as ATen's CPU kernel: ``x * a + b`` per channel (axis 1), ``a = weight / sqrt(var
        + eps)``, ``b = bias - mean * a``, the constants computed in float32 at emit time.
        """
        a = bind_args(node)
        if a["training"]:
            raise EmitError("batch_norm with training=True (put the model in eval mode)")
        x = self.env[node.args[0]]
        channels = int(x.ty.shape.values[1])

        def const(name: str, fill: float) -> torch.Tensor:
            if a[name] is None:
                return torch.full((channels,), fill)
            return torch.from_numpy(self.numpy(a[name])).float()

        alpha = const("weight", 1.0) * (1 / torch.sqrt(const("running_var", 1.0) + a["eps"]))
        beta = const("bias", 0.0) - const("running_mean", 0.0) * alpha
        shape = [channels] + [1] * (x.ty.ndim - 2)
        op, bb = relax.op, self.bb
        scale = relax.const(alpha.reshape(shape).numpy())
        shift = relax.const(beta.reshape(shape).numpy())
        return bb.emit(op.add(op.multiply(x, scale), shift))

    def _sdpa(self, node: fx.Node):
        """``aten.scaled_dot_product_attention`` in float32, as PyTorch's math reference:
        ``softmax(q @ k^T * scale + mask) @ v`` with a boolean mask (False: -inf, what
        ``transformers`` encoders build), an additive float mask, or ``is_causal`` (key j seen
        from query i where j <= i). Used where TVM's converter cannot (``_needs_own_sdpa``);
        the softmax is ``kernels/softmax.py``'s. Within float tolerance of ATen (its CPU
        kernel blocks the sums differently)."""
        if not _needs_own_sdpa(node):
            return None
        a = bind_args(node)
        if a.get("enable_gqa"):
            raise EmitError("scaled_dot_product_attention with enable_gqa=True")
        if a["dropout_p"]:
            raise EmitError(f"scaled_dot_product_attention with dropout_p={a['dropout_p']} "
                            "(put the model in eval mode)")
        bb, op = self.bb, relax.op
        q, k, v = (self.env[a[n]] for n in ("query", "key", "value"))
        ndim = q.ty.ndim
        order = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        scale = a["scale"] if a["scale"] is not None else \
            1.0 / float(np.sqrt(int(q.ty.shape.values[-1])))
        s = bb.emit(op.multiply(op.matmul(q, bb.emit(op.permute_dims(k, order))),
                                relax.const(np.float32(scale))))
        mask = a["attn_mask"]
        if mask is not None:
            m = self.env[mask]
            val = mask.meta.get("val")
            if m.ty.dtype == "bool" or (val is not None and val.dtype == torch.bool):
                if m.ty.dtype != "bool":  # (TVM's converters may emit a bool op as int8)
                    m = bb.emit(op.astype(m, "bool"))
                s = bb.emit(op.where(m, s, relax.const(np.float32(-np.inf))))
            else:
                if m.ty.dtype != "float32":
                    m = bb.emit(op.astype(m, "float32"))
                s = bb.emit(op.add(s, m))
        if a["is_causal"]:
            s = bb.emit_te(_causal, s, primfunc_name_hint="causal_mask")
        p = bb.emit_te(softmax_k.softmax_last_axis, s, primfunc_name_hint="softmax")
        return bb.emit(op.matmul(p, v))

    def _softmax(self, node: fx.Node):
        """``aten.softmax`` / ``aten._softmax`` on float32 with the strategy's row kernel
        (``Strategy.kernels["softmax"]``, CPU) or ``kernels/softmax.py`` (a vectorizable ``exp``, see its
        docstring for the accuracy against ATen); a dim other than the last is moved last and
        back. None (TVM's own converter) for other dtypes."""
        x = self.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        if node.target is torch.ops.aten.softmax.int:
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        else:  # _softmax(x, dim, half_to_float)
            dtype = None
        if x.ty.dtype != "float32" or dtype not in (None, torch.float32):
            return None
        ndim = x.ty.ndim
        dim = int(dim) % ndim
        bb, op = self.bb, relax.op
        if dim != ndim - 1:
            order = [a for a in range(ndim) if a != dim] + [dim]
            back = [order.index(a) for a in range(ndim)]
            x = bb.emit(op.permute_dims(x, order))
        build = self.strategy.kernel("softmax")
        y = build(self, x) if build else None
        if y is None:
            y = bb.emit_te(softmax_k.softmax_last_axis, x, primfunc_name_hint="softmax")
        if dim != ndim - 1:
            y = bb.emit(op.permute_dims(y, back))
        return y

    def _float_conv(self, node: fx.Node, nhwc: bool = False):
        """A float32 conv with constant weights (one the accuracy guard kept float) in a form
        the glue schedule handles; TVM's own ``conv2d`` is left unscheduled (one core:
        MobileNetV2's 1x1 960 -> 160 on a 7x7 map 15 ms, its 3x3 depthwise on 32 x 112 x 112
        2.7 ms). 1x1 (stride 1, no padding, groups 1): ``x_nhwc @ w^T + bias``, which meets
        the column-reduction rule as a float ``linear`` does; depthwise: the sum over the
        kernel taps times per-channel weights, taps summed in (r, s) order (CPU: one
        channel-last kernel, ``conv2d.depthwise_float_nhwc``, between two transposes;
        otherwise strided slices, one injective kernel after fusion). None: TVM's
        converter."""
        form = self._float_conv_form(node)
        if form is None:
            return None
        kind, w, b, geometry = form
        x = node.args[0]
        xv = self.nhwc_env[x] if nhwc else self.env.get(x)
        if kind == "pointwise":
            return self._pointwise_conv(xv, w, b, nhwc)
        return self._depthwise_conv(xv, w, b, *geometry, nhwc=nhwc)

    def _float_conv_form(self, node: fx.Node, need_value: bool = True):
        """``(kind, weight, bias, (stride, padding, dilation))`` of a float conv
        :meth:`_float_conv` emits (``kind``: ``pointwise`` or ``depthwise``, the latter with
        a static height and width), else None. ``need_value=False``: judged from torch's
        recorded input (before the input is emitted)."""
        args = list(node.args) + [None] * (7 - len(node.args))
        x, weight, bias, stride, padding, dilation, groups = args
        xt = self._nchw_type(x)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if xt is None and not need_value and isinstance(val, torch.Tensor) and val.dim() == 4:
            xt = (str(val.dtype).replace("torch.", ""), list(val.shape))
        if (xt is None or xt[0] != "float32"
                or not isinstance(weight, fx.Node) or weight.op != "get_attr"
                or (bias is not None and (not isinstance(bias, fx.Node)
                                          or bias.op != "get_attr"))
                or not all(isinstance(v, (int, list, tuple, type(None)))
                           for v in (stride, padding, dilation, groups))):
            return None
        w = self.numpy(weight)
        if w.ndim != 4 or w.dtype != np.float32:
            return None
        (sh, sw), (ph, pw), (dh, dw) = (ptq_ops._pair(1 if stride is None else stride),
                                        ptq_ops._pair(0 if padding is None else padding),
                                        ptq_ops._pair(1 if dilation is None else dilation))
        groups = 1 if groups is None else int(groups)
        b = None if bias is None else relax.const(self.numpy(bias).astype(np.float32))
        geometry = ((sh, sw), (ph, pw), (dh, dw))
        if w.shape[2:] == (1, 1) and groups == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0):
            return "pointwise", w, b, geometry
        c = w.shape[0]
        if (groups > 1 and groups == c and w.shape[1] == 1 and ptq_ops._static(xt[1][1]) == c
                and all(ptq_ops._static(d) is not None for d in xt[1][2:])):
            return "depthwise", w, b, geometry
        return None

    def _depthwise_conv(self, xv, w: np.ndarray, b, stride, padding, dilation,
                        nhwc: bool = False):
        """``nhwc``: ``xv`` is channel-last and so is the result (CPU only; else None)."""
        bb, op = self.bb, relax.op
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        c, _, kh, kw = w.shape
        h, wd = (xv.ty.shape.values[1:3] if nhwc else xv.ty.shape.values[2:])
        h, wd = ptq_ops._static(h), ptq_ops._static(wd)
        if h is None or wd is None or (nhwc and not self.strategy.schedule_glue):
            return None
        if self.strategy.schedule_glue:  # CPU: channel-last taps, one opaque kernel
            x_nhwc = xv if nhwc else bb.emit(op.permute_dims(xv, [0, 2, 3, 1]))
            taps = relax.const(np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)))
            args = [x_nhwc, taps] + ([b] if b is not None else [])
            y = bb.emit_te(lambda x_, w_, *b_: conv_k.depthwise_float_nhwc(
                x_, w_, b_[0] if b_ else None, stride, padding, dilation), *args,
                primfunc_name_hint="depthwise_float",
                primfunc_attrs={"op_pattern": ptq_ops._OPAQUE})
            return y if nhwc else bb.emit(op.permute_dims(y, [0, 3, 1, 2]))
        oh = conv_k.out_size(h, kh, sh, ph, dh)
        ow = conv_k.out_size(wd, kw, sw, pw, dw)
        xp = xv if (ph, pw) == (0, 0) else bb.emit(op.nn.pad(xv, [0, 0, 0, 0, ph, ph, pw, pw]))
        acc = None
        for r in range(kh):
            for s_ in range(kw):
                tap = bb.emit(op.strided_slice(
                    xp, axes=[2, 3], begin=[r * dh, s_ * dw],
                    end=[r * dh + (oh - 1) * sh + 1, s_ * dw + (ow - 1) * sw + 1],
                    strides=[sh, sw]))
                term = bb.emit(op.multiply(tap, relax.const(
                    np.ascontiguousarray(w[:, 0, r, s_].reshape(1, c, 1, 1)))))
                acc = term if acc is None else bb.emit(op.add(acc, term))
        if b is not None:
            acc = bb.emit(op.add(acc, op.reshape(b, [1, c, 1, 1])))
        return acc

    def _pointwise_conv(self, xv, w: np.ndarray, b, nhwc: bool = False):
        """``nhwc``: ``xv`` is channel-last and so is the result."""
        bb, op = self.bb, relax.op
        if nhwc:
            n, h, wd, c = xv.ty.shape.values
            y = xv
        else:
            n, c, h, wd = xv.ty.shape.values
            y = bb.emit(op.permute_dims(xv, [0, 2, 3, 1]))
        y = bb.emit(op.reshape(y, [-1, int(w.shape[1])]))
        y = bb.emit(op.matmul(y, relax.const(np.ascontiguousarray(w[:, :, 0, 0].T))))
        if b is not None:
            y = bb.emit(op.add(y, b))
        y = bb.emit(op.reshape(y, [n, h, wd, int(w.shape[0])]))
        return y if nhwc else bb.emit(op.permute_dims(y, [0, 3, 1, 2]))

    def _float32_input(self, node: fx.Node):
        """The value of ``node``'s first argument if it is a float32 tensor, else None."""
        x = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return x if getattr(getattr(x, "ty", None), "dtype", None) == "float32" else None

    def _erf(self, node: fx.Node):
        """float32 ``erf`` and ``gelu`` (``kernels/erf.py``; the tanh GELU with
        ``kernels/tanh.py``): TVM's own call libm per element. None for other dtypes (TVM's
        converter)."""
        x = self._float32_input(node)
        if x is None:
            return None
        if node.target is torch.ops.aten.gelu.default:
            approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                "approximate", "none")
            if approximate == "tanh":
                return self.bb.emit_te(tanh_k.gelu_tanh, x, primfunc_name_hint="gelu_tanh")
            if approximate != "none":
                return None
            return self.bb.emit_te(erf_k.gelu, x, primfunc_name_hint="gelu")
        return self.bb.emit_te(erf_k.erf, x, primfunc_name_hint="erf")

    def _tanh(self, node: fx.Node):
        """float32 ``tanh`` (``kernels/tanh.py``: TVM's own lowering returns 0 for tiny
        inputs); None for other dtypes (TVM's converter)."""
        x = self._float32_input(node)
        if x is None:
            return None
        return self.bb.emit_te(tanh_k.tanh, x, primfunc_name_hint="tanh")


_getitem = operator.getitem

#: aten ops (``name.overload``) the emitter builds itself: key -> method, which returns the
#: value, or None to leave the node to TVM's converter (another dtype, an unsupported form).
_OWN_EMITTERS = {
    "clamp.default": "_clamp", "im2col.default": "_im2col",
    "layer_norm.default": "_layer_norm", "batch_norm.default": "_batch_norm",
    "scaled_dot_product_attention.default": "_sdpa", "repeat.default": "_repeat",
    "slice.Tensor": "_slice", "softmax.int": "_softmax", "_softmax.default": "_softmax",
    "tanh.default": "_tanh", "erf.default": "_erf", "gelu.default": "_erf",
    "conv2d.default": "_float_conv",
}


#: Elementwise float ops emitted channel-last on channel-last inputs of one shape
#: (``Emitter._emit_float_nhwc``): each computes the same in any layout.
_NHWC_FLOAT_OPS = frozenset({
    "hardtanh.default", "relu.default", "relu6.default", "clamp.default", "sigmoid.default",
    "silu.default", "hardswish.default", "hardsigmoid.default", "gelu.default", "erf.default",
    "tanh.default", "neg.default", "add.Tensor", "sub.Tensor", "mul.Tensor"})

_MISSING = object()

_SYM_MIN_MAX = (torch.sym_min, torch.sym_max)

#: Integer scalar ops ``Emitter._scalar`` computes as ``PrimExpr`` s (with ``item``).
_SCALAR_KEYS = {"scalar_tensor.default", "item.default", "neg.default", "add.Tensor",
                "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor",
                "mul.Tensor", "mul.Scalar"}



def _as_expr(value):
    """An int or ``PrimExpr`` as an int64 ``PrimExpr``."""
    if isinstance(value, int):
        return tirx.IntImm("int64", value)
    return value if str(value.ty.dtype) == "int64" else tirx.Cast("int64", value)


def _is_prim(value) -> bool:
    """Whether ``value`` is a TIR expression (a size), not a Relax tensor or a number."""
    return isinstance(value, tvm.ir.Expr) and isinstance(getattr(value, "ty", None),
                                                         tvm.ir.PrimType)


#: aten ops whose output is a view of their first input (an in-place op on it writes there).
#: Memory aliasing, not ``ptqpasses.opsets.VIEWS`` (the shape-only ops that pass qparams
#: through): ``clone`` / ``contiguous`` copy, ``split`` / ``unbind`` alias.
_VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze",
          "squeeze", "expand", "slice", "select", "alias", "flatten", "unflatten", "narrow",
          "as_strided", "diagonal", "split", "chunk", "unbind", "getitem", "detach"}


def _writes_only_its_own(node: fx.Node) -> bool:
    """Whether the tensor an in-place ``node`` writes (its first argument) and every tensor
    that shares its memory (the views it is made of, up to their base) are read by no other
    node, and the base is computed in the graph (not an input or constant)."""
    cur = node.args[0]
    while True:
        if not isinstance(cur, fx.Node) or len(cur.users) != 1 or cur.op != "call_function":
            return False
        op = "getitem" if cur.target is _getitem else \
            getattr(cur.target, "__name__", "").split(".")[0]
        if op not in _VIEWS:
            return True
        cur = cur.args[0]


def _live_nodes(graph: fx.Graph) -> set:
    """The nodes the graph's output depends on (not: runtime assertions on sizes, such as
    ``_assert_scalar(ge(sym_size(x), 0))``, and other dead code)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    live, stack = {out}, [out]
    while stack:
        for n in stack.pop().all_input_nodes:
            if n not in live:
                live.add(n)
                stack.append(n)
    return live


def _needs_own_sdpa(node: fx.Node) -> bool:
    """A boolean mask or ``is_causal``: TVM's converter takes neither (it stays the path for
    float and absent masks: its ``nn.attention`` is scheduled, where our matmul + quantize
    epilogue is left to TVM's default lowering by the glue schedule)."""
    a = bind_args(node)
    mask = a["attn_mask"]
    val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    return bool(a["is_causal"]) or (val is not None and val.dtype == torch.bool)


def _causal(s):
    """Scores ``[..., L, S]`` with key ``j > i`` set to -inf (``is_causal``: ``tril`` of L x S)."""
    from tvm import te

    def f(*i):
        return tirx.Select(i[-1] > i[-2], tirx.const(-np.inf, "float32"), s(*i))

    return te.compute(s.shape, f, name="causal")


def _im2col_te(x, kernel, dilation, padding, stride):
    """The TE compute of ``Emitter._im2col`` on a 4-D ``x``."""
    from tvm import te

    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    out_h = tirx.floordiv(h + 2 * ph - (dh * (kh - 1) + 1), sh) + 1
    out_w = tirx.floordiv(w + 2 * pw - (dw * (kw - 1) + 1), sw) + 1
    zero = tirx.const(0, x.dtype)

    def f(b, col, blk):
        ch, rest = tirx.floordiv(col, kh * kw), tirx.floormod(col, kh * kw)
        i, j = tirx.floordiv(rest, kw), tirx.floormod(rest, kw)
        y = tirx.floordiv(blk, out_w) * sh - ph + i * dh
        z = tirx.floormod(blk, out_w) * sw - pw + j * dw
        inside = tirx.all(y >= 0, y < h, z >= 0, z < w)
        return tirx.if_then_else(inside, x[b, ch, tirx.max(tirx.min(y, h - 1), 0),
                                           tirx.max(tirx.min(z, w - 1), 0)], zero)

    return te.compute((n, c * kh * kw, out_h * out_w), f, name="im2col")


_CONSTANT_ARGS = ("weight", "bias", "multiplier", "scales", "zero_points", "table", "w_scale")


#: Elementwise float functions that torch also applies to integer tensors (in float).
_FLOAT_MATH = {f"{op}.default" for op in (
    "log", "log2", "log10", "log1p", "exp", "exp2", "expm1", "sqrt", "rsqrt", "sin", "cos",
    "tan", "tanh", "sigmoid", "erf", "reciprocal", "atan", "asin", "acos")}


def _at(node: fx.Node) -> str:
    """`` at <module path> (<file>:<line>)`` of the user's model, when the graph says."""
    from ptqpasses.meta import location

    where = location(node)
    return f" at {where}" if where else ""


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def emit_relax(gm: fx.GraphModule, strategy: Strategy,
               inputs: Sequence[TensorSpec]) -> tvm.IRModule:
    """Emit the Relax IRModule of ``gm`` for ``strategy`` (the public entry point, which takes
    a target name, is ``ptqpasses_backends.tvm.emit``).

    Args:
        gm: Integer-operator graph.
        strategy: The target's strategy (``registry.strategy_for``).
        inputs: One spec per placeholder; named dims become symbolic (shared by name).
    """
    em = Emitter(gm, strategy)
    mod = em.run(inputs)
    if em.fused:  # the producers' plain calls, replaced by fused ones
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
    if em.variants:
        mod = mod.with_attr(VARIANTS_ATTR, json.dumps(em.variants))
    return mod


#: IRModule attribute (JSON): packed kernel node -> [strategy variant, why] (see
#: ``Strategy.choose``); ``compile`` copies it to ``CompiledModule.meta["variants"]``.
VARIANTS_ATTR = "ptq.variants"
