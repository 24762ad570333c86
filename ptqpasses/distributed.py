"""Calibration across processes: torch.distributed collectives merge what each rank observed.

Inside an initialized process group (``torchrun``, or :func:`launch` here; gloo on CPU, nccl
on GPUs), ``ptqpasses.calibrate(observed, my_batches)`` runs this rank's shard and then
merges every observer's statistics across the ranks, so every rank ends with the same
qparams: those of :func:`ptqpasses.calibrate.merge` of the ranks' graphs, in rank order.
That is one process calibrating on the union of the shards, bit for bit, wherever the
observer's merge is exact:

* min/max: exact (a minimum of minima);
* histogram, MSE, entropy: exact (integer counts on a grid fixed by the overall range,
  summed; see :class:`~ptqpasses.observer_base.HistogramObserver`);
* moving average: not exact. One process weighs the last batches most; the merge averages
  the ranks' averages weighted by their batch counts (the same on every rank).

Two collectives per calibration: an all-gather of each observer's small statistics (batch
counts, ranges; every rank folds them in rank order with ``Observer.merge``) and one
all-reduce (sum) of the histograms' counts, moved onto the merged range first. Nothing is
pickled. A rank with no batches takes part (and raises nothing while another rank has
data); a rank whose calibration raised makes every rank raise, rather than leave the others
waiting in a collective.

Sharding the data is the caller's: a ``DataLoader`` with a ``DistributedSampler``, or
``batches[rank::world]`` (what ``ptq quantize --nproc N`` does).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ptqpasses.observer_base import CalibrationError, HistogramObserver, Observer


def active(group=None) -> bool:
    """Whether torch.distributed is initialized and ``group`` (default: the world) has more
    than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside torch.distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _device(group) -> torch.device:
    """Where the collectives' tensors must live: the current GPU for nccl, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (equal shapes), in rank order, on ``t``'s device."""
    t_ = t.detach().to(_device(group))
    out = [torch.empty_like(t_) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t_, group=group)
    return [o.to(t.device) for o in out]


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """``t`` reduced over the ranks (``op``: "sum", "max" or "min"), a new tensor."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = t.detach().to(_device(group), copy=True)
    dist.all_reduce(out, op=ops[op], group=group)
    return out.to(t.device)


def merge_observers(observers: Sequence[Observer], batches: int,
                    failure: Optional[BaseException] = None, group=None) -> int:
    """Merges every rank's ``observers`` into every rank's, in place; returns the batches
    of all ranks.

    Args:
        observers: this rank's observers, in graph order (the same graph on every rank).
        batches: the batches this rank ran.
        failure: the exception this rank's calibration raised, if any: every rank raises
            (this one ``failure``), instead of leaving the others in a collective.

    Raises:
        CalibrationError: another rank failed, the ranks observe different graphs, or no
            rank had a batch.
    """
    names = "\n".join(f"{ob.kind}:{ob.node_name}" for ob in observers)
    stats = [ob.stats() for ob in observers]
    sizes = [len(s) for s in stats]
    head = torch.tensor([float(failure is not None), float(batches), float(sum(sizes)),
                         float(zlib.crc32(names.encode()))], dtype=torch.float64)
    heads = torch.stack(all_gather(head, group)).tolist()
    if failure is not None:
        raise failure
    failed = [r for r, h in enumerate(heads) if h[0]]
    if failed:
        raise CalibrationError(f"calibration failed on rank(s) {failed} (see their error); "
                               f"rank {rank(group)} stops too")
    if any(h[2:] != heads[0][2:] for h in heads):
        raise CalibrationError("cannot merge across ranks: the ranks observe different graphs "
                               "(prepare the same model with the same config on every rank)")
    total = int(sum(h[1] for h in heads))
    if total == 0:
        raise CalibrationError(f"calibration data yielded zero batches on all {len(heads)} "
                               "ranks")

    rows = [r.tolist() for r in all_gather(torch.tensor([v for s in stats for v in s],
                                                        dtype=torch.float64), group)]
    at = 0
    for ob, n in zip(observers, sizes):
        merged = None
        for row in rows:  # rank order: every rank folds the same values the same way
            part = ob.empty()
            part.load_stats(row[at:at + n])
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        ob.load_stats(merged.stats())
        at += n

    hists = [ob for ob in observers if isinstance(ob, HistogramObserver)]
    if hists:  # each now on the merged range's grid: the counts add up
        summed = all_reduce(torch.cat([ob.counts for ob in hists]), "sum", group)
        for ob, counts in zip(hists, summed.split(HistogramObserver.GRID)):
            ob.set_counts(counts)
    return total


# ----------------------------------------------------------------------------- local launch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable, nproc: int, port: int, backend: str,
            timeout_s: Optional[float], args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the cores shared, not multiplied
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // nproc))
    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, **kw)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), *, backend: str = "gloo",
           timeout_s: Optional[float] = None) -> None:
    """Runs ``fn(*args)`` in ``nproc`` local processes, as ``torchrun --nproc-per-node``
    would: each with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` (127.0.0.1)
    and ``MASTER_PORT`` (a free port) set, its share of the cores as torch threads, inside
    an initialized process group.

    ``fn`` and ``args`` go to the processes by the ``spawn`` start method: ``fn`` must be a
    module-level function. Its results stay there (write them to files).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (the others are ended).
        TimeoutError: not done after ``timeout_s`` (every rank is ended; a collective's own
            wait also ends there).
    """
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(fn, nproc, _free_port(), backend, timeout_s, args), nprocs=nproc,
        join=False, start_method="spawn")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if deadline is not None and time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"launch: {nproc} ranks of {getattr(fn, '__name__', fn)} not "
                               f"done after {timeout_s:g} s")


__all__ = ["active", "all_gather", "all_reduce", "launch", "merge_observers", "rank"]
