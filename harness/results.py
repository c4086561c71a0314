"""What a trial hands back: the result types every engine fills, the store writes and the
scheduler forwards. Declared once here so that none of those modules imports another.

A trial never raises: an exception becomes a ``failed`` result and a NaN/inf loss stops the
trial early as ``diverged``, so one bad cell cannot take a study down.
"""
from __future__ import annotations

import math
import socket
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from harness.grid import TrialSpec
from harness.schema import utc_now


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    elapsed_s: float
    updates: int


@dataclass(frozen=True)
class PointRecord:
    """The model after ``updates`` optimizer steps, scored on whole splits (harness.clock)."""

    updates: int
    examples_seen: int
    elapsed_s: float
    train_loss: float  # on all training rows, after the update (not a running mean)
    train_accuracy: float
    val_loss: float  # NaN without a validation split
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    grad_sq: float  # |G|^2, G the mean gradient over the training rows (harness.noise)
    trace_sigma: float  # tr(Sigma), Sigma the covariance of the per-example gradients
    b_simple: float  # tr(Sigma) / |G|^2, the simple gradient noise scale


def make_points(updates: int, examples_seen: int, elapsed_s: float, scores: dict[str, tuple[Sequence, Sequence]],
                grad_sq: Sequence, trace_sigma: Sequence) -> list[PointRecord]:
    """The points of models scored together at one update count: (losses, accuracies) per split
    name (train, val, test; a missing split is NaN), a value per model, and each model's gradient
    noise statistics. Both engines build their points here (the fused engine ~7,000 a group, a
    stack at a time; the Keras engine one model at a time, make_point)."""
    n = len(grad_sq)
    nan = ([math.nan] * n,) * 2
    (train_loss, train_acc), (val_loss, val_acc), (test_loss, test_acc) = (
        scores.get(split, nan) for split in ("train", "val", "test"))
    updates, examples_seen, elapsed_s = int(updates), int(examples_seen), float(elapsed_s)
    points = []
    for i in range(n):
        g, t = float(grad_sq[i]), float(trace_sigma[i])
        points.append(PointRecord(updates=updates, examples_seen=examples_seen, elapsed_s=elapsed_s,
                                  train_loss=float(train_loss[i]), train_accuracy=float(train_acc[i]),
                                  val_loss=float(val_loss[i]), val_accuracy=float(val_acc[i]),
                                  test_loss=float(test_loss[i]), test_accuracy=float(test_acc[i]),
                                  grad_sq=g, trace_sigma=t, b_simple=t / g if g != 0 else math.inf))
    return points


def make_point(updates: int, examples_seen: int, elapsed_s: float, scores: dict[str, tuple[float, float]],
               grad_sq: float, trace_sigma: float) -> PointRecord:
    """One model's point from (loss, accuracy) per split name (make_points for one model)."""
    return make_points(updates, examples_seen, elapsed_s,
                       {split: ([loss], [accuracy]) for split, (loss, accuracy) in scores.items()},
                       [grad_sq], [trace_sigma])[0]


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    status: str
    error: str | None = None
    diverged_at_update: int | None = None
    train_accuracy: float = math.nan
    test_accuracy: float = math.nan
    train_loss: float = math.nan
    test_loss: float = math.nan
    val_accuracy: float = math.nan
    val_loss: float = math.nan
    epochs_run: int = 0
    updates: int = 0
    examples_seen: int = 0
    wall_clock_s: float = math.nan
    first_epoch_s: float = math.nan
    group_size: int = 1
    group_wall_clock_s: float = math.nan
    engine_version: str = ""
    node_id: str = "local"
    hostname: str = field(default_factory=socket.gethostname)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epochs: tuple[EpochRecord, ...] = ()
    points: tuple[PointRecord, ...] = ()

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id


def error_text(exc: BaseException, frames: int = 3) -> str:
    """'Type: message' on the first line, then the innermost ``frames`` frames of its traceback
    (file:line in function), so a failed row says where it failed without a log to dig in."""
    head = f"{type(exc).__name__}: {exc}".strip()
    tail = traceback.extract_tb(exc.__traceback__)[-frames:]
    return "\n".join([head, *(f"  at {Path(f.filename).name}:{f.lineno} in {f.name}" for f in tail)])


def failed_result(spec: TrialSpec, exc: BaseException | str, started_at: datetime | None = None,
                  **fields_) -> TrialResult:
    """A ``failed`` row carrying the error; used by engines and by schedulers for lost workers."""
    error = exc if isinstance(exc, str) else error_text(exc)
    return TrialResult(spec=spec, status="failed", error=error[:2000], started_at=started_at or utc_now(),
                       finished_at=utc_now(), **fields_)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def blown(loss, held_out, limit):
    """Whether a training loss has blown up, beside the held-out loss measured with it: either is
    not finite, or the training loss is above ``limit``. Floats, or arrays (the fused engine
    checks a whole stack at once)."""
    return ~np.isfinite(loss) | ~np.isfinite(held_out) | (loss > limit)


def blow_up(spec: TrialSpec, points: Sequence[PointRecord], records: Sequence[EpochRecord]) -> int | None:
    """The first update at which the trial has blown up, or None: a non-finite loss, or a
    training loss above ``divergence_factor`` times the initial one (point 0), on all training
    rows at an evaluation point or as an epoch's running mean (which sees the loss between
    points; it counts at the epoch's end). A finite blow-up counts as much as a NaN: such a run
    ends as a collapsed model, not a trained one."""
    limit = spec.train.divergence_factor * points[0].train_loss if points else math.inf
    # (updates, training loss, held-out loss) of every point and epoch, checked as one array:
    # a fused group summarizes ~14,000 of them, ~1 µs each one at a time
    rows = np.array([(p.updates, p.train_loss, p.test_loss) for p in points]
                    + [(r.updates, r.loss, r.val_loss) for r in records], np.float64).reshape(-1, 3)
    bad = blown(rows[:, 1], rows[:, 2], limit)
    return int(rows[bad, 0].min()) if bad.any() else None


def stops_at(spec: TrialSpec, update: int | None) -> int:
    """Epochs a trial runs: a blown-up trial stops at the end of the epoch it blew up in (both
    engines do, so the epochs table keeps whole epochs)."""
    if update is None:
        return spec.train.epochs
    return max(1, math.ceil(update / spec.updates_per_epoch))


def summarize(spec: TrialSpec, records: Sequence[EpochRecord], points: Sequence[PointRecord]) -> dict:
    """Per-trial fields derived from the epoch and point records, the same way for every engine:
    status and blow-up, counts, and (for a trial that finished ok) the final scores, which are
    its last point's (the model after its last update, scored on whole splits)."""
    epochs_run = len(records)
    at = blow_up(spec, points, records)
    error = None
    if at is not None:
        epoch = stops_at(spec, at)
        last = epoch * spec.updates_per_epoch
        if not all(_finite(r.loss, r.val_loss) for r in records if r.updates <= last) or \
                not all(_finite(p.train_loss, p.test_loss) for p in points if p.updates <= last):
            error = f"loss became non-finite in epoch {epoch} (first seen at update {at})"
        else:
            error = (f"training loss exceeded {spec.train.divergence_factor:g}x its initial "
                     f"{points[0].train_loss:.3g} at update {at} (epoch {epoch})")
    final = {}
    if at is None and points:
        last = points[-1]
        final = {f"{split}_{name}": getattr(last, f"{split}_{name}")
                 for split in ("train", "val", "test") for name in ("loss", "accuracy")}
    return {
        **final,
        "status": "ok" if at is None else "diverged",
        "error": error,
        "diverged_at_update": at,
        "epochs_run": epochs_run,
        "updates": epochs_run * spec.updates_per_epoch,
        "examples_seen": epochs_run * spec.problem.n_train,
        "first_epoch_s": records[0].elapsed_s if records else math.nan,
    }


def with_node(results: Sequence, node_id: str) -> list:
    """Trial results stamped with the Ray node they ran on; other rows (timing probes) as they are."""
    return [replace(r, node_id=node_id) if isinstance(r, TrialResult) else r for r in results]
