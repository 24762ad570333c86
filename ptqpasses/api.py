"""One-call and step-wise entry points, each a thin composition of the passes."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import torch.fx as fx

from ptqpasses import distributed
from ptqpasses.calibrate import calibrate, observers
from ptqpasses.capture import capture
from ptqpasses.config import QuantConfig
from ptqpasses.guard import Guard, run_guard
from ptqpasses.passes import (Annotate, ConvertToQDQ, FoldBatchNorm, InsertObservers,
                              LowerToIntegerOps)
from ptqpasses.pipeline import Instrument, Pipeline


def prepare_pipeline(config: QuantConfig) -> Pipeline:
    return Pipeline([FoldBatchNorm(), Annotate(config=config), InsertObservers()])


def convert_pipeline(lower: bool = True) -> Pipeline:
    return Pipeline([ConvertToQDQ(), LowerToIntegerOps()] if lower else [ConvertToQDQ()])


def prepare(model, example_inputs: Sequence[Any] = (), config: Optional[QuantConfig] = None, *,
            instruments: Iterable[Instrument] = (), **capture_options) -> fx.GraphModule:
    """Captures ``model`` (unless it is already a captured graph), folds batch norm,
    annotates with ``config`` and inserts observers. Calibrate the result next."""
    gm = capture(model, example_inputs, **capture_options)
    pipeline = prepare_pipeline(config or QuantConfig())
    pipeline.instruments = list(instruments)
    return pipeline(gm).graph_module


def convert(observed: fx.GraphModule, *, lower: bool = True,
            instruments: Iterable[Instrument] = ()) -> fx.GraphModule:
    """Calibrated graph -> QDQ reference graph -> (``lower=True``) integer-op graph."""
    pipeline = convert_pipeline(lower)
    pipeline.instruments = list(instruments)
    return pipeline(observed).graph_module


def quantize(model, example_inputs: Sequence[Any], calibration_data: Iterable[Any],
             config: Optional[QuantConfig] = None, *, guard: Union[bool, Guard] = True,
             progress: bool = True, **capture_options) -> fx.GraphModule:
    """Float model -> integer-op GraphModule runnable in torch (prepare, calibrate, convert).

    With ``guard`` (default on; a :class:`ptqpasses.guard.Guard` sets its floors) the last
    quarter of the calibration batches is set aside to judge the result against the float
    model, and where it falls below the floor (20 dB output SQNR, 0.99 per-sample cosine) the
    most damaging nodes are raised to int16 activations, then float
    (:mod:`ptqpasses.guard`); ``gm.meta["ptq.guard"]`` holds the report. ``guard=False``:
    calibrate on every batch and convert, nothing checked; inside torch.distributed that
    calibration merges across the ranks (:mod:`ptqpasses.distributed`), the guard's does not.
    """
    if guard is False or guard is None:
        gm = prepare(model, example_inputs, config, **capture_options)
        if observers(gm):  # (nothing to observe: every integer op reads per-token inputs)
            calibrate(gm, calibration_data, progress=progress)
        return convert(gm)
    if guard is True:
        guard = Guard()
    if not isinstance(guard, Guard):
        raise TypeError(f"quantize: guard must be True, False or a Guard, got "
                        f"{type(guard).__name__}")
    if distributed.active():
        warnings.warn("quantize: the accuracy guard calibrates and judges this process's "
                      "batches only (the ranks may choose different plans); inside "
                      "torch.distributed use guard=False, or prepare / calibrate / convert",
                      stacklevel=2)
    config = config or QuantConfig()
    float_gm = capture(model, example_inputs, **capture_options)

    return run_guard(guard, float_gm, config, list(calibration_data),
                     lambda plan: prepare(float_gm, config=plan), convert, progress=progress)


__all__ = ["prepare", "calibrate", "convert", "quantize", "prepare_pipeline", "convert_pipeline"]
