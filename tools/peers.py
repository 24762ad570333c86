"""Peer int8 quantizers (and the ONNX Runtime fp32 session), shared by tools.accuracy and
tools.bench.

Each builder takes the float model and its calibration batches (tuples of positional inputs)
and returns a callable model. Shapes: ``dynamic_batch`` / ``dynamic_dims`` ({input: {dim:
name}}) say which dimensions stay symbolic where the peer specializes on shapes (PT2E export,
ONNX export); the benchmark passes static shapes, the accuracy tool dynamic ones.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Optional

import torch


def needs(*modules: str) -> Optional[str]:
    """An "X not installed (how to install it)" reason for the first missing module, else
    None (callers say "skipped")."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            how = ("pip install --no-deps 'torchao==0.18.*'" if m == "torchao" else
                   "pip install -e '.[bench]'")
            return f"{m} not installed ({how})"
    return None


def fx_int8(model: torch.nn.Module, calib: list[tuple]) -> torch.nn.Module:
    """torch.ao FX: prepare_fx/convert_fx with the 'x86' qconfig mapping (fbgemm/onednn int8
    kernels, quint8 activations, per-channel qint8 weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                          calib[0])
    with torch.no_grad():
        for b in calib:
            prepared(*b)
    return convert_fx(prepared)


FX_NOTE = "torch.ao FX, x86 qconfig mapping, fbgemm int8 kernels"


def pt2e_int8(model: torch.nn.Module, calib: list[tuple], dynamic_batch: bool = True,
              dynamic_dims: Optional[dict] = None) -> torch.fx.GraphModule:
    """torchao PT2E with X86InductorQuantizer (default config: per-channel int8 weights, u8
    activations); returns the converted reference QDQ graph (torch.compile it to get the
    fused int8 inductor kernels)."""
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    shapes = None
    if dynamic_batch or dynamic_dims:
        dims = {"batch": Dim("batch", min=2, max=1024)}  # one Dim object per name
        shapes = []
        for i, _ in enumerate(calib[0]):
            spec = {0: dims["batch"]} if dynamic_batch else {}
            for d, name in (dynamic_dims or {}).get(i, {}).items():
                dims.setdefault(name, Dim(name, min=2, max=128))
                spec[d] = dims[name]
            shapes.append(spec)
        shapes = tuple(shapes)
    model = copy.deepcopy(model).eval()
    ep = torch.export.export(model, calib[0], dynamic_shapes=shapes, strict=False)
    gm = ep.module()
    _split_reused_stateless_calls(gm, model)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for b in calib:
            prepared(*b)
    return convert_pt2e(prepared)


def _split_reused_stateless_calls(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """Gives each call of a reused parameter-free module (ResNet's one ``relu`` per block) its
    own ``source_fn_stack`` entry. Without it, torch.fx's source partitions (keyed by the
    module's name when export records no source_fn_stack) put both calls in one partition,
    and X86InductorQuantizer raises "Input partition has more than one output node"."""
    by_fqn: dict[str, list] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack and "source_fn_stack" not in node.meta:
            by_fqn.setdefault(list(stack.values())[-1][0], []).append(node)
    for fqn, nodes in by_fqn.items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            continue
        if len(nodes) > 1 and not any(True for _ in mod.parameters()) and \
                not any(True for _ in mod.buffers()):
            for node in nodes:
                node.meta["source_fn_stack"] = [(node.name, type(mod))]


PT2E_NOTE = "torchao PT2E X86InductorQuantizer (default config)"


def export_onnx(model: torch.nn.Module, example: tuple, path: Path, dynamic_batch: bool = True,
                dynamic_dims: Optional[dict] = None) -> Path:
    """TorchScript ONNX export (opset 17) with inputs ``in0..`` and output ``out``."""
    names = [f"in{i}" for i in range(len(example))]
    axes = {}
    for i, n in enumerate(names):
        spec = {0: "batch"} if dynamic_batch else {}
        spec.update((dynamic_dims or {}).get(i, {}))
        if spec:
            axes[n] = spec
    torch.onnx.export(copy.deepcopy(model).eval(), example, str(path), input_names=names,
                      output_names=["out"], dynamic_axes=axes or None, opset_version=17,
                      dynamo=False)
    return Path(path)


class OrtModel:
    """An ONNX Runtime CPU session called with torch tensors.

    Args:
        path: The .onnx file.
        threads: intra-op threads (None: ORT's default). Spinning of idle pool threads is
            turned off so that they do not steal the core from whatever runs next.
    """

    def __init__(self, path: Path, threads: Optional[int] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: not one warning per unused initializer
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, *args):
        feed = {n: a.numpy() for n, a in zip(self.names, args)}
        return torch.from_numpy(self.sess.run(None, feed)[0])


def ort_int8(fp32: Path, calib: list[tuple], static: bool = True) -> Path:
    """Quantize an ONNX file with ONNX Runtime; returns the int8 file beside it.

    static: ``quantize_static`` in QDQ format, per-channel s8 weights, u8 activations, MinMax
        calibration on ``calib``. Otherwise ``quantize_dynamic`` (per-channel s8 weights).
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    out = Path(fp32).with_name(Path(fp32).stem + ("-int8-static" if static else "-int8-dynamic")
                               + ".onnx")
    if not static:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{f"in{i}": a.numpy() for i, a in enumerate(b)} for b in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


ORT_STATIC_NOTE = ("ONNX Runtime quantize_static, QDQ, per-channel s8 weights, u8 activations, "
                   "MinMax")
ORT_DYNAMIC_NOTE = "ONNX Runtime dynamic int8 (per-channel weights)"


# --- coverage: how many convs / linears / matmuls a peer really made int8 ------------------

#: The ATen ops counted as a model's compute (convs, linears, matmuls).
COMPUTE_OPS = ("aten.conv2d.default", "aten.linear.default", "aten.matmul.default",
               "aten.conv_transpose2d.input", "aten.bmm.default")


def count_compute(gm: torch.fx.GraphModule) -> int:
    """Convs, linears and matmuls of a captured ATen graph."""
    return sum(str(n.target) in COMPUTE_OPS for n in gm.graph.nodes if n.op == "call_function")


def pt2e_int8_count(q: torch.fx.GraphModule) -> int:
    """Compute ops of a converted PT2E graph whose weight (second input) is dequantized from
    int8: the ones that run int8, not the ones the quantizer skipped."""
    return sum(str(n.target) in COMPUTE_OPS and len(n.args) > 1
               and "dequantize" in str(getattr(n.args[1], "target", ""))
               for n in q.graph.nodes if n.op == "call_function")


def onnx_int8_count(path: Path) -> int:
    """Conv / MatMul / Gemm nodes of a QDQ ONNX model with both inputs dequantized."""
    import onnx

    g = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    return sum(n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose")
               and producer.get(n.input[1]) == "DequantizeLinear"
               and producer.get(n.input[0]) == "DequantizeLinear" for n in g.node)


def fx_int8_count(q: torch.nn.Module) -> int:
    """Quantized conv / linear modules and ops of a torch.ao FX converted model."""
    mods = sum(type(m).__module__.startswith("torch.ao.nn.quantized")
               and any(k in type(m).__name__ for k in ("Conv", "Linear"))
               and "Packed" not in type(m).__name__  # (a Linear's packed-weight holder)
               for m in q.modules())
    ops = sum(n.op == "call_function" and "quantized" in str(n.target)
              and any(k in str(n.target) for k in ("conv", "linear", "matmul"))
              for n in getattr(q, "graph", torch.fx.Graph()).nodes)
    return mods + ops


def ptq_integer_count(q: torch.fx.GraphModule) -> int:
    """Convs / linears / matmuls of a ptqpasses integer graph that run as integer ops."""
    import ptqpasses
    return sum(c.integer and c.op in ("ptq.conv2d", "ptq.linear", "ptq.linear_dynamic",
                                      "ptq.matmul", "ptq.conv_transpose2d")
               for c in ptqpasses.coverage(q))
