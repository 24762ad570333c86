"""The passes, one per file; importing this package registers them by name."""

from ptqpasses.passes.annotate import Annotate, AnnotateConfig
from ptqpasses.passes.convert_to_qdq import ConvertToQDQ, NotCalibratedError
from ptqpasses.passes.fold_batchnorm import FoldBatchNorm
from ptqpasses.passes.insert_observers import InsertObservers
from ptqpasses.passes.lower_to_integer_ops import LowerToIntegerOps

__all__ = ["Annotate", "AnnotateConfig", "ConvertToQDQ", "FoldBatchNorm", "InsertObservers",
           "LowerToIntegerOps", "NotCalibratedError"]
