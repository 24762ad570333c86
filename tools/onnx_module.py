"""An ONNX graph as a plain torch module, for models whose weights ship only as ONNX.

``OnnxModule(model_proto)`` keeps every float tensor of the graph (initializers and
``Constant`` nodes) as a parameter and runs the nodes in order with torch ops, so
``torch.export`` sees ordinary ATen ops (conv2d, linear/matmul, add, ...) with parameters
as their weights, exactly as for a hand-written module. Shape arithmetic (``Shape`` ->
``Slice`` -> ``Concat`` -> ``Reshape``) runs on Python lists of (symbolic) ints, so a
dynamic batch survives capture.

Only the operators of the zoo's models are implemented (the PaddleOCR / PP-LCNet exports:
conv, batch norm, hard sigmoid/swish, clip, resize, SVTR attention); any other raises
``NotImplementedError`` naming it. onnx2torch was tried first: it imports torchvision at
import time and cannot convert weights held in ``Constant`` nodes (paddle2onnx's export).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _pads(pads: list[int]) -> tuple[int, int] | None:
    """ONNX [top, left, bottom, right] -> torch (h, w) padding when symmetric, else None."""
    n = len(pads) // 2
    return tuple(pads[:n]) if list(pads[:n]) == list(pads[n:]) else None


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops (see the module docstring)."""

    def __init__(self, model_proto):
        super().__init__()
        from onnx import numpy_helper

        graph = model_proto.graph
        self.params = nn.ParameterDict()
        self._names: dict[str, str] = {}    # onnx tensor name -> parameter key
        self._consts: dict[str, Any] = {}   # small integer tensors / scalars: Python values

        def keep(name: str, arr) -> None:
            t = torch.from_numpy(arr.copy())
            if t.numel() == 0:
                self._consts[name] = []
            elif t.is_floating_point() and t.numel() > 1:
                key = f"p{len(self._names)}"
                self.params[key] = nn.Parameter(t.float(), requires_grad=False)
                self._names[name] = key
            elif t.is_floating_point():
                self._consts[name] = float(t.reshape(()))
            else:
                self._consts[name] = t.reshape(-1).tolist()

        for init in graph.initializer:
            keep(init.name, numpy_helper.to_array(init))
        self.nodes = []
        for n in graph.node:
            if n.op_type == "Constant":
                keep(n.output[0], numpy_helper.to_array(n.attribute[0].t))
                continue
            self.nodes.append((n.op_type, list(n.input), list(n.output), _attrs(n)))
        for i, (op, ins, outs, attrs) in enumerate(self.nodes):
            if op == "Resize" and len(ins) > 2 and ins[2] in self._names:  # scales: not a weight
                self._consts[ins[2]] = self.params.pop(self._names.pop(ins[2])).tolist()
            if op == "MatMul" and ins[1] in self._names and self.params[self._names[ins[1]]].dim() == 2:
                # a weight: stored as [out, in] so capture sees aten.linear, as for nn.Linear
                key = self._names[ins[1]]
                self.params[key] = nn.Parameter(self.params[key].t().contiguous(), requires_grad=False)
                self._names[ins[1] + ".T"] = key
                self.nodes[i] = ("Linear", [ins[0], ins[1] + ".T"], outs, attrs)
        known = {k for k in dir(self) if k.startswith("op_")}
        missing = sorted({op for op, *_ in self.nodes if f"op_{op}" not in known})
        if missing:
            raise NotImplementedError(f"ONNX operators not implemented: {', '.join(missing)}")
        inits = {i.name for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in inits]
        if len(self.inputs) != 1:
            raise NotImplementedError(f"graphs with {len(self.inputs)} inputs")
        self.outputs = [o.name for o in graph.output]

    def _value(self, env: dict, name: str):
        if name == "":
            return None
        if name in env:
            return env[name]
        if name in self._names:
            return self.params[self._names[name]]
        return self._consts[name]

    def forward(self, x):
        env = {self.inputs[0]: x}  # the zoo's models take one input
        for op, ins, outs, attrs in self.nodes:
            args = [self._value(env, i) for i in ins]
            res = getattr(self, f"op_{op}")(*args, **attrs)
            for name, r in zip(outs, res if isinstance(res, tuple) else (res,)):
                env[name] = r
        outs = [env[o] for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # --- compute
    def op_Conv(self, x, w, b=None, group=1, strides=(1, 1), pads=(0, 0, 0, 0),
                dilations=(1, 1), kernel_shape=None, **_):
        if isinstance(b, float):  # a one-channel conv's bias was read as a scalar
            b = torch.tensor([b])
        p = _pads(pads)
        if p is None:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            p = (0, 0)
        return F.conv2d(x, w, b, tuple(strides), p, tuple(dilations), group)

    def op_ConvTranspose(self, x, w, b=None, group=1, strides=(1, 1), pads=(0, 0, 0, 0),
                         dilations=(1, 1), **_):
        if isinstance(b, float):
            b = torch.tensor([b])
        return F.conv_transpose2d(x, w, b, tuple(strides), _pads(pads), 0, group,
                                  tuple(dilations))

    def op_MatMul(self, a, b, **_):
        return torch.matmul(a, b)

    def op_Linear(self, x, w_t, **_):
        return F.linear(x, w_t)

    def op_BatchNormalization(self, x, scale, bias, mean, var, epsilon=1e-5, **_):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)

    # --- elementwise
    def op_Add(self, a, b, **_):
        return a + b

    def op_Sub(self, a, b, **_):
        return a - b

    def op_Mul(self, a, b, **_):
        return a * b

    def op_Div(self, a, b, **_):
        return a / b

    def op_Pow(self, a, b, **_):
        return a * a if b == 2.0 else torch.pow(a, b)

    def op_Sqrt(self, x, **_):
        return torch.sqrt(x)

    def op_Relu(self, x, **_):
        return F.relu(x)

    def op_Sigmoid(self, x, **_):
        return torch.sigmoid(x)

    def op_Clip(self, x, lo=None, hi=None, **_):
        if lo == 0.0 and hi == 6.0:
            return F.relu6(x)
        return torch.clamp(x, lo, hi)

    def op_HardSigmoid(self, x, alpha=0.2, beta=0.5, **_):
        if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
            return F.hardsigmoid(x)
        return torch.clamp(x * alpha + beta, 0.0, 1.0)

    def op_HardSwish(self, x, **_):
        return F.hardswish(x)

    def op_Softmax(self, x, axis=-1, **_):
        return torch.softmax(x, axis)

    def op_Identity(self, x, **_):
        return x

    def op_Cast(self, x, to=1, **_):
        if isinstance(x, list):
            return x
        return x.float() if to == 1 else x

    # --- pooling, resizing
    def op_GlobalAveragePool(self, x, **_):
        return F.adaptive_avg_pool2d(x, 1)

    def op_AveragePool(self, x, kernel_shape, strides, pads=(0, 0, 0, 0), ceil_mode=0,
                       count_include_pad=0, **_):
        return F.avg_pool2d(x, tuple(kernel_shape), tuple(strides), _pads(pads), bool(ceil_mode),
                            bool(count_include_pad))

    def op_MaxPool(self, x, kernel_shape, strides, pads=(0, 0, 0, 0), ceil_mode=0, **_):
        return F.max_pool2d(x, tuple(kernel_shape), tuple(strides), _pads(pads),
                            ceil_mode=bool(ceil_mode))

    def op_Resize(self, x, roi=None, scales=None, sizes=None, mode="nearest", **_):
        if mode != "nearest" or not scales or scales[:2] != [1.0, 1.0]:
            raise NotImplementedError(f"Resize mode={mode} scales={scales}")
        return F.interpolate(x, scale_factor=tuple(scales[2:]), mode="nearest")

    # --- shapes
    def op_Shape(self, x, **_):
        return list(x.shape)

    def op_Slice(self, x, starts, ends, axes=None, steps=None, **_):
        if isinstance(x, list):
            e = ends[0] if ends[0] < 2 ** 62 else len(x)
            return x[starts[0]:e]
        axes = axes or list(range(len(starts)))
        idx = [slice(None)] * x.dim()
        for s, e, a in zip(starts, ends, axes):
            idx[a] = slice(s, None if e >= 2 ** 62 else e)
        return x[tuple(idx)]

    def op_Concat(self, *xs, axis=0):
        if all(isinstance(v, list) for v in xs):
            return [v for part in xs for v in part]
        return torch.cat(xs, axis)

    def op_Reshape(self, x, shape, allowzero=0, **_):
        shape = [x.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    def op_Transpose(self, x, perm, **_):
        return x.permute(perm)

    def op_Squeeze(self, x, axes=None, **_):
        for a in sorted(axes, reverse=True):
            x = x.squeeze(a)
        return x

    def op_ReduceMean(self, x, axes, keepdims=1, **_):
        return x.mean(dim=tuple(axes), keepdim=bool(keepdims))


def load_onnx_module(path) -> OnnxModule:
    """Reads an ONNX file into an eval-mode :class:`OnnxModule`."""
    import onnx

    return OnnxModule(onnx.load(str(path))).eval()


__all__ = ["OnnxModule", "load_onnx_module"]
