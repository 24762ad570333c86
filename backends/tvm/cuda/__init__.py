"""cuda: code generation only. Kernels use the same packed compute (s8 x s8, 4x4 blocks, a
``dp4a`` shape) and are scheduled by TVM's dlight default GPU rules in the pipeline."""

from __future__ import annotations

from ptqpasses_backends.tvm.strategy import Device, Layout, Strategy, Variant

CUDA = Strategy("cuda", "cuda", (Variant("", Layout("int8", 4, 4), summary="dlight rules"),),
                schedule_glue=False, nhwc=False, device=Device.CUDA,
                summary="CUDA: packed s8 x s8 computes, TVM's dlight GPU rules")
