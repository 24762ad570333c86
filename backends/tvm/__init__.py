"""The Apache TVM (Relax) backend: ``emit``, ``compile``, ``tune``, ``load``, ``CompiledModule``,
named targets, and the pipeline ``STAGES`` where ``compile(relax_passes=)`` inserts user passes."""

from ptqpasses_backends.tvm.build import build_ir, emit, input_specs  # noqa: F401
from ptqpasses_backends.tvm.compile import compile  # noqa: F401
from ptqpasses_backends.tvm.dynamo import DynamoBackend, GraphStatus, dynamo_backend  # noqa: F401
from ptqpasses_backends.tvm.emit import EmitError, TensorSpec  # noqa: F401
from ptqpasses_backends.tvm.pipeline import STAGES, RelaxPassError, SparePtqKernels  # noqa: F401
from ptqpasses_backends.tvm.runtime import CompiledModule, LoadError, load  # noqa: F401
from ptqpasses_backends.tvm.registry import strategy_for  # noqa: F401
from ptqpasses_backends.tvm.targets import TARGETS, NamedTarget, resolve  # noqa: F401
from ptqpasses_backends.tvm.tune import tune  # noqa: F401,E402
