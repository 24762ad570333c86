"""ptqpasses: graph-level post-training quantization passes for torch.fx.

    gm = ptqpasses.quantize(model, example_inputs, calibration_data)   # integer-op graph
"""

from ptqpasses import ops  # noqa: F401  (registers torch.ops.ptq.*)
from ptqpasses.api import convert, convert_pipeline, prepare, prepare_pipeline, quantize
from ptqpasses.calibrate import calibrate
from ptqpasses.capture import CaptureError, capture
from ptqpasses.config import ConfigError, QuantConfig, Scheme
from ptqpasses.meta import QParams, QSpec
from ptqpasses.observers import CalibrationError
from ptqpasses.passes import (Annotate, ConvertToQDQ, FoldBatchNorm, InsertObservers,
                              LowerToIntegerOps)
from ptqpasses.pipeline import (DumpToFolder, Pass, PassError, PassResult, Pipeline, PrintAfter,
                                Timing, graph_pass)
from ptqpasses.recipe import RecipeError, apply_recipe, load_recipe, save_recipe
from ptqpasses.report import coverage, report

__all__ = [
    "Annotate", "CalibrationError", "CaptureError", "ConfigError", "ConvertToQDQ",
    "DumpToFolder", "FoldBatchNorm", "InsertObservers", "LowerToIntegerOps", "Pass",
    "PassError", "PassResult", "Pipeline", "PrintAfter", "QParams", "QSpec", "QuantConfig",
    "Scheme", "Timing", "calibrate", "capture", "convert", "convert_pipeline", "coverage",
    "graph_pass", "prepare", "prepare_pipeline", "quantize", "report", "RecipeError",
    "apply_recipe", "load_recipe", "save_recipe",
]

# Accuracy (issue 5): recovery passes, sensitivity analysis, automatic mixed precision.
from ptqpasses.passes import (AdaRound, BiasCorrection, CrossLayerEqualization,  # noqa: E402
                              SmoothQuant, adaround, bias_correction, smooth_quant)
from ptqpasses.guard import Guard, GuardReport  # noqa: E402
from ptqpasses.sensitivity import AutoMixedPrecision, node_sensitivity  # noqa: E402

__all__ += ["AdaRound", "AutoMixedPrecision", "BiasCorrection", "CrossLayerEqualization",
            "Guard", "GuardReport", "SmoothQuant", "adaround", "bias_correction",
            "node_sensitivity", "smooth_quant"]

