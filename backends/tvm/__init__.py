"""The Apache TVM (Relax) backend: ``compile``, ``tune``, ``load``, ``CompiledModule``, named
targets."""

from backends.tvm.compile import build_ir, compile, input_specs  # noqa: F401
from backends.tvm.emit import EmitError, TensorSpec, emit  # noqa: F401
from backends.tvm.runtime import CompiledModule, LoadError, load  # noqa: F401
from backends.tvm.targets import TARGETS, NamedTarget, resolve  # noqa: F401
from backends.tvm.tune import tune  # noqa: F401,E402
