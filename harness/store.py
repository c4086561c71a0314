"""Results on disk: one Parquet part file per flush, written atomically by the driver only.

Layout of a results folder::

    trials/part-<run_id>-<seq>.parquet   one row per trial   (pd.read_parquet(DIR / "trials"))
    epochs/part-<run_id>-<seq>.parquet   one row per epoch   (pd.read_parquet(DIR / "epochs"))
    points/part-<run_id>-<seq>.parquet   one row per evaluation point of the update clock
    probes/part-<run_id>-<seq>.parquet   timing probes: seconds per update by batch size
    runs/<run_id>.json                   versions, host, git commit, grid hash of each run
    set-aside/                           files the harness could not read, moved out of the way

A flush writes the points and epochs parts first and the trials part last, so a trial row on
disk means its curves are on disk too; a curve part without its trials part is an interrupted
flush.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import operator
import os
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from harness.results import TrialResult
from harness.schema import (EPOCH_SCHEMA, POINT_SCHEMA, PROBE_SCHEMA, READABLE_VERSIONS, SCHEMA_VERSION,
                            TRIAL_SCHEMA, added_columns)

TRIALS, EPOCHS, POINTS, PROBES, RUNS, SET_ASIDE = "trials", "epochs", "points", "probes", "runs", "set-aside"
CURVES = (POINTS, EPOCHS)  # per-trial tables written before (and only with) their trials part
_VERSION_KEY = b"harness.schema_version"
_RUN_KEY = b"harness.run_id"
SCHEMAS = {TRIALS: TRIAL_SCHEMA, EPOCHS: EPOCH_SCHEMA, POINTS: POINT_SCHEMA, PROBES: PROBE_SCHEMA}


class StoreError(RuntimeError):
    """A results folder cannot be used as asked; the message is one line for the user."""


class SetAsideWarning(UserWarning):
    """A file was (or, in a dry run, would be) moved to set-aside/; the message names it and why."""


class SchemaVersionError(StoreError):
    """Results written by another schema version: never set aside or mixed in, always refused."""


def write_atomic(table: pa.Table, path: Path) -> None:
    # Readers and resumed runs must never see half a file: write beside the target (a dot
    # name, which pyarrow's dataset discovery skips), flush to disk, then rename in one step.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """The text twin of ``write_atomic``: written beside the target, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def with_version(schema: pa.Schema, run_id: str, replaces: Sequence[str] = ()) -> pa.Schema:
    meta = {_VERSION_KEY: str(SCHEMA_VERSION).encode(), _RUN_KEY: run_id.encode()}
    if replaces:
        meta[_REPLACES_KEY] = json.dumps(sorted(replaces)).encode()
    return schema.with_metadata(meta)


def trials_table(results: Sequence[TrialResult], run_id: str) -> pa.Table:
    """Rows built by walking the schema's column list, so the two cannot drift apart."""
    rows = []
    for result in results:
        # TrialResult.epochs and .points hold the curves; the 'epochs' column is the config value.
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("spec", "epochs", "points")}
        values.update(result.spec.config_values(), trial_id=result.trial_id, run_id=run_id)
        rows.append({name: values[name] for name in TRIAL_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=with_version(TRIAL_SCHEMA, run_id))


def curve_table(results: Sequence[TrialResult], run_id: str, kind: str) -> pa.Table:
    """The epochs or points of ``results`` (TrialResult.epochs / .points), one row per record.
    Built a column at a time: a dict per row would hold several times the records' own memory
    while a part of hundreds of thousands of rows is written."""
    schema = SCHEMAS[kind]
    records = [e for r in results for e in getattr(r, kind)]
    columns = {"trial_id": [tid for r in results for tid in [r.trial_id] * len(getattr(r, kind))]}
    for name in schema.names[1:]:  # a C-level getter per column (full.yaml's 136,000 rows: 0.13 s, not 0.42)
        columns[name] = list(map(operator.attrgetter(name), records))
    return pa.Table.from_pydict(columns, schema=with_version(schema, run_id))


def result_tables(results: Sequence[TrialResult], run_id: str) -> dict[str, pa.Table]:
    """The rows ``results`` add to each table (epochs, points, trials), for ``write_tables``."""
    return {**{kind: curve_table(results, run_id, kind) for kind in CURVES}, TRIALS: trials_table(results, run_id)}


def write_tables(results_dir: Path, tables: Sequence[dict[str, pa.Table]], run_id: str, seq: int) -> None:
    """Flush finished trials, given as ``result_tables``: points and epochs parts, then the trials
    part (the commit point)."""
    if not tables:
        return
    name = f"part-{run_id}-{seq:06d}.parquet"
    for kind in (*CURVES, TRIALS):
        (results_dir / kind).mkdir(parents=True, exist_ok=True)
        write_atomic(pa.concat_tables([t[kind] for t in tables]), results_dir / kind / name)


def write_results(results_dir: Path, results: Sequence[TrialResult], run_id: str, seq: int) -> None:
    """Flush finished trials: points and epochs parts, then the trials part (the commit point)."""
    if results:
        write_tables(results_dir, [result_tables(results, run_id)], run_id, seq)


def write_probes(results_dir: Path, rows: Sequence[dict], run_id: str) -> None:
    """Timing probes (harness.probe) as one part of their own."""
    if not rows:
        return
    (results_dir / PROBES).mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**row, "run_id": run_id} for row in rows],
                                 schema=with_version(PROBE_SCHEMA, run_id))
    write_atomic(table, results_dir / PROBES / f"part-{run_id}.parquet")


def _parts(results_dir: Path, kind: str) -> list[Path]:
    folder = results_dir / kind
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_")))


COMPACTED = "part-compact-"  # prefix of a part that replaces others (harness.compaction)
_REPLACES_KEY = b"harness.replaces"


def replaced_parts(results_dir: Path) -> set[str]:
    """Names of the parts that compacted trials parts replace: readers skip them (in every kind:
    a flush's parts share one name), and the next compaction or resume deletes them."""
    replaced: set[str] = set()
    for path in _parts(results_dir, TRIALS):
        if path.name.startswith(COMPACTED):
            try:
                replaced.update(json.loads((pq.read_schema(path).metadata or {}).get(_REPLACES_KEY, b"[]")))
            except Exception:  # noqa: BLE001 - an unreadable part is set aside by read_table
                continue
    return replaced


def live_parts(results_dir: Path, kind: str) -> list[Path]:
    """The parts a reader reads: not replaced by a compacted part, and for the curve tables only
    those whose trials part has landed (the trials part is every flush's commit point), so that
    each trial is read exactly once at every moment of a flush or a compaction."""
    replaced = replaced_parts(results_dir) if kind != PROBES else set()
    parts = [p for p in _parts(results_dir, kind) if p.name not in replaced]
    if kind in CURVES:
        committed = {p.name for p in _parts(results_dir, TRIALS)}
        parts = [p for p in parts if p.name in committed]
    return parts


def check_part(path: Path, kind: str) -> None:
    """Raise StoreError (one line) unless ``path`` is a readable part of our current schema."""
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise StoreError(f"{path}: not a readable Parquet file ({type(exc).__name__}); "
                         f"move it out of {path.parent} or delete it") from None
    meta = schema.metadata or {}
    if _VERSION_KEY not in meta:
        raise StoreError(f"{path}: not written by the harness (no schema version); move it out of {path.parent}")
    version = meta[_VERSION_KEY].decode()
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise SchemaVersionError(
            f"{path}: results schema version {version}, this harness reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the harness version that wrote it, or start anew "
            f"with --fresh (the old folder is kept)")
    added = added_columns(version) if kind == TRIALS else {}
    missing = [n for n in SCHEMAS[kind].names if n not in schema.names and n not in added]
    if missing:
        raise StoreError(f"{path}: missing columns {', '.join(missing)}; not a harness {kind} file")


def _upgrade(table: pa.Table, kind: str, version: str) -> pa.Table:
    """An older trials part with the columns added since, at the values it ran with."""
    if kind != TRIALS:
        return table
    for name, value in added_columns(version).items():
        if name not in table.column_names:
            kind_ = TRIAL_SCHEMA.field(name).type
            table = table.append_column(name, pa.array([value] * table.num_rows, type=kind_))
    return table


def set_aside(results_dir: Path, path: Path, reason: str) -> Path:
    """Move an unreadable file out of the way (never delete it) and warn."""
    target_dir = results_dir / SET_ASIDE
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.parent.name}-{path.name}"
    n = 1
    while target.exists():
        target = target_dir / f"{path.parent.name}-{n}-{path.name}"
        n += 1
    os.replace(path, target)
    warnings.warn(SetAsideWarning(f"{reason}; moved it to {target}"), stacklevel=2)
    return target


def read_part(path: Path, kind: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One part, checked (StoreError if it is not ours) and upgraded to the current columns."""
    check_part(path, kind)
    schema = pq.read_schema(path)
    wanted = [c for c in columns if c in schema.names] if columns else None
    return _upgrade(pq.read_table(path, columns=wanted), kind, schema.metadata[_VERSION_KEY].decode())


def _handle_bad(results_dir: Path, path: Path, reason: str, on_bad: str) -> None:
    if on_bad == "report":  # a dry run: read-only, but say what a run would do
        warnings.warn(SetAsideWarning(f"{reason}; a run would move it to {results_dir / SET_ASIDE}"), stacklevel=3)
    else:
        set_aside(results_dir, path, reason)


def read_table(results_dir: Path, kind: str, columns: Sequence[str] | None = None,
               on_bad: str = "raise") -> pa.Table:
    """All parts of ``kind`` as one table. ``on_bad``: 'raise' a StoreError, 'set-aside' (move the
    file there, with a SetAsideWarning) or 'report' (leave it, warn what a run would do)."""
    tables = []
    for path in live_parts(results_dir, kind):
        try:
            tables.append(read_part(path, kind, columns))
        except StoreError as exc:
            if on_bad == "raise" or isinstance(exc, SchemaVersionError):
                raise
            _handle_bad(results_dir, path, str(exc), on_bad)
        except Exception as exc:  # noqa: BLE001 - a file that lies about itself past the footer
            if on_bad == "raise":
                raise StoreError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
            _handle_bad(results_dir, path, f"{path}: cannot be read", on_bad)
    schema = SCHEMAS[kind]
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    if not tables:
        return pa.Table.from_batches([], schema=schema)  # empty_table() would import pandas: 0.2 s at every start
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])


def read_trials(results_dir: Path | str):
    """One pandas row per trial; refuses (StoreError) a folder holding files it cannot read."""
    return read_table(Path(results_dir), TRIALS).to_pandas()


def read_epochs(results_dir: Path | str):
    return read_table(Path(results_dir), EPOCHS).to_pandas()


def read_points(results_dir: Path | str):
    """The update clock's points (empty for results written before it existed)."""
    return read_table(Path(results_dir), POINTS).to_pandas()


def read_probes(results_dir: Path | str):
    return read_table(Path(results_dir), PROBES).to_pandas()


def drop_orphan_epochs(results_dir: Path) -> list[Path]:
    """Remove what a kill left behind: epochs and points parts whose trials part never landed
    (a flush or compaction cut short; their trials have no row, or are still read from the
    parts they were to replace), and parts a finished compaction replaced but had not yet
    deleted. Readers already skip both, so removing them changes nothing anyone reads."""
    committed = {p.name for p in _parts(results_dir, TRIALS)}
    replaced = replaced_parts(results_dir)
    stale = [p for kind in CURVES for p in _parts(results_dir, kind) if p.name not in committed]
    stale += [p for kind in (TRIALS, *CURVES) for p in _parts(results_dir, kind) if p.name in replaced]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def finished_trials(results_dir: Path, move: bool = True) -> dict[str, str]:
    """trial_id -> status for every trial already on disk; unreadable parts are set aside (with
    a SetAsideWarning each), or with ``move`` False left where they are and only reported."""
    table = read_table(results_dir, TRIALS, columns=["trial_id", "status"], on_bad="set-aside" if move else "report")
    return dict(zip(table.column("trial_id").to_pylist(), table.column("status").to_pylist()))


def remove_trials(results_dir: Path, trial_ids: set[str]) -> int:
    """Take rows of ``trial_ids`` (failed trials about to be retried) out of their part files,
    keeping the removed rows under set-aside/ so nothing is lost. Returns rows removed."""
    import pyarrow.compute as pc

    removed = 0
    ids = pa.array(sorted(trial_ids), type=pa.string())
    for kind in (TRIALS, *CURVES):
        for path in live_parts(results_dir, kind):
            table = pq.read_table(path)
            hit = pc.is_in(table.column("trial_id"), value_set=ids)
            n_hit = pc.sum(hit).as_py() or 0
            if not n_hit:
                continue
            keep = table.filter(pc.invert(hit))
            folder = results_dir / SET_ASIDE
            folder.mkdir(parents=True, exist_ok=True)
            kept = folder / f"retried-{kind}-{path.name}"
            write_atomic(table.filter(hit), kept)
            warnings.warn(SetAsideWarning(f"{path}: {n_hit} failed row(s) about to be retried; moved them to {kept}"),
                          stacklevel=2)
            if keep.num_rows:
                write_atomic(keep.replace_schema_metadata(table.schema.metadata), path)
            else:
                path.unlink()
            if kind == TRIALS:
                removed += n_hit
    return removed


def write_run_metadata(results_dir: Path, meta: dict) -> Path:
    folder = results_dir / RUNS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{meta['run_id']}.json"
    write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return path


def read_runs(results_dir: Path | str) -> list[dict]:
    folder = Path(results_dir) / RUNS
    runs = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            warnings.warn(f"{path}: unreadable run metadata, ignored", stacklevel=2)
    return runs


def is_results_dir(path: Path) -> bool:
    return (path / TRIALS).is_dir() or (path / RUNS).is_dir()


@contextlib.contextmanager
def locked(results_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder for the whole run; a second run refuses at once.
    The kernel drops the lock when the process dies, so a killed run never leaves it stuck."""
    results_dir.mkdir(parents=True, exist_ok=True)
    handle = open(results_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StoreError(f"{results_dir}: in use by {holder}; wait for it to finish, "
                             f"or pass another --results folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        yield
    finally:
        handle.close()


def move_aside(results_dir: Path) -> Path | None:
    """For --fresh: rename an existing results folder to <name>.<UTC time>; never delete it."""
    if not results_dir.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = results_dir.with_name(f"{results_dir.name}.{stamp}")
    n = 1
    while target.exists():
        target = results_dir.with_name(f"{results_dir.name}.{stamp}-{n}")
        n += 1
    shutil.move(str(results_dir), str(target))
    return target
