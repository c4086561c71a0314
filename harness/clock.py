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


def eval_points(spec: TrialSpec) -> np.ndarray:
    """Sorted, distinct update counts (int64) at which ``spec`` is evaluated, 0 included."""
    per_epoch, total = spec.updates_per_epoch, spec.planned_updates
    points = {0, *range(per_epoch, total + 1, per_epoch)}
    if spec.train.eval_schedule == "geometric" and total >= 1:
        k = spec.train.eval_points_per_octave
        octaves = math.log2(total)
        points.update(int(round(2.0 ** (i / k))) for i in range(int(math.floor(octaves * k)) + 1))
        points.add(total)
    return np.array(sorted(p for p in points if p <= total), dtype=np.int64)


def examples_at(spec: TrialSpec, updates: int) -> int:
    """Training examples processed after ``updates`` steps: whole epochs of n_train rows, then
    full batches (the short last batch of an epoch only ever ends an epoch)."""
    epochs, into = divmod(int(updates), spec.updates_per_epoch)
    return epochs * spec.problem.n_train + into * spec.batch_size
