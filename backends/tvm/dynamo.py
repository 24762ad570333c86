"""``dynamo_backend``: a ``torch.compile`` backend that quantizes each captured graph and
compiles it with TVM.

    backend = ptqpasses_backends.tvm.dynamo_backend(calibration_data, target="host")
    compiled = torch.compile(model, backend=backend)
    backend.calibrate(compiled)          # runs the calibration batches, quantizes, compiles
    y = compiled(x)                      # int8 TVM kernels; graphs it cannot serve: inductor
    print(backend.summary())             # which graph is served by what, and why

Why calibration is a separate call: dynamo hands a backend one fx graph at a time (a graph
ends at every graph break) with that graph's own example inputs, never the model. The
calibration batches are *model* inputs; only running the model turns them into the inputs of
the graphs after a break (the Python between two graphs must run). So the backend first
returns a recording stand-in for every graph; ``calibrate(compiled)`` runs every batch
through the compiled model (each graph runs in float and records its inputs), then
quantizes each graph on its own recorded inputs (``prepare``, ``calibrate``, ``convert``)
and swaps in the TVM module. Without a graph break the one graph sees exactly the model's
batches, so the result equals ``ptqpasses.quantize`` + ``ptqpasses_backends.tvm.compile``.
``dynamo_backend(None, calibration_calls=N)`` needs no extra call: each graph records its
first N calls (which run in float) and is quantized after the N-th.

How a dynamo graph becomes a quantizable one: its parameter and buffer inputs (dynamo passes
module state as graph inputs) are frozen into constants, its size inputs (``s0`` =
``x.size(0)`` after a recompile with dynamic shapes) are computed from the tensors, and the
result is captured again with ``torch.export``, keeping dynamo's dynamic dimensions dynamic.
Like inductor's freezing, the weights are read once: after changing them, call
``torch._dynamo.reset()`` and build a new backend.

A graph compiled later (dynamo recompiles on a new batch size, a grad-mode change, ...)
reuses the recorded inputs of the earlier graph at the same place in the program (same
input sources and operators), and its TVM module when the input shapes agree. A graph that
cannot be served (nothing recorded for it, capture or lowering fails, no integer operator
in it, TVM cannot emit it) falls back to inductor (or eager if inductor fails too) with a
``logging`` warning naming the graph and the reason; ``report()`` lists every decision.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch.export import Dim
from tqdm.auto import tqdm

from ptqpasses_backends.tvm.compile import compile as tvm_compile
from ptqpasses_backends.tvm.targets import resolve, runs_here
from ptqpasses.calibrate import _as_args
from ptqpasses.config import ConfigError, QuantConfig, _module_stack
from ptqpasses.observers import CalibrationError

log = logging.getLogger(__name__)

_FALLBACKS = ("inductor", "eager")


@dataclass
class GraphStatus:
    """What the backend did with one captured graph.

    Attributes:
        name: ``graph_<i>`` in the order dynamo compiled them.
        inputs: dynamo's sources of the graph's activation inputs (``L['x']``).
        served_by: ``"tvm"``, ``"inductor"``, ``"eager"``, or ``"recording"`` before calibration.
        reason: why it fell back (empty when served by TVM).
        calibration_batches: how many recorded inputs it was calibrated on.
        integer_ops: integer operators in its quantized graph.
        float_ops: compute nodes left in float (each with its reason in ``ptqpasses.coverage``).
        qgraph: the integer-op graph TVM compiled (for ``ptqpasses.coverage`` / ``report``).
    """

    name: str
    inputs: tuple[str, ...]
    served_by: str = "recording"
    reason: str = ""
    calibration_batches: int = 0
    integer_ops: int = 0
    float_ops: int = 0
    qgraph: Optional[fx.GraphModule] = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        what = {"tvm": f"TVM ({self.integer_ops} integer ops, {self.float_ops} float, "
                       f"calibrated on {self.calibration_batches} batches)"}.get(
            self.served_by, self.served_by)
        why = f": {self.reason}" if self.reason else ""
        return f"{self.name} (inputs {', '.join(self.inputs) or '-'}): {what}{why}"


class _Unservable(Exception):
    """This graph cannot be served by TVM; the message is the reason logged."""


@dataclass
class _Inputs:
    """How the flat inputs dynamo passes map onto a frozen, export-able module."""

    consts: dict[int, tuple[str, torch.Tensor]]  # input index -> (attribute name, tensor)
    acts: list[int]                              # input indices of activation tensors
    sizes: dict[int, tuple[int, int]]            # input index -> (activation position, dim)
    sources: tuple[str, ...]                     # activation sources, e.g. "L['x']"
    shapes: tuple[tuple[Optional[int], ...], ...]  # activation shapes, None = symbolic

    def fits(self, acts: Sequence[torch.Tensor]) -> bool:
        return all(len(s) == a.dim() and all(d is None or d == n for d, n in zip(s, a.shape))
                   for s, a in zip(self.shapes, acts))


def _static_size(d) -> Optional[int]:
    """The size if it is a number (also a SymInt that guards specialised), else None."""
    if isinstance(d, int):
        return d
    expr = d.node.expr
    env = getattr(d.node, "shape_env", None)
    expr = env.replace(expr) if env is not None else expr
    return int(expr) if expr.is_number else None


def _classify(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> _Inputs:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Unservable(f"{len(placeholders)} placeholders but {len(example_inputs)} inputs")
    consts, acts, sizes, sources, shapes = {}, [], {}, [], []
    size_sources = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else node.name
        static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
        if isinstance(ex, torch.Tensor) and (static is not None or
                                             isinstance(ex, torch.nn.Parameter)):
            consts[i] = (node.name, ex)
        elif isinstance(ex, torch.Tensor):
            acts.append(i)
            sources.append(source)
            val = node.meta.get("example_value", ex)
            shapes.append(tuple(_static_size(d) for d in val.shape))
        elif isinstance(ex, (int, torch.SymInt)):
            src = grapharg.source if grapharg is not None else None
            base = getattr(getattr(src, "base", None), "name", None)
            if getattr(getattr(src, "prop", None), "name", None) != "SIZE" or base is None:
                raise _Unservable(f"input {node.name!r} is a Python number from {source} "
                                  "(only tensor sizes are supported)")
            size_sources[i] = (base, src.idx)
        else:
            raise _Unservable(f"input {node.name!r} ({source}) is a {type(ex).__name__}, "
                              "not a tensor")
    for i, (base, dim) in size_sources.items():
        if base not in sources:
            raise _Unservable(f"size input {placeholders[i].name!r} is a size of {base}, "
                              "which is not an activation input of this graph")
        sizes[i] = (sources.index(base), dim)
    if not acts:
        raise _Unservable("the graph has no activation inputs (it only reads constants)")
    return _Inputs(consts, acts, sizes, tuple(sources), tuple(shapes))


def _freeze(gm: fx.GraphModule, inputs: _Inputs) -> fx.GraphModule:
    """A copy of a dynamo graph whose only inputs are the activations: parameters and buffers
    become attributes (``get_attr``), size inputs become ``x.size(d)``; ``torch.export`` can
    capture it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in inputs.acts:
        env[placeholders[i]] = graph.placeholder(placeholders[i].name)
    root = torch.nn.Module()
    for node in gm.graph.nodes:  # modules and tensors the graph reads from its own root
        if node.op in ("get_attr", "call_module"):
            _copy_attr(gm, root, node.target)
    for i, (name, t) in inputs.consts.items():
        if isinstance(t, torch.nn.Parameter):
            root.register_parameter(name, t)
        else:
            root.register_buffer(name, t)
        env[placeholders[i]] = graph.get_attr(name)
    for i, (pos, dim) in inputs.sizes.items():
        act = env[placeholders[inputs.acts[pos]]]
        env[placeholders[i]] = graph.call_method("size", (act, dim))
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return fx.GraphModule(root, graph)


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    *path, name = target.split(".")
    for part in path:
        src = getattr(src, part)
        if not hasattr(dst, part):
            dst.add_module(part, torch.nn.Module())
        dst = getattr(dst, part)
    value = getattr(src, name)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        dst.register_buffer(name, value)
    else:
        setattr(dst, name, value)


_ROOT = re.compile(r"^L\['[^']*'\]\.?")


def _module_paths_from_root(gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo names modules from the frame's local (``L['self'].layer1.0``); QuantConfig's
    ``by_module_name`` uses paths from the model (``layer1.0``), as the direct path does."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_ROOT.sub("", path), t)
                                            for k, (path, t) in stack.items()}
    return gm


def _config_for(config: QuantConfig, graph: fx.Graph) -> tuple[QuantConfig, set]:
    """``config`` keeping only the names and regexes that match something in this graph
    (a graph break splits the model; each graph has only its part), and those kept."""
    nodes = {n.name for n in graph.nodes}
    paths = {path for n in graph.nodes for path, _ in _module_stack(n)}
    names = {k: v for k, v in config.by_module_name.items() if k in paths}
    keep = tuple(k for k in config.keep_float if k in paths or k in nodes)
    regex = {p: v for p, v in config.by_node_regex.items()
             if any(re.fullmatch(p, n) for n in nodes)}
    used = ({("by_module_name", k) for k in names} | {("keep_float", k) for k in keep}
            | {("by_node_regex", p) for p in regex})
    return replace(config, by_module_name=names, keep_float=keep, by_node_regex=regex), used


@dataclass
class _Group:
    """Graphs at the same place in the program (a recompile makes another): they share the
    recorded calibration inputs and, for equal input shapes, the compiled TVM module."""

    recordings: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    served: list[tuple[_Inputs, Callable, GraphStatus]] = field(default_factory=list)
    #: held while a graph of the group is quantized and compiled: threads calling it then
    #: wait for the one module instead of each building their own (served calls take no lock)
    lock: threading.RLock = field(default_factory=threading.RLock)


class _Graph:
    """The callable dynamo runs for one captured graph; its implementation is swapped from
    recording to TVM (or a fallback) in place, so dynamo's cache keeps pointing at it."""

    def __init__(self, backend: "DynamoBackend", gm: fx.GraphModule, example_inputs,
                 name: str):
        self.backend, self.gm, self.name = backend, gm, name
        self.inputs: Optional[_Inputs] = None
        self.group: Optional[_Group] = None
        self.impl: Optional[Callable] = None
        self.status = GraphStatus(name, ())
        try:
            self.inputs = _classify(gm, example_inputs)
        except _Unservable as e:
            self.fall_back(str(e))
            return
        self.status.inputs = self.inputs.sources
        self.group = backend._group(self._key())

    def _key(self) -> tuple:
        # tensor-valued operators only: a recompile with dynamic shapes adds size arithmetic
        ops = tuple(str(n.target) for n in self.gm.graph.nodes
                    if n.op in ("call_function", "call_method", "call_module")
                    and not isinstance(n.meta.get("example_value"), (int, torch.SymInt)))
        consts = tuple(name for name, _ in self.inputs.consts.values())
        return self.inputs.sources, consts, ops

    def __call__(self, *args):
        if self.impl is not None:
            return self.impl(*args)
        backend = self.backend
        calls = backend._calibration_calls
        if backend._calibrated or (calls and len(self.group.recordings) >= calls):
            self.finalize()  # a recompile after calibration: reuse the group's recordings
            return self.impl(*args)
        if not backend._recording():
            raise RuntimeError(
                f"ptqpasses_backends.tvm.dynamo_backend: {self.name} has not been calibrated; call "
                "backend.calibrate(compiled_model) once before running the compiled model")
        acts = tuple(args[i].detach().clone() for i in self.inputs.acts)
        self.group.recordings.append(acts)
        backend._recorded_calls += 1
        with torch.no_grad():
            out = self.gm(*args)
        if backend._calibration_calls and len(self.group.recordings) >= backend._calibration_calls:
            self.finalize()
        return out

    def finalize(self) -> None:
        """Quantizes and compiles this graph on its group's recordings, or falls back."""
        if self.impl is not None:
            return
        with self.group.lock:
            if self.impl is None:  # (another thread may have finished it while we waited)
                self._finalize()

    def _finalize(self) -> None:
        for inputs, impl, status in self.group.served:
            if inputs.shapes == self.inputs.shapes:
                self._serve(impl, status)
                log.info("%s reuses the TVM module of an earlier graph with the same inputs",
                         self.name)
                return
        try:
            impl = self._quantize_and_compile()
        except _Unservable as e:
            self.fall_back(str(e))
            return
        self.group.served.append((self.inputs, impl, self.status))
        self._serve(impl, self.status)
        log.info("ptqpasses_backends.tvm.dynamo_backend: %s", self.status)

    def _serve(self, module: Callable, status: GraphStatus) -> None:
        acts = self.inputs.acts
        self.status.served_by, self.status.reason = "tvm", ""
        for attr in ("calibration_batches", "integer_ops", "float_ops", "qgraph"):
            setattr(self.status, attr, getattr(status, attr))
        self.impl = lambda *args: module(*[args[i] for i in acts])

    def _quantize_and_compile(self) -> Callable:
        from ptqpasses.api import convert, prepare
        from ptqpasses.calibrate import calibrate, observers
        from ptqpasses.report import coverage

        data = [r for r in self.group.recordings if self.inputs.fits(r)]
        if not data:
            raise _Unservable("no calibration data reached this graph (it was first compiled "
                              "after calibration, and no earlier graph ran at this place)")
        frozen = _freeze(self.gm, self.inputs)
        # dynamo's symbolic dimensions stay dynamic; AUTO lets export specialise the ones the
        # graph fixes (dynamic=True makes even channel counts symbolic)
        dims = tuple({d: Dim.AUTO for d, n in enumerate(s) if n is None} or None
                     for s in self.inputs.shapes)
        try:
            ep = torch.export.export(frozen, data[0], dynamic_shapes=dims, strict=False)
        except Exception as e:  # torch raises many unrelated types here
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            raise _Unservable(f"torch.export could not capture it: {type(e).__name__}: "
                              f"{first}") from e
        gm = _module_paths_from_root(ep.module())
        config, used = _config_for(self.backend.config or QuantConfig(), gm.graph)
        self.backend._config_used |= used
        try:
            observed = prepare(gm, (), config)
            if not observers(observed):
                ops = sorted({str(n.target) for n in observed.graph.nodes
                              if n.op == "call_function"})
                raise _Unservable("nothing in it can be quantized (its operators: "
                                  f"{', '.join(ops) or 'none'})")
            calibrate(observed, data, progress=False)
            qgraph = convert(observed)
        except _Unservable:
            raise
        except CalibrationError as e:
            raise _Unservable(f"{type(e).__name__}: {e}") from e
        except Exception as e:  # a pass failing on an unforeseen graph: fall back, say why
            raise _Unservable(f"quantization failed: {type(e).__name__}: {e}") from e
        cov = coverage(qgraph)
        n_int = sum(c.integer for c in cov)
        if n_int == 0:
            raise _Unservable("no operator in it was quantized (nothing for the int8 kernels)")
        try:
            module = tvm_compile(qgraph, self.backend.target, dynamic_batch=False)
        except Exception as e:  # EmitError, TVM build errors: fall back, say why
            raise _Unservable(f"TVM could not compile it: {type(e).__name__}: {e}") from e
        for pos, shape in enumerate(self.inputs.shapes):
            fixed = [d for d, n in enumerate(shape) if n is None
                     and not isinstance(module.inputs[pos].shape[d], str)]
            if fixed:  # e.g. all calibration batches had size 1, and export kept it at 1
                raise _Unservable(
                    f"dims {fixed} of input {self.inputs.sources[pos]} are dynamic in the "
                    f"graph but fixed to {[data[0][pos].shape[d] for d in fixed]} in the "
                    "compiled module (calibrate with batches of another size)")
        self.status.calibration_batches = len(data)
        self.status.integer_ops, self.status.float_ops = n_int, len(cov) - n_int
        self.status.qgraph = qgraph
        return module

    def fall_back(self, reason: str) -> None:
        how = self.backend.fallback
        log.warning("ptqpasses_backends.tvm.dynamo_backend: %s falls back to %s: %s",
                    self.name, how, reason)
        self.status.served_by, self.status.reason = how, reason
        if how == "eager":
            self.impl = self.gm
            return
        compiled = torch.compile(self.gm, backend="inductor")
        gm = self.gm

        def run(*args):
            nonlocal compiled
            if compiled is gm:
                return gm(*args)
            try:
                return compiled(*args)
            except Exception as e:  # inductor itself failed (e.g. no C++ compiler)
                log.warning("ptqpasses_backends.tvm.dynamo_backend: %s: inductor failed (%s: %s); "
                            "running it eagerly", self.name, type(e).__name__, e)
                self.status.served_by = "eager"
                self.status.reason += f"; inductor failed: {type(e).__name__}"
                compiled = gm
                return gm(*args)

        self.impl = run


class DynamoBackend:
    """A ``torch.compile`` backend that quantizes every captured graph and runs it with TVM.

    Build it with ``ptqpasses_backends.tvm.dynamo_backend``; see this module's docstring for
    the design.
    """

    def __init__(self, calibration_data: Optional[Iterable[Any]], target: Any,
                 config: Optional[QuantConfig], calibration_calls: int, fallback: str):
        self.calibration_data = calibration_data
        self.target = target
        self.config = config
        self.fallback = fallback
        self._calibration_calls = calibration_calls if calibration_data is None else 0
        self._calibrating = False
        self._calibrated = False
        self._graphs: list[_Graph] = []
        self._recorded_calls = 0
        self._config_used: set[tuple[str, str]] = set()
        self._groups: dict[tuple, _Group] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        graph = _Graph(self, gm, example_inputs, f"graph_{len(self._graphs)}")
        self._graphs.append(graph)
        return graph

    def _group(self, key: tuple) -> _Group:
        return self._groups.setdefault(key, _Group())

    def _recording(self) -> bool:
        return self._calibrating or bool(self._calibration_calls)

    def calibrate(self, compiled_model: Callable, *, progress: bool = True):
        """Runs every calibration batch through ``compiled_model`` (each graph runs in float
        and records its inputs), then quantizes and compiles each graph. Returns
        ``compiled_model``. Run it under the grad mode used later (e.g. in ``torch.no_grad()``):
        dynamo recompiles on a change, which costs a second TVM build of each graph.

        Raises:
            CalibrationError: no batches, or no graph reached this backend.
            ConfigError: a QuantConfig name or regex that matched nothing in any graph.
            RuntimeError: called twice, or on a backend built with ``calibration_data=None``.
        """
        if self.calibration_data is None:
            raise RuntimeError("this backend calibrates on the first calls of each graph "
                               "(calibration_data=None); there is nothing to run")
        if self._calibrated:
            raise RuntimeError("the backend is already calibrated; for other data build a new "
                               "backend and call torch._dynamo.reset()")
        data = self.calibration_data
        total = len(data) if hasattr(data, "__len__") else None
        n, before = 0, self._recorded_calls
        self._calibrating = True
        try:
            for batch in tqdm(data, total=total, desc="calibrate", unit="batch",
                              disable=not progress):
                compiled_model(*_as_args(batch))
                n += 1
        finally:
            self._calibrating = False
        if n == 0:
            raise CalibrationError("calibration data yielded zero batches")
        if self._recorded_calls == before:
            raise CalibrationError(
                "no graph reached this backend while calibrating: build the model with "
                "torch.compile(model, backend=<this backend>) and pass that to calibrate")
        self._calibrated = True
        for graph in self._graphs:
            if graph.impl is None:
                graph.finalize()
        self._check_config()
        return compiled_model

    def _check_config(self) -> None:
        config = self.config or QuantConfig()
        named = ({("by_module_name", k) for k in config.by_module_name}
                 | {("keep_float", k) for k in config.keep_float}
                 | {("by_node_regex", p) for p in config.by_node_regex})
        unused = sorted(named - self._config_used)
        if unused:
            raise ConfigError(
                "QuantConfig names matching no module or node of any captured graph: "
                + ", ".join(f"{option} {name!r}" for option, name in unused)
                + " (module paths are as in model.named_modules(); node names are those of "
                "each graph's qgraph in backend.report())")

    def report(self) -> list[GraphStatus]:
        """One entry per captured graph, in compile order."""
        return [g.status for g in self._graphs]

    def summary(self) -> str:
        return "\n".join(str(s) for s in self.report()) or "no graph captured yet"


def dynamo_backend(calibration_data: Optional[Iterable[Any]], target: Any = "host", *,
                   config: Optional[QuantConfig] = None, calibration_calls: int = 8,
                   fallback: str = "inductor") -> DynamoBackend:
    """A ``torch.compile`` backend: quantize each captured graph, compile it with TVM.

    Args:
        calibration_data: model input batches (tuples, or single tensors) for
            ``backend.calibrate(compiled_model)``; ``None`` to calibrate each graph on its
            first ``calibration_calls`` calls instead (those run in float).
        target: a TVM target the outputs run on here (``ptqpasses_backends.tvm.TARGETS`` name
            or dict).
        config: the QuantConfig. Module paths are as in ``model.named_modules()``; each
            graph gets the entries that match something in it, and ``calibrate`` raises
            ConfigError for an entry that matched no graph. Node names are each graph's own.
        calibration_calls: with ``calibration_data=None``, calls recorded per graph.
        fallback: ``"inductor"`` or ``"eager"``, for graphs TVM cannot serve.

    Raises:
        ValueError: an unknown or non-runnable target, empty calibration data, bad options.
    """
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if calibration_data is None and calibration_calls < 1:
        raise ValueError("calibration_calls must be at least 1 when calibration_data is None")
    if isinstance(calibration_data, (torch.Tensor, dict, str)):
        raise TypeError("calibration_data must be an iterable of batches (e.g. a list of input "
                        f"tuples), got a {type(calibration_data).__name__}")
    if calibration_data is not None and hasattr(calibration_data, "__len__") and \
            len(calibration_data) == 0:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    named = resolve(target)
    if not runs_here(named):
        raise ValueError(f"target {named.name!r} cannot run on this machine; a torch.compile "
                         "backend must run what it compiles (use 'host', or "
                         "ptqpasses_backends.tvm.compile to cross-compile)")
    return DynamoBackend(calibration_data, named, config, calibration_calls, fallback)


__all__ = ["DynamoBackend", "GraphStatus", "dynamo_backend"]
