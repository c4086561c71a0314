"""The one declaration of result columns, their types and the format version.

Row builders, readers, the report and the README's column table all start from here. Column
names are a contract with users' notebooks: add columns freely, rename or drop only with a
SCHEMA_VERSION bump.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from harness.config import SECTIONS

SCHEMA_VERSION = 2
# Version 1 files lack what version 2 added (the settings marked id-neutral in harness.config,
# the validation and blow-up columns), and any file lacks settings added after it was written;
# they are read with those filled in (store.read_table, schema.added_columns): such a trial ran
# with each added setting at its default, and had no validation split.
READABLE_VERSIONS = (1, 2)

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}

# Config columns come straight from the config dataclasses, so a new setting is a new column.
CONFIG_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = tuple(
    (f.name, _ARROW[f.type], f"{section} setting") for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
) + (
    ("batch_size", pa.int64(), "examples per update"),
    ("learning_rate", pa.float64(), "the step size as the grid gives it, before batch-size scaling and schedule"),
    ("seed", pa.int64(), "fixes initial weights and batch order"),
)

# (name, type, meaning with unit) for every per-trial column that is not a config value.
RESULT_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("status", pa.string(), "ok | diverged (loss became NaN/inf, stopped early) | failed (exception)"),
    ("error", pa.string(), "exception type and message for failed trials, what blew up and when for diverged ones"),
    ("diverged_at_update", pa.int64(), "first evaluation point (update count) at which the loss was non-finite or "
                                       "above divergence_factor x its initial value; null unless diverged"),
    ("train_accuracy", pa.float64(), "final accuracy on the training rows (evaluated after training); NaN unless ok"),
    ("test_accuracy", pa.float64(), "final accuracy on the test rows; NaN unless ok"),
    ("train_loss", pa.float64(), "final cross-entropy on the training rows; NaN unless ok"),
    ("test_loss", pa.float64(), "final cross-entropy on the test rows; NaN unless ok"),
    ("val_accuracy", pa.float64(), "final accuracy on the validation rows; NaN unless ok and n_val > 0"),
    ("val_loss", pa.float64(), "final cross-entropy on the validation rows; NaN unless ok and n_val > 0"),
    ("epochs_run", pa.int64(), "epochs actually trained (fewer than epochs when diverged)"),
    ("updates", pa.int64(), "optimizer steps taken: epochs_run x ceil(n_train / batch_size)"),
    ("examples_seen", pa.int64(), "training examples processed: epochs_run x n_train"),
    ("wall_clock_s", pa.float64(), "seconds of training (all epochs incl. per-epoch evaluation); for fused "
                                   "trials the group's time divided by group_size"),
    ("first_epoch_s", pa.float64(), "seconds of the first epoch, which includes tracing/compilation"),
    ("group_size", pa.int64(), "models trained together in one computation (1 = an isolated measurement)"),
    ("group_wall_clock_s", pa.float64(), "seconds of training of the whole group (= wall_clock_s when group_size is 1)"),
    ("engine_version", pa.string(), "what trained it, e.g. 'keras 3.15.1 / tensorflow 2.21.0' or 'numpy 2.4.6'"),
    ("node_id", pa.string(), "Ray node id the trial ran on ('local' for the serial backend)"),
    ("hostname", pa.string(), "host the trial ran on"),
    ("started_at", pa.timestamp("us", tz="UTC"), "UTC start of the trial"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "UTC end of the trial"),
)

TRIAL_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("trial_id", pa.string(), "hash of the trial's full config; stable across runs"),
    ("run_id", pa.string(), "the run that produced this row; details in runs/<run_id>.json"),
) + CONFIG_COLUMNS + RESULT_COLUMNS

EPOCH_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("trial_id", pa.string(), "the trial this epoch belongs to"),
    ("epoch", pa.int64(), "1-based epoch number"),
    ("loss", pa.float64(), "mean training loss over the epoch's batches (Keras' running average)"),
    ("accuracy", pa.float64(), "training accuracy over the epoch's batches (running, as Keras reports it)"),
    ("val_loss", pa.float64(), "test-set loss after the epoch"),
    ("val_accuracy", pa.float64(), "test-set accuracy after the epoch"),
    ("elapsed_s", pa.float64(), "seconds since the trial's training started, at the end of this epoch"),
    ("updates", pa.int64(), "optimizer steps taken so far"),
)


POINT_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("trial_id", pa.string(), "the trial this point belongs to"),
    ("updates", pa.int64(), "optimizer steps taken (0 = the untrained model); the update clock"),
    ("examples_seen", pa.int64(), "training examples processed so far"),
    ("elapsed_s", pa.float64(), "seconds since the trial's training started (a fused group's time)"),
    ("train_loss", pa.float64(), "cross-entropy on all training rows at this point"),
    ("train_accuracy", pa.float64(), "accuracy on all training rows at this point"),
    ("val_loss", pa.float64(), "cross-entropy on the validation rows (NaN without n_val)"),
    ("val_accuracy", pa.float64(), "accuracy on the validation rows (NaN without n_val)"),
    ("test_loss", pa.float64(), "cross-entropy on the test rows"),
    ("test_accuracy", pa.float64(), "accuracy on the test rows"),
    ("grad_sq", pa.float64(), "|G|^2: squared norm of the mean gradient over the training rows"),
    ("trace_sigma", pa.float64(), "tr(Sigma): total variance of the per-example gradients (exact, n-1)"),
    ("b_simple", pa.float64(), "simple gradient noise scale tr(Sigma)/|G|^2 (McCandlish et al. 2018)"),
)

PROBE_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("probe_id", pa.string(), "hash of what was timed (problem, model, optimizer, batch size)"),
    ("run_id", pa.string(), "the run that measured it"),
    ("batch_size", pa.int64(), "examples per update"),
    ("seconds_per_update", pa.float64(), "median over repeats of the steady seconds per update of one Keras "
                                         "model alone on one thread (after warm-up)"),
    ("seconds_per_update_min", pa.float64(), "fastest repeat"),
    ("seconds_per_update_max", pa.float64(), "slowest repeat"),
    ("repeats", pa.int64(), "timed repeats"),
    ("updates_per_repeat", pa.int64(), "updates in each timed repeat"),
    ("engine_version", pa.string(), "what was timed"),
    ("hostname", pa.string(), "host it was measured on"),
    ("measured_at", pa.timestamp("us", tz="UTC"), "UTC time of the measurement"),
)


def added_columns(version: str = str(SCHEMA_VERSION)) -> dict[str, Any]:
    """Trials columns a file of ``version`` may lack, as the values its trials ran with: every
    setting added after the first release (id-neutral, so its default is what an older trial
    used) and the result columns of version 2. A version 1 trial was called diverged only on a
    non-finite loss: a divergence_factor of infinity, which the report keeps apart as its own
    study rather than mixing it with trials judged by the blow-up rule."""
    added = {f.name: f.default for cls in SECTIONS.values() for f in dataclasses.fields(cls)
             if f.metadata.get("id_neutral")}
    if version == "1":
        added["divergence_factor"] = float("inf")
    return {**added, "diverged_at_update": None, "val_accuracy": float("nan"), "val_loss": float("nan")}


def _schema(columns: tuple[tuple[str, pa.DataType, str], ...]) -> pa.Schema:
    return pa.schema([pa.field(name, kind, metadata={"description": doc}) for name, kind, doc in columns])


TRIAL_SCHEMA = _schema(TRIAL_COLUMNS)
EPOCH_SCHEMA = _schema(EPOCH_COLUMNS)
POINT_SCHEMA = _schema(POINT_COLUMNS)
PROBE_SCHEMA = _schema(PROBE_COLUMNS)
STATUSES = ("ok", "diverged", "failed")
FINISHED = ("ok", "diverged")  # what a rerun skips; failed trials run again only with --retry-failed


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def new_run_id(now: datetime) -> str:
    # Sortable by time, unique across hosts and processes started in the same second.
    salt = hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}:{now.isoformat()}".encode()).hexdigest()[:6]
    return f"{now:%Y%m%dT%H%M%SZ}-{salt}"


def run_metadata(run_id: str, started_at: datetime, grid_path: str, grid_sha256: str,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A flat, JSON-ready record of where and with what a run happened; written once per run."""
    tf_version = _version("tensorflow-cpu") or _version("tensorflow")
    meta: dict[str, Any] = {
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "harness_version": _version("harness"),
        "git_commit": _git_commit(),
        "started_at": started_at.astimezone(timezone.utc).isoformat(),
        "grid_path": grid_path,
        "grid_sha256": grid_sha256,
        "host": socket.gethostname(),
        "user": getpass.getuser() if hasattr(os, "getuid") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "tensorflow": tf_version,
        "keras": _version("keras"),
        "ray": _version("ray"),
        "pyarrow": _version("pyarrow"),
        "pandas": _version("pandas"),
    }
    meta.update(extra or {})
    return meta


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
