"""The observer registry: every range estimator by the name ``QSpec.observer`` uses.

The base class and the plain estimators live in ``observer_base.py``, the searched ones (MSE,
entropy) in ``range_setting.py``; both are re-exported here.
"""

from __future__ import annotations

from ptqpasses.meta import QSpec
from ptqpasses.observer_base import (CalibrationError, HistogramObserver,  # noqa: F401
                                     MinMaxObserver, MovingAverageMinMaxObserver, Observer,
                                     qparams_from_range, weight_qparams)
from ptqpasses.range_setting import EntropyObserver, MSEObserver

OBSERVERS: dict[str, type[Observer]] = {
    cls.kind: cls for cls in (MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver,
                              MSEObserver, EntropyObserver)
}


def make_observer(spec: QSpec, node_name: str) -> Observer:
    if spec.observer not in OBSERVERS:
        raise ValueError(f"node {node_name!r}: unknown observer {spec.observer!r}; known: "
                         f"{', '.join(OBSERVERS)}")
    return OBSERVERS[spec.observer](node_name, percentile=spec.percentile)
