"""Units of work: which trials share a task, and in what order tasks start.

Beside the scheduler rather than in the grid's expansion: how trials are packed into tasks is a
matter of engines and cores, not of what the grid asks for.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from harness.grid import TrialSpec


# Settings each member of a fused stack keeps for itself (harness.engines.optimizers.Hyper).
PER_MODEL_TRAIN = ("momentum", "beta_1", "beta_2", "epsilon", "rho", "schedule", "warmup_updates", "warmup_epochs",
                   "decay_epochs", "decay_factor", "learning_rate_scaling", "base_batch_size")


def group_key(spec: TrialSpec) -> tuple:
    """Trials with the same key can be trained as one stacked computation by the fused engine:
    same data, network shape, optimizer rule (and Nesterov or not), batch size and epochs;
    learning rate and schedule, the optimizer's hyperparameters, L2 and seed are per model."""
    defaults = type(spec.train)()
    train = dataclasses.replace(spec.train, **{k: getattr(defaults, k) for k in PER_MODEL_TRAIN})
    return (spec.problem, dataclasses.replace(spec.model, l2=0.0), train, spec.batch_size)


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


# Seconds per operation measured on this project's 2-core machine, one thread (tests/benchmarks
# and the closing notes hold the measurements); only ratios matter here: they size and order
# tasks, they promise nothing.
FUSED_STEP_S = (19e-6, 0.77e-6, 0.164e-6)  # a + b·M + c·M·B per stacked step of M models at batch B
FUSED_SCORE_S = 0.086e-6  # per model and row scored at an evaluation point (train, val and test rows)
FUSED_NOISE_S = 0.7e-6  # per model and training row, at a point where the noise scale is measured
KERAS_TRIAL_S, KERAS_UPDATE_S, KERAS_EXAMPLE_S, KERAS_EPOCH_S = 1.5, 200e-6, 12e-6, 3e-3


def estimated_cost(group: Sequence[TrialSpec]) -> float:
    """Estimated seconds of one task on one core: what sizes and orders the work."""
    from harness.clock import eval_points, noise_points

    spec, m = group[0], len(group)
    if spec.train.engine == "fused":
        a, b, c = FUSED_STEP_S
        steps = spec.planned_updates * (a + b * m + c * m * spec.batch_size)
        scoring = len(eval_points(spec)) * FUSED_SCORE_S * m * spec.problem.n_samples
        noise = len(noise_points(spec)) * FUSED_NOISE_S * m * spec.problem.n_train
        return steps + scoring + noise
    return sum(KERAS_TRIAL_S + s.planned_updates * (KERAS_UPDATE_S + KERAS_EXAMPLE_S * s.batch_size)
               + s.train.epochs * KERAS_EPOCH_S for s in group)


MIN_FUSED = 4  # below this many models a stacked step is mostly fixed cost: not worth a split
TASKS_PER_SLOT = 3


def plan_tasks(specs: Sequence[TrialSpec], slots: int) -> list[tuple[TrialSpec, ...]]:
    """Units of work sized to ``slots`` (trials that can run at once). A fused group that alone
    would outlast an even share of the work (total cost / slots: the critical path) is split
    into near-equal stacks just under that share (never below MIN_FUSED models: splitting costs
    each stack its fixed per-step work, so it only pays where it shortens the run); short Keras
    trials are packed together up to a third of that share, so there are a few tasks per slot
    (each trial is still timed alone). Costliest first (longest-processing-time order), so the
    slots finish together."""
    groups = group_specs(specs)
    share = sum(estimated_cost(g) for g in groups) / max(1, slots)
    tasks: list[tuple[TrialSpec, ...]] = []
    packed: list[TrialSpec] = []
    packed_cost = 0.0  # a running total: re-summing the packed trials per trial was quadratic
    for group in groups:
        cost = estimated_cost(group)
        if group[0].train.engine == "fused":
            parts = max(1, min(len(group) // MIN_FUSED, math.ceil(cost / share) if share else 1))
            tasks.extend(tuple(chunk) for chunk in _split(group, parts))
        elif packed and packed_cost + cost > share / TASKS_PER_SLOT:
            tasks.append(tuple(packed))
            packed, packed_cost = list(group), cost
        else:
            packed.extend(group)
            packed_cost += cost
    if packed:
        tasks.append(tuple(packed))
    return sorted(tasks, key=estimated_cost, reverse=True)


def _split(group: Sequence[TrialSpec], parts: int) -> list[Sequence[TrialSpec]]:
    size, extra = divmod(len(group), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [group[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def modelled_wall_s(tasks: Sequence[Sequence[TrialSpec]], slots: int,
                    cost: Callable[[Sequence[TrialSpec]], float] = estimated_cost) -> float:
    """Seconds the tasks take on ``slots`` cores by the cost model (or ``cost``), started
    costliest first on whichever slot frees first (what Ray does with them); start-up not included."""
    finish = [0.0] * max(1, slots)
    for seconds in sorted((cost(t) for t in tasks), reverse=True):
        finish[finish.index(min(finish))] += seconds
    return max(finish)


# Starting a private local Ray and stopping it, measured on a 2-core machine: grids/smoke.yaml
# (fused) takes 2.56-2.85 s with --backend ray (median 2.59 s of 5) against 0.56-0.58 s in this
# process (Ray's import 0.3 s, its lean start, harness.private_ray, 1.3-1.5 s, the workers'
# first imports ~0.4 s, ray.shutdown ~0.1 s). It was 4.5 s before that start.
RAY_START_S = 2.0


# Past this many trials a grid goes to Ray without modelling: the model itself would take
# seconds (3 s for 100,000 trials), and a grid that size is rarely a few seconds of work.
MODELLED_UP_TO = 2000


def ray_pays_off(specs: Sequence[TrialSpec], cores: int,
                 cost: Callable[[Sequence[TrialSpec]], float] = estimated_cost) -> bool:
    """Whether fanning ``specs`` out over ``cores`` with a private Ray saves more time than
    starting Ray costs; when not (a smoke grid), the driver trains them in its own process.
    ``cost``: a task's seconds in absolute terms (the driver passes kernel_choice.task_s, which
    knows the fused engine's two paths; estimated_cost only sizes and orders)."""
    if cores < 2:
        return False
    if len(specs) > MODELLED_UP_TO:
        return True
    one = modelled_wall_s(plan_tasks(specs, 1), 1, cost)
    if one * (1 - 1 / cores) <= RAY_START_S:  # even a perfect split would not pay
        return False
    return one - modelled_wall_s(plan_tasks(specs, cores), cores, cost) > RAY_START_S
