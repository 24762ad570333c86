"""cuda: codegen only. Kernels use the same packed compute (s8 x s8, 4x4 blocks, a ``dp4a``
shape) and are scheduled by TVM's dlight default GPU rules in the pipeline."""

from __future__ import annotations

from backends.tvm.family import Family

FAMILY = Family("cuda", act_dtype="int8", lanes=4, depth=4, schedule=None)
