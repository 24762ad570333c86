"""Running calibration data through an observed graph."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ptqpasses import distributed as dist_
from ptqpasses import meta
from ptqpasses.meta import Role
from ptqpasses.observers import CalibrationError, Observer

log = logging.getLogger(__name__)


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


def calibrate(gm: fx.GraphModule, data: Iterable[Any], *, progress: bool = True,
              distributed: bool = True, group=None) -> fx.GraphModule:
    """Runs ``data`` through ``gm`` (with observers) and records qparams on observer nodes.

    Args:
        gm: a graph after InsertObservers.
        data: an iterable of input tuples (or single tensors), e.g. a DataLoader; a
            DataLoader yielding ``(inputs, labels)`` pairs should be mapped to inputs first.
        progress: show a tqdm progress bar (on rank 0 only, under torch.distributed).
        distributed: inside an initialized torch.distributed process group, ``data`` is this
            rank's shard: every observer's statistics are merged across the ranks, and every
            rank gets the qparams of one process calibrating on all the shards (exact but
            for moving averages; see :mod:`ptqpasses.distributed`). Every rank of ``group``
            must call it. False: this process's data alone.
        group: the process group (default: the world).

    Raises:
        CalibrationError: no batches (on any rank), NaN at a node (named), or a graph
            without observers.
    """
    obs = observers(gm)
    if not obs:
        raise CalibrationError("the graph has no observers: run Annotate and InsertObservers "
                               "(or ptqpasses.prepare) before calibrate")
    sync = distributed and dist_.active(group)
    total = len(data) if hasattr(data, "__len__") else None
    n, failure = 0, None
    show = progress and (not sync or dist_.rank(group) == 0)
    with torch.no_grad():
        try:
            for batch in tqdm(data, total=total, desc="calibrate", unit="batch", disable=not show):
                gm(*_as_args(batch))
                n += 1
        except Exception as e:  # the other ranks must hear of it, not wait for this one
            if not sync:
                raise
            failure = e
    if sync:
        n = dist_.merge_observers([ob for _, ob in obs], n, failure, group)
    if n == 0:
        raise CalibrationError("calibration data yielded zero batches")
    finalize(gm)
    return gm


def merge(gm: fx.GraphModule, *others: fx.GraphModule) -> fx.GraphModule:
    """Merges the observer statistics of ``others`` (copies of ``gm`` calibrated elsewhere,
    e.g. in other processes on other shards of the data) into ``gm`` and records qparams.
    Inside torch.distributed, :func:`calibrate` does this with collectives."""
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
    """Writes each observer's qparams into its node's meta (after data or a merge). A value
    that held Inf (a mask's -inf, MPNet's ``log(0)`` of relative positions, clamped later) has
    no int8 range: it stays float, and so do the compute ops that asked for it quantized,
    with the reason in the coverage report and a warning."""
    changed = False
    for node, ob in observers(gm):
        if ob.infinite:
            _leave_float(gm, node, ob)
            changed = True
        else:
            meta.set_qparams(node, ob.qparams(meta.get_qspec(node).output))
    if changed:
        gm.graph.lint()
        gm.recompile()


def _leave_float(gm: fx.GraphModule, obs: fx.Node, ob: Observer) -> None:
    name = meta.observed_node(obs)
    why = (f"input {name!r} held Inf in {ob.infinite} calibration batch(es) (no int8 range; "
           "left float)")
    src = obs.args[0]
    sq = meta.get_qspec(src)
    users, todo = [], list(obs.users)
    if sq is not None and sq.role in (Role.COMPUTE, Role.FUSED):  # its own output: no int8 range
        users.append(src)
    while todo:  # the ops that asked for the value quantized, through shape ops
        u = todo.pop()
        q = meta.get_qspec(u)
        if q is not None and q.role == Role.SHARE:
            meta.set_qspec(u, q.replace(role=Role.FLOAT, reason="input is not quantized"))
            todo.extend(u.users)
        elif q is not None and q.role in (Role.COMPUTE, Role.FUSED):
            users.append(u)
    for u in users:
        q = meta.get_qspec(u)
        meta.set_qspec(u, q.replace(role=Role.FLOAT, weight=None, fused_into=None, reason=why))
        for f in u.users:  # an activation fused into it stays its own float op
            fq = meta.get_qspec(f)
            if fq is not None and fq.role == Role.FUSED and fq.fused_into == u.name:
                meta.set_qspec(f, fq.replace(role=Role.FLOAT, fused_into=None, reason=why))
    log.warning("calibrate: node %r held Inf during calibration: left float (%s)", name,
                ", ".join(repr(u.name) for u in users) + " made float" if users
                else "no integer op used it")
    obs.replace_all_uses_with(obs.args[0])
    gm.graph.erase_node(obs)
