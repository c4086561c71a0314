"""Plans: which trials a grid asks for and which of them are still to run.

The driver plans a run from the grid file it is given; the report rebuilds the plan of every
past run from the grid text stored in that run's metadata, through the same functions, so the
two can never disagree about what a grid contains.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from harness.config import ConfigError, GridConfig, parse_grid, with_engine
from harness.grid import TrialSpec, expand_grid


@dataclass(frozen=True)
class Plan:
    specs: tuple[TrialSpec, ...]      # the whole grid
    todo: tuple[TrialSpec, ...]       # what this run will train
    done: dict[str, str]              # trial_id -> status already on disk for this grid
    retry: frozenset[str]             # failed trials that --retry-failed will run again

    @property
    def kept_failed(self) -> int:
        return sum(1 for s in self.specs if self.done.get(s.trial_id) == "failed") - len(self.retry)


def plan_run(grid: GridConfig, on_disk: dict[str, str], retry_failed: bool) -> Plan:
    """Which trials still need to run: finished ones (ok/diverged) never, failed ones on request."""
    specs = expand_grid(grid)
    failed = {s.trial_id for s in specs if on_disk.get(s.trial_id) == "failed"}
    retry = failed if retry_failed else set()
    todo = tuple(s for s in specs if s.trial_id not in on_disk or s.trial_id in retry)
    done = {s.trial_id: on_disk[s.trial_id] for s in specs if s.trial_id in on_disk}
    return Plan(specs=specs, todo=todo, done=done, retry=frozenset(retry))


def grid_of_run(run: dict, roots: Sequence[Path] = ()) -> GridConfig:
    """The grid a run trained, as the driver saw it: the grid text stored in its metadata with
    the run's --engine override, or (runs written before the text was stored) its grid file
    found under one of ``roots`` with the recorded SHA-256. ConfigError (one line) otherwise."""
    where = f"grid of run {run.get('run_id')}"
    text = run.get("grid_yaml")
    if not text:
        path, sha = run.get("grid_path"), run.get("grid_sha256")
        found = next((p for p in (Path(root) / path for root in roots)
                      if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha), None) if path else None
        if found is None:
            raise ConfigError(f"{where} not found unchanged ({path or 'no grid_path'})")
        text = found.read_text(encoding="utf-8")
    try:
        grid = parse_grid(yaml.safe_load(text), f"run {run.get('run_id')}")
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where} unreadable: {exc}") from None
    return with_engine(grid, run.get("engine_override"))


def planned_specs(run: dict, roots: Sequence[Path] = ()) -> tuple[TrialSpec, ...]:
    """Every trial of the grid a run trained (finished or not)."""
    return expand_grid(grid_of_run(run, roots))
