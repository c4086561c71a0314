"""Pure expansion of a grid into trial specs: no I/O, no clock, no randomness."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable

from harness.config import GridConfig, ModelConfig, ProblemConfig, TrainConfig, identity
from harness.readers import normalised

# Beyond this many trials a run needs --yes: a typo like an extra zero in a seed list should
# not silently book the machine for a week. grids/full.yaml has 350.
LARGE_GRID_TRIALS = 10_000


@dataclass(frozen=True)
class TrialSpec:
    """Everything one training run depends on; its hash is the trial's identity."""

    problem: ProblemConfig
    model: ModelConfig
    train: TrainConfig
    batch_size: int
    learning_rate: float
    seed: int

    @cached_property
    def trial_id(self) -> str:
        # sort_keys + float repr: the same config always gives the same id, and 1e-5 != 4e-5.
        canonical = {"problem": identity(self.problem), "model": identity(self.model),
                     "train": identity(self.train), "batch_size": self.batch_size,
                     "learning_rate": self.learning_rate, "seed": self.seed}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config_values(self) -> dict[str, Any]:
        """Every config value as one flat mapping (names are unique across sections)."""
        flat: dict[str, Any] = {}
        for section in (self.problem, self.model, self.train):
            flat.update(dataclasses.asdict(section))
        flat.update(batch_size=self.batch_size, learning_rate=self.learning_rate, seed=self.seed)
        return flat

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.problem.n_train / self.batch_size)

    @property
    def planned_updates(self) -> int:
        return self.train.epochs * self.updates_per_epoch


def _block_specs(grid: GridConfig, block: tuple[tuple[str, tuple[Any, ...]], ...]) -> Iterable[TrialSpec]:
    axes = [axis for axis, _ in block]  # already sorted by load_grid
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    # One model and one train config per distinct setting, shared by its trials: a grid of
    # 100,000 trials over the three axes has one of each, not 100,000 (and their ids are cached).
    models: dict[tuple, ModelConfig] = {}
    trains: dict[tuple, TrainConfig] = {}
    for combo in itertools.product(*(values for _, values in block)):
        point = dict(zip(axes, combo))
        model_set = tuple((k, v) for k, v in point.items() if k in model_keys)
        train_set = tuple((k, v) for k, v in point.items() if k in train_keys)
        if model_set not in models:
            models[model_set] = dataclasses.replace(grid.model, **dict(model_set))
        if train_set not in trains:
            trains[train_set] = normalised(dataclasses.replace(grid.train, **dict(train_set)))
        yield TrialSpec(
            problem=grid.problem,
            model=models[model_set],
            train=trains[train_set],
            batch_size=point["batch_size"],
            learning_rate=point["learning_rate"],
            seed=point["seed"],
        )


def expand_grid(grid: GridConfig) -> tuple[TrialSpec, ...]:
    """All trials of a grid in a deterministic order, each once (blocks may overlap)."""
    seen: dict[str, TrialSpec] = {}
    for block in grid.sweep:
        for spec in _block_specs(grid, block):
            seen.setdefault(spec.trial_id, spec)
    return tuple(seen.values())


def count_trials(grid: GridConfig) -> int:
    """An upper bound on the trial count without building the specs (overlaps counted twice)."""
    return sum(math.prod(len(values) for _, values in block) for block in grid.sweep)
