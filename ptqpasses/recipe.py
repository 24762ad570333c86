"""Quantization recipes: what calibration and the passes decided, saved as JSON + safetensors.

A recipe replays on the same model without calibration data::

    observed = ptqpasses.prepare(model, example_inputs, config)
    ptqpasses.calibrate(observed, data)
    ptqpasses.save_recipe(observed, "r", pipeline=ptqpasses.prepare_pipeline(config))
    ...
    qgraph = ptqpasses.apply_recipe(model, example_inputs, "r")   # same integer graph

Files: ``r.json`` (pipeline text, per-node decisions, qparams, versions, model fingerprint,
hash of the tensors, digest of the weights it was made from) and ``r.safetensors`` (the graph's
constants after the data-dependent passes). Never pickle. A recipe for another model, for the
same architecture with other weights, or an edited file, fails clearly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from ptqpasses import meta
from ptqpasses.calibrate import observers
from ptqpasses.capture import WEIGHTS_KEY, capture
from ptqpasses.files import atomic_path, atomic_write_text
from ptqpasses.meta import QParams, Role
from ptqpasses.pipeline import Pipeline

FORMAT = "ptqpasses-recipe/2"  # 2: binds the model's weights (``weights_sha256``)


class RecipeError(ValueError):
    """A recipe that does not fit the model, or whose files were changed."""


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return base.with_suffix(".json"), base.with_suffix(".safetensors")


def fingerprint(gm: fx.GraphModule) -> str:
    """Hash of a graph's structure and constant shapes (the observed graph, for recipes)."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        h.update(f"{n.op}|{n.name}|{n.target}|{len(n.args)}\n".encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"torch": torch.__version__}
    for pkg in ("ptqpasses", "apache-tvm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {n.target: _attr(gm, n.target).detach().contiguous().clone()
            for n in gm.graph.nodes if n.op == "get_attr"}


def _attr(gm, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_recipe(observed: fx.GraphModule, path: str | Path, *, pipeline: Pipeline) -> Path:
    """Writes the recipe of a calibrated graph (after ``prepare`` + ``calibrate``).

    Args:
        observed: the calibrated graph (observers hold qparams).
        path: base path; ``.json`` and ``.safetensors`` are written beside each other.
        pipeline: the prepare pipeline that produced ``observed`` (replayed on apply), e.g.
            ``ptqpasses.prepare_pipeline(config)``.
    """
    json_path, st_path = _paths(path)
    obs = observers(observed)
    if not obs or any(meta.get_qparams(n) is None for n, _ in obs):
        raise RecipeError("save_recipe needs a calibrated graph (prepare, then calibrate)")
    weights = observed.meta.get(WEIGHTS_KEY)
    if weights is None:
        raise RecipeError("save_recipe needs a graph made by ptqpasses.capture / prepare (its "
                          f"meta[{WEIGHTS_KEY!r}] names the model weights the recipe binds to)")
    with atomic_path(st_path) as tmp:
        save_file(_constants(observed), str(tmp))
        tensors_sha256 = _file_hash(tmp)
    decisions = {}
    for n in observed.graph.nodes:
        q = meta.get_qspec(n)
        if q is not None and q.role != Role.OBSERVER:
            decisions[n.name] = json.loads(json.dumps(dataclasses.asdict(q)))
    body = {
        "format": FORMAT,
        "pipeline": str(pipeline),
        "fingerprint": fingerprint(observed),
        "weights_sha256": weights,
        "versions": _versions(),
        "qparams": {meta.observed_node(n): dataclasses.asdict(meta.get_qparams(n)) for n, _ in obs},
        "nodes": decisions,
        "tensors_sha256": tensors_sha256,
    }
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    atomic_write_text(json_path, json.dumps(body, indent=1, sort_keys=True))
    return json_path


def load_recipe(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads and verifies a recipe; returns (json body, tensors)."""
    json_path, st_path = _paths(path)
    for p in (json_path, st_path):
        if not p.exists():
            raise RecipeError(f"recipe file {p} is missing")
    try:
        body = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        old = isinstance(body, dict) and str(body.get("format", "")).startswith("ptqpasses-recipe/")
        raise RecipeError(f"{json_path} is a {body['format']} file; this version reads "
                          f"{FORMAT} (it binds the model's weights): save the recipe again"
                          if old else f"{json_path} is not a {FORMAT} file")
    missing = [k for k in ("pipeline", "fingerprint", "weights_sha256", "qparams", "nodes",
                           "tensors_sha256") if k not in body]
    if missing:
        raise RecipeError(f"{json_path} lacks {missing}")
    claimed = body.pop("sha256", None)
    if claimed != hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest():
        raise RecipeError(f"{json_path} was modified after it was written (checksum mismatch)")
    if _file_hash(st_path) != body["tensors_sha256"]:
        raise RecipeError(f"{st_path} does not belong to {json_path.name} or was modified "
                          "(checksum mismatch)")
    try:
        return body, load_file(str(st_path))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise RecipeError(f"{st_path} could not be read: {e}") from None


def apply_recipe(model, example_inputs: Sequence[Any], path: str | Path, *, lower: bool = True,
                 **capture_options) -> fx.GraphModule:
    """Replays a recipe on ``model``: the same integer graph, no calibration data needed."""
    from ptqpasses.api import convert

    body, tensors = load_recipe(path)
    gm = capture(model, example_inputs, **capture_options)
    weights = gm.meta[WEIGHTS_KEY]
    gm = Pipeline.parse(body["pipeline"])(gm).graph_module
    fp = fingerprint(gm)
    if body["fingerprint"] != fp:
        raise RecipeError(f"recipe {path} was made for a different model (graph fingerprint "
                          f"{body['fingerprint'][:12]} != {fp[:12]} of {type(model).__name__} "
                          "after the recipe's pipeline)")
    if weights != body["weights_sha256"]:
        raise RecipeError(
            f"recipe {path} was made from other weights than this {type(model).__name__}'s "
            f"(same architecture; weights digest {body['weights_sha256'][:12]} != "
            f"{weights[:12]}): its constants would replace this model's; calibrate this model "
            "and save a new recipe")
    consts = _constants(gm)
    if set(consts) != set(tensors):
        missing = sorted(set(tensors) ^ set(consts))[:5]
        raise RecipeError(f"recipe {path} does not fit this model: constants differ ({missing})")
    for name, value in tensors.items():
        if consts[name].shape != value.shape or consts[name].dtype != value.dtype:
            raise RecipeError(f"recipe {path} does not fit this model: constant {name!r} has "
                              f"shape {tuple(value.shape)}, the model {tuple(consts[name].shape)}")
        with torch.no_grad():
            _attr(gm, name).copy_(value)
    for node, _ in observers(gm):
        name = meta.observed_node(node)
        if name not in body["qparams"]:
            raise RecipeError(f"recipe {path} has no qparams for node {name!r}")
        meta.set_qparams(node, QParams(**body["qparams"][name]))
    return convert(gm, lower=lower)
