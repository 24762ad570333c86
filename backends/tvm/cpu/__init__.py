"""LLVM-generic CPU schedules, shared by every CPU strategy (x86 and aarch64).

``SCHEDULES`` maps a ptq kernel kind to its fixed schedule (``ScheduleFn``): the plain
register-tiled ``matmul`` (``matmul.py``), depthwise convs (``depthwise.py``), ``max_pool2d``
(``pool.py``) and the int16-activation kernels (``wide.py``). The glue and float islands get
``glue.py`` (``pipeline.ApplyGlueSchedules``); ``dot.py`` tensorizes a packed kernel's ``acc``
block with any dot-product intrinsic (``dot_intrin.py``: the one description they share).
``token.py`` is the one-pass per-token quantize of ``linear_dynamic`` inputs and
``softmax.py`` the row softmax with its quantize folded in: ``Strategy.kernels``
``token_quantize`` / ``softmax``, from :func:`row_kernels`.
"""

from __future__ import annotations

from ptqpasses_backends.tvm.cpu.depthwise import schedule_depthwise, schedule_depthwise_nhwc
from ptqpasses_backends.tvm.cpu.matmul import schedule_matmul
from ptqpasses_backends.tvm.cpu.pool import schedule_max_pool2d, schedule_max_pool2d_nhwc
from ptqpasses_backends.tvm.cpu.wide import schedule_wide


def nhwc(func) -> bool:
    """Whether a ptq kernel was emitted channel-last (its ``ptq.layout`` attribute)."""
    return bool(func.attrs) and str(func.attrs.get("ptq.layout", "")) == "NHWC"


def _wide(func, kind, _target):
    return schedule_wide(func, kind)


def _max_pool2d(func, _kind, _target):
    return schedule_max_pool2d_nhwc(func) if nhwc(func) else schedule_max_pool2d(func)


def _depthwise(func, _kind, _target):
    return schedule_depthwise_nhwc(func) if nhwc(func) else schedule_depthwise(func)


def _matmul(func, _kind, _target):
    return schedule_matmul(func)


def row_kernels(lanes: int, avx512: bool = False) -> dict:
    """``Strategy.kernels`` entries of every CPU strategy: ``token_quantize``
    (``cpu/token.py``) and ``softmax`` (``cpu/softmax.py``, where the rows fit it) with
    ``lanes`` float lanes (``avx512``: the round is ``vcvtps2dq {rn-sae}``)."""
    def token_quantize(em, x):
        from ptqpasses_backends.tvm.cpu import token  # (imports kernels/, which imports glue)
        return token.emit(em, x, lanes=lanes, avx512=avx512)

    def row_softmax(em, x):
        from ptqpasses_backends.tvm.cpu import softmax  # (likewise)
        if not softmax.fits(x.ty.shape.values[-1], lanes):
            return None
        return softmax.emit(em, x, lanes=lanes, avx512=avx512)

    return {"token_quantize": token_quantize, "softmax": row_softmax}


#: Kernel kind -> fixed schedule, for every CPU strategy.
SCHEDULES = {
    "matmul": _matmul,
    "conv2d_depthwise": _depthwise,
    "max_pool2d": _max_pool2d,
    "dense_wide": _wide,
    "conv2d_wide": _wide,
}
