"""Observers: the ``Observer`` base (mergeable statistics, qparams from a range) and the plain
range estimators (min/max, moving average, histogram with percentile clipping). The searched
ones (MSE, entropy) are in ``range_setting.py``; ``observers.py`` registers them all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ptqpasses.meta import QParams, QSpec


class CalibrationError(RuntimeError):
    """Calibration data that cannot give ranges (no batches, NaN)."""


def qparams_from_range(lo: float, hi: float, spec: QSpec) -> QParams:
    """Scale and zero point covering ``[lo, hi]`` (always widened to include 0)."""
    qmin, qmax = spec.qrange
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        bound = max(-lo, hi)
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zp = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    scale = float(torch.tensor(max(scale, 1e-8), dtype=torch.float32))  # a float32 value
    return QParams(scale=scale, zero_point=zp, dtype=spec.dtype, qmin=qmin, qmax=qmax)


def weight_qparams(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis ``spec.axis``) or per-tensor symmetric-or-not weight qparams.

    Returns float32 scales and int64 zero points, one per channel (length 1 per-tensor).
    ``spec.observer == "mse"`` searches the clipping bound per channel (range_setting.py).
    """
    if spec.observer == "mse":
        from ptqpasses.range_setting import mse_weight_qparams
        return mse_weight_qparams(w, spec)
    if spec.per_channel:
        flat = w.detach().transpose(0, spec.axis).reshape(w.shape[spec.axis], -1)
    else:
        flat = w.detach().reshape(1, -1)
    lo, hi = flat.min(dim=1).values.tolist(), flat.max(dim=1).values.tolist()
    ps = [qparams_from_range(a, b, spec) for a, b in zip(lo, hi)]
    return (torch.tensor([p.scale for p in ps], dtype=torch.float32),
            torch.tensor([p.zero_point for p in ps], dtype=torch.int64))


class Observer(nn.Module):
    """Base: checks values are finite, counts batches, names the node it watches."""

    kind = ""

    def __init__(self, node_name: str = ""):
        super().__init__()
        self.node_name = node_name
        self.batches = 0
        #: Batches in which the value held +-Inf (excluded from the range): a mask's -inf, a
        #: ``log(0)`` the model clamps later. ``calibrate`` leaves such a value float.
        self.infinite = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise CalibrationError(f"node {self.node_name!r}: observed a {x.dtype} tensor; only "
                                   "float activations can be quantized")
        x_ = x.detach().float()
        finite = torch.isfinite(x_)
        if not finite.all():
            if torch.isnan(x_).any():
                raise CalibrationError(f"node {self.node_name!r} produced NaN during "
                                       f"calibration (batch {self.batches}); check the "
                                       "calibration data and the model's float output")
            self.infinite += 1
            x_ = x_[finite]
        if x_.numel():
            self.observe(x_)
            self.batches += 1
        return x

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def merge(self, other: "Observer") -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self._merge(other)
        self.batches += other.batches
        self.infinite += other.infinite

    def _merge(self, other: "Observer") -> None:
        raise NotImplementedError

    def stats(self) -> list[float]:
        """What :meth:`merge` combines, as a short list of floats (batches, Inf batches, then
        the kind's own: a range; a histogram's counts are not in it: they add up apart).
        ``ptqpasses.distributed`` gathers these from every rank."""
        return [float(self.batches), float(self.infinite), *self._stats()]

    def load_stats(self, values: list[float]) -> None:
        """Takes the statistics :meth:`stats` gave (of this observer, or of a merge that
        includes it: a histogram keeps its counts and moves them onto the merged range)."""
        self.batches, self.infinite = int(values[0]), int(values[1])
        self._load_stats(list(values[2:]))

    def empty(self) -> "Observer":
        """An observer of the same kind and options that has seen nothing."""
        return type(self)(self.node_name, **self._options())

    def _stats(self) -> list[float]:
        raise NotImplementedError

    def _load_stats(self, values: list[float]) -> None:
        raise NotImplementedError

    def _options(self) -> dict:
        return {}

    def qparams(self, spec: QSpec) -> QParams:
        if self.batches == 0:
            raise CalibrationError(f"node {self.node_name!r} saw no data during calibration")
        return qparams_from_range(*self.range(), spec)

    def extra_repr(self) -> str:
        return f"node={self.node_name!r}, batches={self.batches}"


class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    kind = "minmax"

    def __init__(self, node_name: str = "", **_):
        super().__init__(node_name)
        self.lo, self.hi = math.inf, -math.inf

    def observe(self, x):
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self):
        return self.lo, self.hi

    def _merge(self, other):
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def _stats(self):
        return [self.lo, self.hi]

    def _load_stats(self, values):
        self.lo, self.hi = values


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max (``momentum`` per batch).

    Merging averages the two estimates weighted by batch count, an approximation of the
    estimate one process would have made (an average of averages: not equal to one pass
    over all the batches, which weighs the last ones most).
    """

    kind = "moving_average"

    def __init__(self, node_name: str = "", momentum: float = 0.01, **_):
        super().__init__(node_name)
        self.momentum = momentum
        self.lo = self.hi = 0.0

    def observe(self, x):
        lo, hi = float(x.min()), float(x.max())
        if self.batches == 0:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.momentum * (lo - self.lo)
            self.hi += self.momentum * (hi - self.hi)

    def range(self):
        return self.lo, self.hi

    def _merge(self, other):
        total = self.batches + other.batches
        if total:
            self.lo = (self.lo * self.batches + other.lo * other.batches) / total
            self.hi = (self.hi * self.batches + other.hi * other.batches) / total

    def _stats(self):
        return [self.lo, self.hi]

    def _load_stats(self, values):
        self.lo, self.hi = values

    def _options(self):
        return {"momentum": self.momentum}


class HistogramObserver(Observer):
    """Histogram over a range that grows as needed; the range is clipped at a percentile.

    ``percentile`` (e.g. 99.99) keeps that share of the mass on each side: the clipped range
    is ``[q((100 - p) / 100), q(p / 100)]`` of the observed distribution.

    The statistics are exact and do not depend on the order of the data, so calibrating in
    pieces (other batches, other processes) and merging gives the same counts, bit for bit,
    as one pass over all of it. They are counts on a fixed grid, ``GRID`` bins of ``2**k``:
    bin ``j`` holds the values ``x`` with ``floor(x / 2**k) == j`` (computed exactly), and
    ``k`` is the smallest power (at least ``K_MIN``) at which the observed range ``[vmin,
    vmax]`` (widened to include 0) fits; a function of that range alone. Widening the range
    only ever raises ``k``, and a bin of ``2**(k + d)`` is exactly the union of ``2**d``
    bins of ``2**k`` (``floor(floor(y) / 2**d) == floor(y / 2**d)``), so re-binning loses
    nothing. The range searches read ``hist``: the counts spread onto ``BINS`` equal bins
    over ``[lo, hi] = [vmin, vmax]`` (4 to 8 grid bins each), a function of the counts
    (updated with them).
    """

    kind = "histogram"
    BINS = 2048       # the histogram the range searches read
    GRID = 8 * 2048   # exact counts, of which at least half are in the observed range
    K_MIN = -64       # bins of 2**-64: any narrower range gets the smallest scale (1e-8)

    def __init__(self, node_name: str = "", percentile: float = 99.99, **_):
        super().__init__(node_name)
        self.percentile = percentile
        # (the counts stay out of the state dict, whose names and shapes are part of a
        # recipe's graph fingerprint; ``hist`` is there, as before the exact counts)
        self.register_buffer("counts", torch.zeros(self.GRID, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("hist", torch.zeros(self.BINS, dtype=torch.float64))
        self.vmin, self.vmax = math.inf, -math.inf  # the observed range (with 0) so far
        self.k = self.K_MIN

    @classmethod
    def _power(cls, vmin: float, vmax: float) -> int:
        """The smallest ``k >= K_MIN`` with ``[vmin, vmax]`` in ``GRID`` bins of ``2**k``."""
        span = vmax - vmin
        k = cls.K_MIN if span <= 0 else max(cls.K_MIN, math.floor(math.log2(span / cls.GRID)) - 1)
        while math.floor(vmax / 2.0 ** k) - math.floor(vmin / 2.0 ** k) >= cls.GRID:
            k += 1
        return k

    @property
    def first(self) -> int:
        """Grid index of ``counts[0]``: the bin holding ``vmin``."""
        return math.floor(self.vmin / 2.0 ** self.k) if self.vmin <= self.vmax else 0

    @property
    def lo(self) -> float:
        return self.vmin if self.vmin <= self.vmax else 0.0

    @property
    def hi(self) -> float:
        if self.vmin > self.vmax:
            return 0.0
        return self.vmax if self.vmax > self.vmin else self.vmin + 1e-8

    def set_counts(self, counts: torch.Tensor) -> None:
        """Replaces the grid counts (e.g. by the sum over ranks) and updates ``hist``."""
        self.counts = counts.to(self.counts)
        self.hist = self._spread()

    def _spread(self) -> torch.Tensor:
        """``BINS`` counts over ``[lo, hi]``: each grid bin's count split between the (at most
        two) bins it overlaps, in proportion to the overlap."""
        lo, hi, dev = self.lo, self.hi, self.counts.device
        if self.vmin > self.vmax:
            return torch.zeros(self.BINS, dtype=torch.float64, device=dev)
        edges = (torch.arange(self.GRID + 1, dtype=torch.float64, device=dev) + self.first) \
            * 2.0 ** self.k
        pos = ((edges - lo) / (hi - lo) * self.BINS).clamp(0, self.BINS)
        a, b = pos[:-1], pos[1:]
        i = a.floor().clamp(max=self.BINS - 1)
        cut = torch.minimum(b, i + 1)
        share = torch.where(b > a, (cut - a) / (b - a), torch.ones_like(a))
        out = torch.zeros(self.BINS, dtype=torch.float64, device=dev)
        out.index_add_(0, i.long(), self.counts * share)
        return out.index_add_(0, (i + 1).clamp(max=self.BINS - 1).long(),
                              self.counts * (1 - share))

    def _regrid(self, vmin: float, vmax: float) -> None:
        """Widens the range to include ``[vmin, vmax]``, merging grid bins where the grid
        coarsens (exact: see the class docstring)."""
        if vmin > vmax:
            return  # nothing observed
        empty = self.vmin > self.vmax
        old_first, old_k = self.first if not empty else 0, self.k
        self.vmin, self.vmax = min(vmin, self.vmin), max(vmax, self.vmax)
        self.k = self._power(self.vmin, self.vmax)
        if not empty and (old_first, old_k) != (self.first, self.k):
            full = self.counts > 0
            j = torch.arange(self.GRID, dtype=torch.float64, device=self.counts.device)[full]
            idx = torch.floor((j + old_first) / 2.0 ** (self.k - old_k)).long() - self.first
            self.counts = torch.zeros_like(self.counts).index_add_(0, idx, self.counts[full])
        self.hist = self._spread()

    def observe(self, x):
        self._regrid(min(float(x.min()), 0.0), max(float(x.max()), 0.0))
        # x * 2**-k is exact in float32 for k <= 0 (a power-of-two scale up, to at most
        # GRID); for k > 0 small values could lose bits below float32's normal range.
        scaled = (x if self.k <= 0 else x.double()).reshape(-1) * 2.0 ** -self.k
        idx = scaled.floor_().sub_(self.first).to(torch.int32)
        self.set_counts(self.counts + torch.bincount(idx, minlength=self.GRID).to(self.counts))

    def _merge(self, other):
        theirs = other.empty()
        theirs.counts, theirs.vmin, theirs.vmax, theirs.k = (other.counts.clone(), other.vmin,
                                                              other.vmax, other.k)
        theirs._regrid(self.vmin, self.vmax)
        self._regrid(other.vmin, other.vmax)
        self.set_counts(self.counts + theirs.counts.to(self.counts))

    def _stats(self) -> list[float]:
        return [self.vmin, self.vmax]

    def _load_stats(self, values: list[float]) -> None:
        self._regrid(*values)  # (the counts add up apart: ptqpasses.distributed)

    def _options(self) -> dict:
        return {"percentile": self.percentile}

    def range(self):
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        width = (self.hi - self.lo) / self.BINS
        tail = (100.0 - self.percentile) / 100.0
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        return self.lo + lo_bin * width, self.lo + (hi_bin + 1) * width
