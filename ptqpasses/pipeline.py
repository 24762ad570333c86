"""Pass infrastructure: passes, pipelines that print and parse as text, instruments.

A pass is a callable ``GraphModule -> PassResult(graph_module, modified)`` with a stable
kebab-case ``name`` and a frozen config dataclass, so it runs unchanged inside
``torch.fx.passes.infra.pass_manager.PassManager``. A :class:`Pipeline` is an ordered list of
passes and is itself a pass. Text form (round-trips through :meth:`Pipeline.parse`)::

    fold-batchnorm,annotate{config={"activation": ...}},insert-observers
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, TextIO

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["Pass", "PassResult", "Pipeline", "PassError", "PipelineParseError", "graph_pass",
           "register_pass", "registered_passes", "Instrument", "PrintAfter", "DumpToFolder",
           "Timing"]


@dataclass(frozen=True)
class NoConfig:
    """Config of a pass without options."""


class Pass:
    """Base class: subclasses set ``name``, optionally ``Config``, and implement ``run``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None, **options):
        if config is not None and options:
            raise TypeError(f"{type(self).__name__}: pass a config or keyword options, not both")
        self.config = config if config is not None else self.Config(**options)
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got "
                            f"{type(self.config).__name__}")

    def run(self, gm: fx.GraphModule) -> bool:
        """Transforms ``gm`` in place; returns whether anything changed."""
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = self.run(gm)
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(modified))

    @property
    def __name__(self) -> str:  # PassManager names passes by __name__
        return self.name

    def __str__(self) -> str:
        options = _options_text(self.config)
        return f"{self.name}{{{options}}}" if options else self.name

    def __repr__(self) -> str:
        return f"<pass {self}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes a pass known to :meth:`Pipeline.parse` by its ``name``."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
        raise ValueError(f"pass {cls.__name__} needs a kebab-case name, got {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def graph_pass(name: str) -> Callable[[Callable[[fx.GraphModule], bool]], type[Pass]]:
    """Turns ``fn(gm) -> modified`` into a registered Pass class named ``name``."""

    def wrap(fn: Callable[[fx.GraphModule], bool]) -> type[Pass]:
        cls = type(fn.__name__, (Pass,), {"name": name, "__doc__": fn.__doc__,
                                          "run": lambda self, gm: fn(gm)})
        return register_pass(cls)

    return wrap


# --- config <-> text -----------------------------------------------------------------------


def _field_to_json(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _options_text(config: Any) -> str:
    defaults = config.__class__()
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name):
            parts.append(f"{f.name}={json.dumps(_field_to_json(value), sort_keys=True)}")
    return ",".join(parts)


def _field_from_json(cls: type, f: dataclasses.Field, value: Any) -> Any:
    default = getattr(cls(), f.name)
    if hasattr(type(default), "from_dict"):
        return type(default).from_dict(value)
    if dataclasses.is_dataclass(default):
        return type(default)(**value)
    if isinstance(default, tuple):
        return tuple(value)
    return value


class PipelineParseError(ValueError):
    """Pipeline text that names an unknown pass or option, or does not parse."""


def _split_top(text: str) -> list[str]:
    """Splits at commas that are outside braces, brackets and strings."""
    parts, depth, start, in_str, i = [], 0, 0, False, 0
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth < 0:
                raise PipelineParseError(f"unbalanced '{c}' at column {i} of {text!r}")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if depth or in_str:
        raise PipelineParseError(f"unbalanced braces or quotes in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_pass(text: str) -> Pass:
    name, _, rest = text.partition("{")
    name = name.strip()
    if name not in _REGISTRY:
        raise PipelineParseError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if not rest:
        return cls()
    if not rest.endswith("}"):
        raise PipelineParseError(f"options of {name!r} must end with '}}': {text!r}")
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    options = {}
    for item in _split_top(rest[:-1]):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise PipelineParseError(f"option {item!r} of {name!r} is not key=value")
        if key not in fields:
            raise PipelineParseError(f"pass {name!r} has no option {key!r}; options: "
                                     f"{', '.join(fields) or 'none'}")
        try:
            options[key] = _field_from_json(cls.Config, fields[key], json.loads(value))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise PipelineParseError(f"bad value for {name}.{key}: {value!r} ({e})") from None
    return cls(cls.Config(**options))


# --- instruments ---------------------------------------------------------------------------


class Instrument:
    """Hooks around each pass of a pipeline."""

    def before(self, index: int, p: Callable, gm: fx.GraphModule) -> None: ...

    def after(self, index: int, p: Callable, gm: fx.GraphModule, result: PassResult) -> None: ...


def _pass_name(p: Callable) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)


class PrintAfter(Instrument):
    """Prints the graph after each pass (or after the passes named in ``only``)."""

    def __init__(self, only: Iterable[str] = (), stream: Optional[TextIO] = None):
        self.only, self.stream = set(only), stream

    def after(self, index, p, gm, result):
        if not self.only or _pass_name(p) in self.only:
            print(f"// ----- after {_pass_name(p)} -----\n{result.graph_module.graph}",
                  file=self.stream or sys.stdout)


class DumpToFolder(Instrument):
    """Writes ``{index:03d}_{pass}.txt`` (graph and generated code) after each pass."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def after(self, index, p, gm, result):
        self.folder.mkdir(parents=True, exist_ok=True)
        out = result.graph_module
        (self.folder / f"{index:03d}_{_pass_name(p)}.txt").write_text(f"{out.graph}\n\n{out.code}")


class Timing(Instrument):
    """Records wall time per pass in ``self.seconds`` (list of (name, seconds))."""

    def __init__(self):
        self.seconds: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before(self, index, p, gm):
        self._t0 = time.perf_counter()

    def after(self, index, p, gm, result):
        self.seconds.append((_pass_name(p), time.perf_counter() - self._t0))

    def __str__(self) -> str:
        return "\n".join(f"{s * 1e3:9.2f} ms  {name}" for name, s in self.seconds)


# --- pipeline ------------------------------------------------------------------------------


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], error: BaseException):
        self.pass_name, self.before = pass_name, before
        super().__init__(f"pass {pass_name!r} failed (after: {', '.join(before) or 'none'}): "
                         f"{type(error).__name__}: {error}")


class Pipeline(Pass):
    """An ordered list of passes that is itself a pass."""

    name = "pipeline"

    def __init__(self, passes: Iterable[Callable] = (), instruments: Iterable[Instrument] = ()):
        super().__init__()
        self.passes = list(passes)
        self.instruments = list(instruments)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for i, p in enumerate(self.passes):
            for inst in self.instruments:
                inst.before(i, p, gm)
            try:
                result = p(gm)
            except PassError as e:
                raise PassError(e.pass_name, [_pass_name(q) for q in self.passes[:i]] + e.before,
                                e.__cause__ or e) from (e.__cause__ or e)
            except Exception as e:
                raise PassError(_pass_name(p), [_pass_name(q) for q in self.passes[:i]], e) from e
            gm, modified = result.graph_module, modified or result.modified
            for inst in self.instruments:
                inst.after(i, p, gm, result)
        return PassResult(gm, modified)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    @classmethod
    def parse(cls, text: str, instruments: Iterable[Instrument] = ()) -> "Pipeline":
        return cls([_parse_pass(t) for t in _split_top(text)], instruments)
