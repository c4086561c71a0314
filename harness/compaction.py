"""Compaction: many small part files merged into one per table, atomically for every reader.

A run flushes a part per table every few seconds, so a long run leaves many files; compaction
(at the end of a run, and by `harness compact DIR`) streams every live part of a table into one
new part, one file at a time (memory grows with a part, not with the folder). The new trials
part is written last and lists, in its metadata, the parts it replaces: the moment it is renamed
into place, readers (store.live_parts) read it instead of them, so no trial is ever on disk
twice or not at all. Only then are the replaced files deleted; a kill before that leaves files
that readers skip and the next run or compaction removes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from harness import store


@dataclass(frozen=True)
class Compacted:
    files_before: int  # part files of the trials, epochs and points tables
    files_after: int
    trials: int


def _part_files(results_dir: Path) -> int:
    return sum(len(store.live_parts(results_dir, kind)) for kind in (store.TRIALS, *store.CURVES))


def compact(results_dir: Path, min_parts: int = 2) -> Compacted:
    """Merge each table's live parts into one (when there are at least ``min_parts`` trials
    parts), then delete what was replaced. The caller holds the folder's lock."""
    store.drop_orphan_epochs(results_dir)  # leftovers of an earlier kill, skipped by readers anyway
    before = _part_files(results_dir)
    trials_parts = store.live_parts(results_dir, store.TRIALS)
    if len(trials_parts) < min_parts:
        return Compacted(before, before, sum(pq.read_metadata(p).num_rows for p in trials_parts))
    now = datetime.now(timezone.utc)
    salt = hashlib.sha256(f"{os.getpid()}:{now.isoformat()}".encode()).hexdigest()[:6]
    cid = f"compact-{now:%Y%m%dT%H%M%S%fZ}-{salt}"
    name, names = f"part-{cid}.parquet", [p.name for p in trials_parts]
    rows = 0
    for kind in (*store.CURVES, store.TRIALS):  # trials last: writing it is the commit point
        rows = _merge(results_dir, kind, store.live_parts(results_dir, kind), cid, names, name)
    store.drop_orphan_epochs(results_dir)  # now the replaced parts: no reader reads them any more
    return Compacted(before, _part_files(results_dir), rows)


def _merge(results_dir: Path, kind: str, parts: list[Path], cid: str, names: list[str], name: str) -> int:
    schema = store.with_version(store.SCHEMAS[kind], cid, replaces=names if kind == store.TRIALS else ())
    target = results_dir / kind / name
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    rows = 0
    try:
        with open(tmp, "wb") as f:
            with pq.ParquetWriter(f, schema) as writer:
                for path in parts:
                    table = store.read_part(path, kind).select(schema.names).cast(schema)
                    writer.write_table(table)
                    rows += table.num_rows
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
