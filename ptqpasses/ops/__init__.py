"""The integer operator set: the contract between ptqpasses and its backends.

Every op lives in the ``ptq`` torch.library namespace (``torch.ops.ptq.<name>``) and its
eager implementation here *is* the specification (see docs/integer_ops.md). Backends must
match these kernels bit-exactly.

Conventions shared by all ops:
  * Activations are int8 or uint8, one scale and zero point per tensor. Weights are int8,
    symmetric (zero point 0), one scale per output channel. Bias is int32 with scale
    ``x_scale * w_scale[c]`` and zero point 0.
  * Accumulation is exact integer arithmetic held in int32.
  * Requantization is ``clamp(round_half_even(float32(acc) * m) + out_zp, qmin, qmax)``
    where ``m`` is a float32 multiplier computed once at lowering time and stored in the
    graph, so every backend multiplies by the same number. ``qmin``/``qmax`` also carry
    fused ReLU / ReLU6 clamps.
"""

from ptqpasses.ops.reference import (  # noqa: F401  (registers the ops)
    INTEGER_OPS,
    requantize_acc,
)
