"""The passes, one per file; importing this package registers them by name."""

from ptqpasses.passes.adaround import AdaRound, adaround
from ptqpasses.passes.annotate import Annotate, AnnotateConfig
from ptqpasses.passes.bias_correction import BiasCorrection, bias_correction
from ptqpasses.passes.convert_to_qdq import ConvertToQDQ, NotCalibratedError
from ptqpasses.passes.cross_layer_equalization import CrossLayerEqualization
from ptqpasses.passes.fold_batchnorm import FoldBatchNorm
from ptqpasses.passes.insert_observers import InsertObservers
from ptqpasses.passes.lower_to_integer_ops import LowerToIntegerOps
from ptqpasses.passes.smooth_quant import SmoothQuant, smooth_quant

__all__ = ["AdaRound", "Annotate", "AnnotateConfig", "BiasCorrection", "ConvertToQDQ",
           "CrossLayerEqualization", "FoldBatchNorm", "InsertObservers", "LowerToIntegerOps",
           "NotCalibratedError", "SmoothQuant", "adaround", "bias_correction", "smooth_quant"]
