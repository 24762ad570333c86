"""Parsing what the command line names: models, input specs, calibration data."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
           "int32": torch.int32, "uint8": torch.uint8}


class UsageError(ValueError):
    """Bad command-line input; the message says what to fix."""


def load_object(spec: str) -> Any:
    """``package.module:attr`` -> the attribute (``attr`` may be dotted)."""
    if ":" not in spec:
        raise UsageError(f"{spec!r} is not of the form package.module:attr")
    mod_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {mod_name!r} (from {spec!r}): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> torch.nn.Module:
    """A module instance, or a zero-argument factory returning one. A factory is called under
    ``torch.manual_seed(0)`` (the caller's random state kept), so that every ``ptq`` command
    builds a randomly initialised model with the same weights: a recipe binds the weights it
    was made from (``ptq quantize`` then ``ptq compile --recipe``)."""
    obj = load_object(spec)
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, torch.nn.Module)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            obj = obj()
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not an nn.Module or a factory of one")
    return obj.eval()


_SPEC = re.compile(r"^(\d+(?:x\d+)*)(?::(\w+))?$")


def parse_input_spec(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``1x3x224x224:float32`` -> ((1, 3, 224, 224), torch.float32)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise UsageError(f"input spec {text!r} is not like 1x3x224x224:float32")
    dtype = m.group(2) or "float32"
    if dtype not in _DTYPES:
        raise UsageError(f"input spec {text!r}: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return tuple(int(d) for d in m.group(1).split("x")), _DTYPES[dtype]


def example_inputs(specs: list[str]) -> tuple[torch.Tensor, ...]:
    if not specs:
        raise UsageError("give the model's input shape with --input, e.g. --input 1x3x224x224:float32")
    out = []
    for s in specs:
        shape, dtype = parse_input_spec(s)
        out.append(torch.randn(shape) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _image_batches(folder: Path, shape, batch: int, mean, std) -> list[tuple[torch.Tensor]]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise UsageError(f"calibration folder {folder} has no .npy/.pt files and no images")
    c, h, w = shape[1:]
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    imgs = []
    for f in files:
        img = Image.open(f).convert("RGB" if c == 3 else "L").resize((w, h))
        t = torch.from_numpy(__import__("numpy").asarray(img).copy()).float() / 255.0
        t = t.permute(2, 0, 1) if t.dim() == 3 else t[None]
        imgs.append((t - m[:c]) / s[:c] if c == 3 else t)
    x = torch.stack(imgs)
    return [(x[i:i + batch],) for i in range(0, len(x), batch)]


def _tensor_file(p: Path) -> torch.Tensor:
    if p.suffix == ".npy":
        import numpy as np
        return torch.from_numpy(np.load(p, allow_pickle=False))
    value = torch.load(p, weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{p} holds a {type(value).__name__}; expected one tensor")
    return value


def calibration_batches(source: str, shape: tuple[int, ...], batch: int = 8,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> list[tuple]:
    """Calibration data from a folder of images, a ``.npy``/``.pt`` file or folder of them
    (each file one tensor of samples), or ``module:function`` yielding batches."""
    p = Path(source)
    if p.is_file() and p.suffix in (".npy", ".pt"):
        x = _tensor_file(p)
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise UsageError(f"{p} holds samples of shape {list(x.shape)}; the model input is "
                             f"{list(shape)}: the file must be [N, "
                             f"{', '.join(map(str, shape[1:]))}]")
        return [(x[i:i + batch],) for i in range(0, len(x), batch)]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".pt"))
        if files:
            return [(_tensor_file(f),) for f in files]
        return _image_batches(p, shape, batch, mean, std)
    if ":" in source and not p.exists():
        fn = load_object(source)
        data = fn() if callable(fn) else fn
        return [b if isinstance(b, tuple) else (b,) if isinstance(b, torch.Tensor) else tuple(b)
                for b in data]
    if not p.exists() and ":" not in source:
        raise UsageError(f"calibration source {source!r} does not exist: give a .npy / .pt "
                         f"file of samples shaped like the model input, [N, "
                         f"{', '.join(map(str, shape[1:]))}] (e.g. numpy.save('x.npy', x)), a "
                         "folder of such files or of images, or module:function")
    raise UsageError(f"calibration source {source!r} is not a folder, a .npy/.pt file, or "
                     "module:function")

