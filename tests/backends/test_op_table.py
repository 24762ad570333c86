"""The op table (``ptqpasses.opsets.OPS``) is what every stage reads: each entry's lowering
rule exists, and each ``ptq`` op it may lower to has a torch reference and a TVM emitter."""

import pytest

from ptqpasses.meta import NodeQuant, Role
from ptqpasses.ops.reference import INTEGER_OPS
from ptqpasses.opsets import COMPUTE, OPS, SHARE, VIEWS, Kind
from ptqpasses.passes.lower_to_integer_ops import _RULES
from ptqpasses_backends.tvm.ptq_ops import HANDLERS


@pytest.mark.parametrize("target", list(OPS), ids=str)
def test_every_entry_lowers_to_ops_with_a_reference_and_an_emitter(target):
    op = OPS[target]
    if op.kind in (Kind.COMPUTE, Kind.LOOKUP):
        assert op.rule in _RULES, f"{target}: no lowering rule {op.rule!r}"
        assert op.emits, f"{target}: a compute op that lowers to nothing"
    else:
        assert not op.rule
    for name in op.emits:
        assert name in INTEGER_OPS, f"{target}: ptq.{name} has no torch reference"
        assert name in HANDLERS, f"{target}: ptq.{name} has no TVM emitter"


def test_the_sets_are_views_of_the_table():
    assert set(COMPUTE) == {t for t, o in OPS.items() if o.kind in (Kind.COMPUTE, Kind.LOOKUP)}
    assert VIEWS <= SHARE and not set(COMPUTE) & SHARE
    assert set(INTEGER_OPS) == set(HANDLERS)  # every reference op is emitted, nothing else


def test_role_is_a_closed_set():
    assert NodeQuant("compute").role is Role.COMPUTE and Role.COMPUTE == "compute"
    with pytest.raises(ValueError, match="unknown role 'computed'"):
        NodeQuant("computed")
    with pytest.raises(ValueError, match="unknown role"):
        NodeQuant(Role.SHARE).replace(role="shared")
