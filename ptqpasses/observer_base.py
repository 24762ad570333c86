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


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max (``momentum`` per batch).

    Merging averages the two estimates weighted by batch count, an approximation of the
    estimate one process would have made.
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


class HistogramObserver(Observer):
    """Histogram over a range that grows as needed; the range is clipped at a percentile.

    ``percentile`` (e.g. 99.99) keeps that share of the mass on each side: the clipped range
    is ``[q((100 - p) / 100), q(p / 100)]`` of the observed distribution.
    """

    kind = "histogram"
    BINS = 2048

    def __init__(self, node_name: str = "", percentile: float = 99.99, **_):
        super().__init__(node_name)
        self.percentile = percentile
        self.register_buffer("hist", torch.zeros(self.BINS, dtype=torch.float64))
        self.lo, self.hi = 0.0, 0.0

    def _rebin(self, lo: float, hi: float) -> None:
        """Moves existing counts into bins over the wider ``[lo, hi]`` (by bin centre)."""
        if self.hist.sum() > 0:
            width = (self.hi - self.lo) / self.BINS
            centres = self.lo + (torch.arange(self.BINS, dtype=torch.float64) + 0.5) * width
            idx = ((centres - lo) / (hi - lo) * self.BINS).long().clamp(0, self.BINS - 1)
            new = torch.zeros_like(self.hist)
            new.index_add_(0, idx, self.hist)
            self.hist = new
        self.lo, self.hi = lo, hi

    def observe(self, x):
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if hi == lo:
            hi = lo + 1e-8
        if self.hist.sum() == 0:
            self.lo, self.hi = lo, hi
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        self.hist += torch.histc(x.double(), self.BINS, self.lo, self.hi)

    def _merge(self, other):
        lo, hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self._rebin(lo, hi)
        theirs = HistogramObserver(percentile=other.percentile)
        theirs.hist, theirs.lo, theirs.hi = other.hist.clone(), other.lo, other.hi
        theirs._rebin(lo, hi)
        self.hist += theirs.hist

    def range(self):
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        width = (self.hi - self.lo) / self.BINS
        tail = (100.0 - self.percentile) / 100.0
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        return self.lo + lo_bin * width, self.lo + (hi_bin + 1) * width
