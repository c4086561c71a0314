"""What a trial hands back: the result types every engine fills, the store writes and the
scheduler forwards. Declared once here so that none of those modules imports another.

A trial never raises: an exception becomes a ``failed`` result and a NaN/inf loss stops the
trial early as ``diverged``, so one bad cell cannot take a study down.
"""
from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Sequence

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
class TrialResult:
    spec: TrialSpec
    status: str
    error: str | None = None
    train_accuracy: float = math.nan
    test_accuracy: float = math.nan
    train_loss: float = math.nan
    test_loss: float = math.nan
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

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id


def failed_result(spec: TrialSpec, exc: BaseException | str, started_at: datetime | None = None,
                  **fields_) -> TrialResult:
    """A ``failed`` row carrying the error; used by engines and by schedulers for lost workers."""
    error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".strip()
    return TrialResult(spec=spec, status="failed", error=error[:2000], started_at=started_at or utc_now(),
                       finished_at=utc_now(), **fields_)


def summarize_epochs(spec: TrialSpec, records: Sequence[EpochRecord]) -> dict:
    """Per-trial fields derived from the per-epoch records, the same way for every engine."""
    epochs_run = len(records)
    last = records[-1] if records else None
    diverged = last is not None and not all(math.isfinite(v) for v in (last.loss, last.val_loss))
    return {
        "status": "diverged" if diverged else "ok",
        "error": f"loss became non-finite in epoch {last.epoch}" if diverged else None,
        "epochs_run": epochs_run,
        "updates": epochs_run * spec.updates_per_epoch,
        "examples_seen": epochs_run * spec.problem.n_train,
        "first_epoch_s": records[0].elapsed_s if records else math.nan,
    }


def with_node(results: Sequence[TrialResult], node_id: str) -> list[TrialResult]:
    return [replace(r, node_id=node_id) for r in results]
