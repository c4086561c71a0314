"""The update clock: at which optimizer steps a trial is evaluated, and how examples count.

Both engines evaluate at the same update counts, chosen independently of epochs, so that steps
to a target are measured to one schedule point at every batch size instead of to one epoch
(500 updates at batch size 1, one update at 500):

- ``epoch``: update 0 (the untrained model) and every epoch end;
- ``geometric``: those, plus ``eval_points_per_octave`` points per doubling of the update count,
  from update 1 to the end: a step-to-target read off it is at most 2^(1/k) − 1 too high
  (19 % at k = 4, 9 % at k = 8), whatever the batch size.
"""
from __future__ import annotations

import math

import numpy as np

from harness.grid import TrialSpec

SCHEDULES = ("epoch", "geometric")


def _geometric(total: int, per_octave: int) -> set[int]:
    """Update 0, round(2^(i/k)) for every i up to the last update, and the last update."""
    if total < 1:
        return {0}
    steps = int(math.floor(math.log2(total) * per_octave)) + 1
    return {0, total, *(int(round(2.0 ** (i / per_octave))) for i in range(steps))}


def eval_points(spec: TrialSpec) -> np.ndarray:
    """Sorted, distinct update counts (int64) at which ``spec`` is evaluated, 0 included."""
    per_epoch, total = spec.updates_per_epoch, spec.planned_updates
    points = {0, *range(per_epoch, total + 1, per_epoch)}
    if spec.train.eval_schedule == "geometric":
        points |= _geometric(total, spec.train.eval_points_per_octave)
    return np.array(sorted(p for p in points if p <= total), dtype=np.int64)


def noise_points(spec: TrialSpec) -> np.ndarray:
    """The points at which the gradient noise scale is measured: the geometric clock's own
    points, not every epoch end (B_simple costs about eight scoring passes, and octave
    resolution is what a B_simple curve needs); none on the epoch clock, which stays as cheap
    as the reference study."""
    if spec.train.eval_schedule != "geometric":
        return np.array([], dtype=np.int64)
    geometric = _geometric(spec.planned_updates, spec.train.eval_points_per_octave)
    return np.array(sorted(p for p in geometric if p <= spec.planned_updates), dtype=np.int64)


def examples_at(spec: TrialSpec, updates: int) -> int:
    """Training examples processed after ``updates`` steps: whole epochs of n_train rows, then
    full batches (the short last batch of an epoch only ever ends an epoch)."""
    epochs, into = divmod(int(updates), spec.updates_per_epoch)
    return epochs * spec.problem.n_train + into * spec.batch_size
