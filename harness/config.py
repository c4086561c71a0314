"""Grid files: YAML in, frozen dataclasses out, every value checked before any trial starts.

The dataclass defaults are the vocabulary (as in nanoGPT's configurator): a key without a
default here is an error that lists the keys that do exist.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from harness import datasets, readers


class ConfigError(ValueError):
    """A grid file or option is invalid; the message is one line meant for the user."""


DATASETS = tuple(datasets.BUILT_IN)  # plus installed entry points: harness.datasets.names()
STANDARDIZE = ("none", "zscore")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITIALIZERS = ("he_uniform", "he_normal", "glorot_uniform", "glorot_normal", "lecun_uniform", "lecun_normal")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULES = ("constant", "step", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
ENGINES = ("keras", "fused")
EVAL_SCHEDULES = ("epoch", "geometric")

# Settings added after the first results were written. At its default such a setting is left
# out of the trial id, so results written before it existed keep their ids and still resume.
ID_NEUTRAL = {"id_neutral": True}


def neutral(default: Any) -> Any:
    return field(default=default, metadata=ID_NEUTRAL)


@dataclass(frozen=True)
class ProblemConfig:
    """The data set; it depends only on these values, never on a trial's seed.

    Which keys a data set reads is declared in harness.datasets (BUILT_IN); a grid that sets a
    key its data set ignores is refused, so a setting never looks as if it mattered when it did
    not. Keys added for the other generators default to scikit-learn's own defaults."""

    dataset: str = "blobs"  # harness.datasets.names(): built-ins and installed entry points
    n_samples: int = 1000  # blobs, moons, circles, classification
    centers: int = 3  # blobs
    n_features: int = 2  # blobs, classification
    cluster_std: float = 2.0  # blobs
    random_state: int = 2  # blobs, moons, circles, classification; digits: the one shuffle of its rows
    n_train: int = 500  # the first n_train rows train,
    n_val: int = neutral(0)  # the next n_val validate (choose settings on), the rest test
    standardize: str = neutral("none")  # zscore: features scaled by the training rows' mean and std
    noise: float = neutral(0.0)  # moons, circles: std of the Gaussian noise added to each point
    factor: float = neutral(0.8)  # circles: inner circle's radius over the outer's
    n_informative: int = neutral(2)  # classification: features that carry the classes
    n_classes: int = neutral(2)  # classification
    class_sep: float = neutral(1.0)  # classification: hypercube side; larger is easier
    # file: CSV or Parquet, relative to the grid file (stored absolute). Not in the trial id:
    # file_sha256 is, so the same content moved elsewhere keeps its trials' ids.
    path: str = field(default="", metadata={**ID_NEUTRAL, "not_in_id": True})
    label_column: str = neutral("label")  # file: the class column; every other column is a feature
    # file: filled by the loader (or pinned by the grid). In the trial id, so results of one
    # file's content never mix with another's; a worker refuses a file that no longer matches.
    file_sha256: str = neutral("")


@dataclass(frozen=True)
class ModelConfig:
    hidden_units: int = 50  # width of every hidden layer (a list of equal widths sets depth too)
    activation: str = "relu"
    kernel_initializer: str = "he_uniform"
    depth: int = neutral(1)  # hidden layers, each Dense(hidden_units, activation, kernel_initializer)
    l2: float = neutral(0.0)  # L2 penalty l2 * sum(W^2) on every kernel (not biases), as Keras' L2 regularizer


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"
    momentum: float = 0.9
    epochs: int = 200
    engine: str = "keras"
    eval_schedule: str = neutral("epoch")  # epoch ends only, or also geometric points (harness.clock)
    eval_points_per_octave: int = neutral(4)
    # A trial whose training loss exceeds this factor of its initial loss at an evaluation point
    # has blown up: it is `diverged`, even if the loss stays finite. Measured on the default
    # problem (momentum 0.9): early spikes of up to ~36x recover (bs 500, lr 0.32 ends at 0.82
    # test accuracy), while runs that end collapsed at chance peak at 1e2 to 1e33; 10x would
    # call recovering runs diverged.
    divergence_factor: float = neutral(100.0)
    # Optimizers as Keras 3 defines them; each reads only its own keys (harness.readers).
    nesterov: bool = neutral(False)  # sgd
    beta_1: float = neutral(0.9)  # adam
    beta_2: float = neutral(0.999)  # adam
    epsilon: float = neutral(1e-7)  # adam, rmsprop
    rho: float = neutral(0.9)  # rmsprop
    # The learning rate of update t (harness.schedule): learning_rate x batch-size scaling x
    # warm-up x decay.
    schedule: str = neutral("constant")  # constant | step | cosine (to 0 at the last update)
    warmup_updates: int = neutral(0)  # linear warm-up over this many updates ...
    warmup_epochs: float = neutral(0.0)  # ... or over this many epochs (not both)
    decay_epochs: float = neutral(50.0)  # step: multiply the rate by decay_factor every decay_epochs
    decay_factor: float = neutral(0.1)  # step
    learning_rate_scaling: str = neutral("none")  # none | linear | sqrt in batch_size / base_batch_size
    base_batch_size: int = neutral(32)  # the batch size at which learning_rate is the rate as given


def _kind(f: dataclasses.Field) -> type:
    # Annotations are strings under `from __future__ import annotations`; ours are plain scalars.
    return {"int": int, "float": float, "str": str, "bool": bool}[f.type]


def identity(section: Any) -> dict[str, Any]:
    """A config section as its trial id sees it: every value, but id-neutral ones at their
    default and where a file lives (its content's hash is in)."""
    try:
        return dict(_identity(section))
    except TypeError:  # a section built in code with an unhashable value: read it as it is
        return dict(_identity.__wrapped__(section))


@lru_cache(maxsize=1024)
def _identity(section: Any) -> tuple[tuple[str, Any], ...]:
    # Sections are frozen and shared by many trials (harness.grid): each is read once.
    return tuple((f.name, getattr(section, f.name)) for f in fields(section) if not f.metadata.get("not_in_id")
                 and not (f.metadata.get("id_neutral") and getattr(section, f.name) == f.default))


# Axes every sweep must list: they are what a batch-size study is about.
REQUIRED_AXES = ("batch_size", "learning_rate", "seed")
SECTIONS: dict[str, type] = {"problem": ProblemConfig, "model": ModelConfig, "train": TrainConfig}
TOP_LEVEL_KEYS = ("name", *SECTIONS, "sweep", "timing_probe")
AXIS_TYPES: dict[str, type] = {"batch_size": int, "learning_rate": float, "seed": int}
# Any scalar of model/train may be swept as well as the three axes.
SWEEPABLE: dict[str, tuple[str | None, type]] = {
    **{k: (None, t) for k, t in AXIS_TYPES.items()},
    **{f.name: (section, _kind(f)) for section in ("model", "train") for f in fields(SECTIONS[section])},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "standardize": STANDARDIZE, "activation": ACTIVATIONS, "kernel_initializer": INITIALIZERS,
    "optimizer": OPTIMIZERS, "engine": ENGINES, "eval_schedule": EVAL_SCHEDULES, "schedule": SCHEDULES,
    "learning_rate_scaling": LR_SCALINGS,
}


@dataclass(frozen=True)
class GridConfig:
    name: str
    problem: ProblemConfig
    model: ModelConfig
    train: TrainConfig
    # Each block is a tuple of (axis, values) pairs sorted by axis; the trials are the union of
    # the Cartesian products of the blocks.
    sweep: tuple[tuple[tuple[str, tuple[Any, ...]], ...], ...]
    # Measure, per batch size, the steady seconds per update of one Keras model alone on one
    # thread (harness.probe): the clock that seconds-to-target figures are drawn on.
    timing_probe: bool = False
    path: str = ""
    sha256: str = ""
    overrides: tuple[str, ...] = ()  # KEY=VALUE items from the command line, applied to the file
    source: str = ""  # the grid as run (file plus overrides, data file resolved), as YAML


def _suggest(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _reject_unknown(where: str, mapping: Mapping[str, Any], valid: tuple[str, ...] | list[str], under: str) -> None:
    for key in mapping:
        if key not in valid:
            place = f" under '{under}'" if under else ""
            raise ConfigError(
                f"{where}: unknown key '{key}'{place}; valid keys: {', '.join(valid)}{_suggest(str(key), valid)}")


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def coerce(where: str, key: str, value: Any, kind: type) -> Any:
    """Check one value's type and range; return it in its canonical Python type."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
    elif kind is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept it, since users write it that way.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be text, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    _check_range(where, key, value)
    return value


def _check_range(where: str, key: str, value: Any) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(
            f"{where}: '{key}' is {value!r}; valid choices: {', '.join(CHOICES[key])}{_suggest(str(value), CHOICES[key])}")
    positive = {"batch_size", "learning_rate", "epochs", "hidden_units", "n_samples", "n_train",
                "n_features", "cluster_std", "n_informative", "class_sep", "depth", "epsilon", "decay_epochs",
                "base_batch_size"}
    if key == "batch_size" and value < 1:  # the upper bound, n_train, is checked with the problem
        raise ConfigError(f"{where}: 'batch_size' must be a whole number from 1 to 'problem.n_train', got {value!r}")
    if key in positive and value <= 0:
        raise ConfigError(f"{where}: '{key}' must be positive, got {value!r}")
    if key in ("seed", "random_state", "n_val", "l2", "warmup_updates", "warmup_epochs") and value < 0:
        raise ConfigError(f"{where}: '{key}' must be zero or more, got {value!r}")
    if key in ("momentum", "beta_1", "beta_2", "rho") and not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: '{key}' must be in [0, 1), got {value!r}")
    if key == "decay_factor" and not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}: 'decay_factor' must be in (0, 1], got {value!r}")
    if key in ("centers", "n_classes") and value < 2:
        raise ConfigError(f"{where}: '{key}' must be at least 2, got {value!r}")
    if key == "noise" and value < 0:
        raise ConfigError(f"{where}: 'noise' must be zero or more, got {value!r}")
    if key == "factor" and not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: 'factor' must be in [0, 1) (the inner circle inside the outer), got {value!r}")
    if key == "eval_points_per_octave" and not 1 <= value <= 64:
        raise ConfigError(f"{where}: 'eval_points_per_octave' must be in 1..64, got {value!r}")
    if key == "divergence_factor" and not value > 1.0:
        raise ConfigError(f"{where}: 'divergence_factor' must be above 1 (a multiple of the initial loss), "
                          f"got {value!r}")


def _section(where: str, raw: Any, cls: type, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: '{name}' must be a mapping of keys to values, got {type(raw).__name__}")
    valid = [f.name for f in fields(cls)]
    _reject_unknown(where, raw, valid, name)
    kinds = {f.name: _kind(f) for f in fields(cls)}
    return cls(**{k: coerce(where, k, v, kinds[k]) for k, v in raw.items()})


def _layers(where: str, raw: Any) -> Any:
    """The model section with ``hidden_units: [w, w, ...]`` read as width w and that depth."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("hidden_units"), list):
        return raw
    widths = raw["hidden_units"]
    if not widths or len(set(map(repr, widths))) != 1:
        raise ConfigError(f"{where}: 'model.hidden_units' as a list must repeat one width (got {widths!r}); "
                          f"layers of different widths are not supported: give hidden_units and depth")
    if "depth" in raw and raw["depth"] != len(widths):
        raise ConfigError(f"{where}: 'model.hidden_units' lists {len(widths)} layers but 'model.depth' is {raw['depth']!r}")
    return {**raw, "hidden_units": widths[0], "depth": len(widths)}


def _check_reads(where: str, train: TrainConfig, raw_train: Mapping[str, Any], blocks) -> None:
    problem = readers.unread_problem(train, raw_train, blocks)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _problem(where: str, raw: Any, folder: Path) -> ProblemConfig:
    """The problem section, checked against its data set: known name, only keys it reads, data
    that can be loaded (a file is read here: path made absolute, SHA-256 recorded), and enough
    rows for the split."""
    problem = _section(where, raw, ProblemConfig, "problem")
    try:
        data_set = datasets.lookup(problem.dataset)
        if data_set.keys is not None:
            takes = (*data_set.keys, *datasets.COMMON_KEYS)
            for key in raw or {}:
                if key not in takes:
                    raise ConfigError(
                        f"{where}: 'problem.{key}' does not apply to data set '{problem.dataset}'; it takes "
                        f"{', '.join(data_set.keys)} (and {', '.join(datasets.COMMON_KEYS[1:])}, as every data set does)")
        problem, rows = datasets.prepare(problem, folder)
    except datasets.DataError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if problem.n_train + problem.n_val >= rows:
        split = "'problem.n_train' + 'problem.n_val'" if problem.n_val else "'problem.n_train'"
        source = ("'problem.n_samples'" if data_set.keys and "n_samples" in data_set.keys
                  else f"the rows of data set '{problem.dataset}'")
        raise ConfigError(f"{where}: {split} ({problem.n_train + problem.n_val}) must be below "
                          f"{source} ({rows}) to leave a test set")
    return problem


def _sweep_block(where: str, raw: Any, label: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: '{label}' must be a mapping of axis names to lists of values")
    valid = list(SWEEPABLE)
    _reject_unknown(where, raw, valid, label)
    for axis in REQUIRED_AXES:
        if axis not in raw:
            raise ConfigError(f"{where}: '{label}' must list '{axis}' (required axes: {', '.join(REQUIRED_AXES)})")
    block = []
    for axis in sorted(raw):
        values = raw[axis]
        if not isinstance(values, list):
            values = [values]  # a scalar is a one-value axis
        if not values:
            raise ConfigError(f"{where}: '{label}.{axis}' is an empty list; give at least one value")
        checked = tuple(coerce(where, axis, v, SWEEPABLE[axis][1]) for v in values)
        if len(set(checked)) != len(checked):
            dup = next(v for v in checked if checked.count(v) > 1)
            raise ConfigError(f"{where}: '{label}.{axis}' lists {dup!r} more than once")
        block.append((axis, checked))
    return tuple(block)


def parse_grid(raw: Any, where: str, default_name: str = "grid", folder: Path | None = None) -> GridConfig:
    """Validate a grid already read from YAML; ``where`` names its source in errors."""
    if raw is None:
        raise ConfigError(f"{where}: the file is empty; a grid needs at least a 'sweep'")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a grid must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
                          f"got a {type(raw).__name__}")
    _reject_unknown(where, raw, TOP_LEVEL_KEYS, "")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name):
        raise ConfigError(f"{where}: 'name' must be a plain identifier (letters, digits, '_' or '-', "
                          f"no path separators), got {name!r}")
    # A data file's path is relative to the grid file's folder.
    problem = _problem(where, raw.get("problem"), Path(where).parent if folder is None else folder)
    model = _section(where, _layers(where, raw.get("model")), ModelConfig, "model")
    train = _section(where, raw.get("train"), TrainConfig, "train")
    probe = raw.get("timing_probe", False)
    if not isinstance(probe, bool):
        raise ConfigError(f"{where}: 'timing_probe' must be true or false, got {probe!r}")
    if "sweep" not in raw:
        raise ConfigError(f"{where}: missing key 'sweep' (it must list {', '.join(REQUIRED_AXES)})")
    sweep_raw = raw["sweep"]
    if isinstance(sweep_raw, list):
        if not sweep_raw:
            raise ConfigError(f"{where}: 'sweep' is an empty list of blocks")
        blocks = tuple(_sweep_block(where, b, f"sweep[{i}]") for i, b in enumerate(sweep_raw))
    else:
        blocks = (_sweep_block(where, sweep_raw, "sweep"),)
    _check_reads(where, train, raw.get("train") or {}, blocks)
    for block in blocks:
        for axis, values in block:
            if axis == "batch_size" and max(values) > problem.n_train:
                raise ConfigError(f"{where}: 'sweep.batch_size' value {max(values)} is above "
                                  f"'problem.n_train' ({problem.n_train})")
    return GridConfig(name=name, problem=problem, model=model, train=train, sweep=blocks, timing_probe=probe,
                      path=where)


def apply_overrides(where: str, raw: Any, overrides: Sequence[str]) -> Any:
    """The grid ``raw`` with command-line items applied, Hydra style: ``train.epochs=20``,
    ``'sweep.seed=[0,1]'``, ``name=quick``. Values are YAML (so lists and numbers read as in the
    file) and are validated exactly like the file's by parse_grid afterwards; ``sweep.KEY``
    sets that axis in every sweep block."""
    if not overrides or not isinstance(raw, Mapping):
        return raw
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2:
            raise ConfigError(f"{where}: override {item!r} is not KEY=VALUE or SECTION.KEY=VALUE "
                              f"(e.g. train.epochs=20 or 'sweep.seed=[0,1]')")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: override {item!r}: the value is not valid YAML") from None
        if len(parts) == 1:
            raw[parts[0]] = value
            continue
        section, name = parts
        blocks = raw.get(section)
        if blocks is None:
            raw[section] = blocks = {}
        for block in (blocks if section == "sweep" and isinstance(blocks, list) else [blocks]):
            if not isinstance(block, dict):
                raise ConfigError(f"{where}: override {item!r}: '{section}' is not a mapping in the grid file")
            block[name] = value
    return raw


def _as_run(raw: Any, grid: "GridConfig") -> str:
    """The grid as YAML, as it was run: overrides applied, a data file's resolved path and hash."""
    run = copy.deepcopy(dict(raw))
    if grid.problem.dataset == "file":
        run["problem"] = {**run.get("problem", {}), "path": grid.problem.path,
                          "file_sha256": grid.problem.file_sha256}
    return yaml.safe_dump(run, sort_keys=False)


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> GridConfig:
    """Read and validate a grid file (with command-line ``overrides`` applied); raise
    ConfigError with one line naming the file, the overrides and the key."""
    path = Path(path)
    where = str(path)
    data = datasets.read_bytes(path, "grid file", ConfigError)
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text file (grid files are UTF-8 YAML)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    if overrides:
        where = f"{where} (with {' '.join(overrides)})"
    raw = apply_overrides(where, raw, overrides)
    grid = parse_grid(raw, where, default_name=re.sub(r"\W", "_", path.stem) or "grid", folder=path.parent)
    return dataclasses.replace(grid, path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                               overrides=tuple(overrides), source=_as_run(raw, grid))


def with_engine(grid: GridConfig, engine: str | None) -> GridConfig:
    """The grid with its training engine overridden (``--engine``); None keeps the grid's."""
    if engine is None:
        return grid
    coerce("--engine", "engine", engine, str)
    blocks = tuple(tuple((a, v) for a, v in block if a != "engine") for block in grid.sweep)
    return dataclasses.replace(grid, train=dataclasses.replace(grid.train, engine=engine), sweep=blocks)
