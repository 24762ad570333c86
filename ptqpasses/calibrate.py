"""Running calibration data through an observed graph."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ptqpasses import meta
from ptqpasses.observers import CalibrationError, Observer


def observers(gm: fx.GraphModule) -> list[tuple[fx.Node, Observer]]:
    """(observer call node, observer module) pairs of ``gm``, in graph order."""
    return [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and meta.observed_node(n) is not None]


def _as_args(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        raise TypeError("calibration batches must be tuples of positional inputs, got a dict")
    return tuple(batch)


def calibrate(gm: fx.GraphModule, data: Iterable[Any], *, progress: bool = True) -> fx.GraphModule:
    """Runs ``data`` through ``gm`` (with observers) and records qparams on observer nodes.

    Args:
        gm: a graph after InsertObservers.
        data: an iterable of input tuples (or single tensors), e.g. a DataLoader; a
            DataLoader yielding ``(inputs, labels)`` pairs should be mapped to inputs first.
        progress: show a tqdm progress bar.

    Raises:
        CalibrationError: no batches, NaN/Inf at a node (named), or a graph without observers.
    """
    obs = observers(gm)
    if not obs:
        raise CalibrationError("the graph has no observers: run Annotate and InsertObservers "
                               "(or ptqpasses.prepare) before calibrate")
    total = len(data) if hasattr(data, "__len__") else None
    n = 0
    with torch.no_grad():
        for batch in tqdm(data, total=total, desc="calibrate", unit="batch", disable=not progress):
            gm(*_as_args(batch))
            n += 1
    if n == 0:
        raise CalibrationError("calibration data yielded zero batches")
    finalize(gm)
    return gm


def merge(gm: fx.GraphModule, *others: fx.GraphModule) -> fx.GraphModule:
    """Merges the observer statistics of ``others`` (copies of ``gm`` calibrated elsewhere,
    e.g. in other processes on other shards of the data) into ``gm`` and records qparams."""
    mine = observers(gm)
    for other in others:
        theirs = {meta.observed_node(n): ob for n, ob in observers(other)}
        for node, ob in mine:
            name = meta.observed_node(node)
            if name not in theirs:
                raise CalibrationError(f"cannot merge: the other graph does not observe node {name!r}")
            ob.merge(theirs[name])
    finalize(gm)
    return gm


def finalize(gm: fx.GraphModule) -> None:
    """Writes each observer's qparams into its node's meta (after data or a merge)."""
    for node, ob in observers(gm):
        meta.set_qparams(node, ob.qparams(meta.get_qspec(node).output))
