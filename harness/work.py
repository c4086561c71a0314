"""Units of work: which trials share a task, and in what order tasks start.

Beside the scheduler rather than in the grid's expansion: how trials are packed into tasks is a
matter of engines and cores, not of what the grid asks for.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from harness.grid import TrialSpec


def group_key(spec: TrialSpec) -> tuple:
    """Trials with the same key can be trained as one stacked computation by the fused engine:
    same data, network shape, batch size and epochs; learning rate, momentum and seed are per model."""
    train = dataclasses.replace(spec.train, momentum=0.0)
    return (spec.problem, spec.model, train, spec.batch_size)


def group_specs(specs: Sequence[TrialSpec], max_group: int = 64) -> list[tuple[TrialSpec, ...]]:
    """Units of work for the scheduler: fused trials share a task per group key (at most
    ``max_group`` models each), every other trial is a task of its own. Costliest first, so
    the long batch-size-1 work starts early and the cores finish together."""
    groups: list[tuple[TrialSpec, ...]] = []
    fused: dict[tuple, list[TrialSpec]] = {}
    for spec in specs:
        if spec.train.engine == "fused":
            fused.setdefault(group_key(spec), []).append(spec)
        else:
            groups.append((spec,))
    for members in fused.values():
        groups.extend(tuple(members[i:i + max_group]) for i in range(0, len(members), max_group))
    return sorted(groups, key=estimated_cost, reverse=True)


def estimated_cost(group: Sequence[TrialSpec]) -> float:
    """Relative cost of a task, for ordering only: Keras pays per update, fused per stacked step."""
    spec = group[0]
    steps = spec.planned_updates
    if spec.train.engine == "fused":
        return steps * (1.0 + 0.05 * len(group)) * 0.05
    return float(steps) + 20.0 * spec.train.epochs
