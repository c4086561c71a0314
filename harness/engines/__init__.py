"""Engines train units of work; ``run_group`` is the one dispatch the schedulers call.

``keras`` is the reference (Keras 3 ``fit``, one trial per task); ``fused`` trains a group of
trials as one stacked computation (NumPy, or numba kernels where they pay), proven equal to Keras by tests/test_fused.py. A new
engine is a module here with ``run_group(specs) -> list[TrialResult]`` and a line in RUNNERS.
"""
from __future__ import annotations

import importlib
from typing import Sequence

from harness.grid import TrialSpec
from harness.results import TrialResult, failed_result

# engine name -> module in this package; imported on first use, so a worker that only runs the
# fused engine never builds Keras' training machinery.
RUNNERS = {"keras": "harness.engines.keras", "fused": "harness.engines.fused"}


def run_group(specs: Sequence[TrialSpec]) -> list[TrialResult]:
    """Run one unit of work from ``work.group_specs``: every spec shares one engine. A per-trial
    problem is a ``failed`` row from the engine itself; anything the engine lets escape fails
    the whole group, with the function it came from."""
    if not specs:
        return []
    engine = importlib.import_module(RUNNERS[specs[0].train.engine])
    try:
        return engine.run_group(specs)
    except Exception as exc:  # noqa: BLE001
        return [failed_result(s, exc) for s in specs]
