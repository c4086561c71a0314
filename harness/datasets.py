"""Data sets: a registry of name -> loader, each returning (x float32 [n, F], labels int64 [n]).

A new built-in data set is one ``DataSet`` in ``BUILT_IN``: its loader, the problem keys it
reads, and its row count (which config validation needs before any trial runs). Installed
packages add data sets through the entry point group ``harness.datasets``: each entry point
is a callable taking the ProblemConfig and returning (x, labels). A grid only *names* a data
set; the name is looked up among built-ins and installed entry points, so nothing a grid file
says is ever imported.

Everything works offline: the generators are scikit-learn's, the digits ship inside
scikit-learn, and a user's file is read from disk. ``harness.problem.make_data`` splits and
one-hot encodes what a loader returns; this module knows nothing of splits.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from harness.config import ProblemConfig

ENTRY_POINT_GROUP = "harness.datasets"
# Keys every data set takes: the split, and how features are scaled.
COMMON_KEYS = ("dataset", "n_train", "n_val", "standardize")
DIGITS_ROWS = 1797
FILE_FORMATS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}

Arrays = tuple[np.ndarray, np.ndarray]


class DataError(ValueError):
    """A data set cannot be loaded as configured; one line for the user. Config validation puts
    the grid file in front; a worker's trial fails with it as its error."""


@dataclass(frozen=True)
class DataSet:
    name: str
    load: Callable[[Any], Arrays]  # ProblemConfig -> (x [n, F], labels [n]), any numeric dtypes
    keys: tuple[str, ...] | None  # problem keys it reads beyond COMMON_KEYS; None: any (entry points)
    rows: Callable[[Any], int] | None = None  # row count without loading; None: load and count
    check: Callable[[Any], None] | None = None  # raise DataError for settings the loader would refuse


def _blobs(p: ProblemConfig) -> Arrays:
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=p.n_samples, centers=p.centers, n_features=p.n_features,
                      cluster_std=p.cluster_std, random_state=p.random_state)


def _moons(p: ProblemConfig) -> Arrays:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=p.n_samples, noise=p.noise, random_state=p.random_state)


def _circles(p: ProblemConfig) -> Arrays:
    from sklearn.datasets import make_circles

    return make_circles(n_samples=p.n_samples, noise=p.noise, factor=p.factor, random_state=p.random_state)


def _classification(p: ProblemConfig) -> Arrays:
    from sklearn.datasets import make_classification

    # No redundant or repeated features and one cluster per class: every feature is either
    # informative or noise, so n_features and n_informative alone say how hard it is, and any
    # n_classes up to 2**n_informative is valid (sklearn's defaults, 2 redundant features and 2
    # clusters per class, would refuse the 2-feature default).
    return make_classification(n_samples=p.n_samples, n_features=p.n_features, n_informative=p.n_informative,
                               n_redundant=0, n_repeated=0, n_classes=p.n_classes, n_clusters_per_class=1,
                               class_sep=p.class_sep, random_state=p.random_state)


def _check_classification(p: ProblemConfig) -> None:
    if p.n_informative > p.n_features:
        raise DataError(f"'problem.n_informative' ({p.n_informative}) must be at most 'problem.n_features' "
                        f"({p.n_features}) for data set 'classification'")
    if p.n_classes > 2 ** p.n_informative:
        raise DataError(f"'problem.n_classes' ({p.n_classes}) must be at most 2**'problem.n_informative' "
                        f"({2 ** p.n_informative}) for data set 'classification' (one cluster per class "
                        f"at a corner of an n_informative-dimensional hypercube)")


def _digits(p: ProblemConfig) -> Arrays:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    # The rows come grouped by writer; shuffled once, the first n_train rows are not a few
    # writers' hands and the test rows others'. RandomState: its stream is frozen across NumPy
    # versions, so a random_state means the same rows forever.
    order = np.random.RandomState(p.random_state).permutation(len(y))
    return x[order], y[order]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_bytes(path: str | Path, what: str, error: type[Exception]) -> bytes:
    """A file's bytes, or ``error`` with one line saying why not (``what``: 'grid file', ...)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def _read_bytes(path: str) -> bytes:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"{path}: not a CSV or Parquet file (its name must end in "
                        f"{', '.join(FILE_FORMATS)})")
    return read_bytes(path, "data file", DataError)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def parse_table(path: str, blob: bytes, label_column: str) -> Arrays:
    """(x float64 [n, F], class ids [n]) from a CSV or Parquet file's bytes: every column but
    ``label_column`` is a numeric feature; labels (text or whole numbers) become class ids in
    their sorted order."""
    import pandas as pd

    kind = FILE_FORMATS[Path(path).suffix.lower()]
    try:
        if kind == "CSV":
            frame = pd.read_csv(io.BytesIO(blob))
        else:
            import pyarrow.parquet as pq

            frame = pq.read_table(io.BytesIO(blob)).to_pandas()
    except Exception as exc:  # noqa: BLE001 - pandas and pyarrow raise many types for a bad file
        raise DataError(f"{path}: cannot be read as {kind} ({_first_line(exc)})") from None
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if label_column not in columns:
        raise DataError(f"{path}: label column '{label_column}' is not in the file; its columns: "
                        f"{', '.join(columns) or 'none'} (set 'problem.label_column')")
    features = [c for c in columns if c != label_column]
    if not features or not len(frame):
        raise DataError(f"{path}: needs at least one row and one feature column besides '{label_column}'")
    text = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise DataError(f"{path}: feature column(s) {', '.join(repr(c) for c in text)} are not numeric; "
                        f"every column but the label column '{label_column}' must hold numbers")
    x = frame[features].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}: feature column '{features[col]}' is empty or not finite at data row {row + 1}")
    labels = frame[label_column]
    if labels.isna().any():
        raise DataError(f"{path}: label column '{label_column}' is empty at data row "
                        f"{int(np.flatnonzero(labels.isna().to_numpy())[0]) + 1}")
    if pd.api.types.is_float_dtype(labels):
        if not (labels == labels.round()).all():
            raise DataError(f"{path}: label column '{label_column}' holds fractional numbers; labels must be "
                            f"text or whole numbers")
        labels = labels.astype(np.int64)
    elif not pd.api.types.is_integer_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        labels = labels.astype(str)  # mixed text and numbers compare as text
    _, ids = np.unique(labels.to_numpy(), return_inverse=True)  # sorted: "cat" < "dog", 3 < 10
    return x, ids.reshape(-1)


def _file(p: ProblemConfig) -> Arrays:
    if not p.file_sha256:
        raise DataError(f"{p.path}: no 'problem.file_sha256' recorded; load the grid with harness.config "
                        f"(it records the file's SHA-256 so a changed file is refused)")
    blob = _read_bytes(p.path)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != p.file_sha256:
        # The trial id holds the SHA-256 the grid was loaded with: training on other rows under
        # that id would mix two data sets in one results folder.
        raise DataError(f"{p.path}: SHA-256 is {digest[:16]}..., but the grid was loaded with "
                        f"{p.file_sha256[:16]}...; the file changed since, run the grid again to use it")
    return parse_table(p.path, blob, p.label_column)


def _prepare_file(p: ProblemConfig, base: Path) -> ProblemConfig:
    """The problem with ``path`` made absolute (relative paths are relative to the grid file's
    folder) and ``file_sha256`` filled in; a pinned SHA-256 must match."""
    if not p.path:
        raise DataError("'problem.path' is required for data set 'file' (a CSV or Parquet file, relative "
                        "to the grid file)")
    path = Path(os.path.expanduser(p.path))
    path = Path(os.path.abspath(path if path.is_absolute() else base / path))
    blob = _read_bytes(str(path))
    digest = hashlib.sha256(blob).hexdigest()
    if p.file_sha256 and p.file_sha256.lower() != digest:
        raise DataError(f"{path}: SHA-256 is {digest}, but 'problem.file_sha256' pins {p.file_sha256}")
    parse_table(str(path), blob, p.label_column)  # a malformed file stops the grid, not its trials
    return dataclasses.replace(p, path=str(path), file_sha256=digest)


def _n_samples(p: ProblemConfig) -> int:
    return p.n_samples


BUILT_IN: dict[str, DataSet] = {d.name: d for d in (
    DataSet("blobs", _blobs, ("n_samples", "centers", "n_features", "cluster_std", "random_state"), _n_samples),
    DataSet("moons", _moons, ("n_samples", "noise", "random_state"), _n_samples),
    DataSet("circles", _circles, ("n_samples", "noise", "factor", "random_state"), _n_samples),
    DataSet("classification", _classification,
            ("n_samples", "n_features", "n_informative", "n_classes", "class_sep", "random_state"), _n_samples,
            _check_classification),
    DataSet("digits", _digits, ("random_state",), lambda p: DIGITS_ROWS),
    DataSet("file", _file, ("path", "label_column", "file_sha256")),
)}


def installed() -> dict[str, EntryPoint]:
    """Data sets of installed packages (entry point group ``harness.datasets``), by name, not loaded."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> tuple[str, ...]:
    """Every valid ``dataset``: the built-ins, then installed entry points (a built-in wins a clash)."""
    return (*BUILT_IN, *sorted(n for n in installed() if n not in BUILT_IN))


def _plugin(ep: EntryPoint) -> Callable[[Any], Arrays]:
    def load(p: ProblemConfig) -> Arrays:
        try:
            return ep.load()(p)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - someone else's code: one line, naming it
            raise DataError(f"data set '{ep.name}' (entry point {ep.value}) failed: {_first_line(exc)}") from None

    return load


def lookup(name: str) -> DataSet:
    """The data set a grid names; DataError listing the valid names for any other."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    found = installed()
    if name in found:
        return DataSet(name, _plugin(found[name]), None)
    valid = names()
    close = difflib.get_close_matches(name, list(valid), n=1)
    plugins = ", ".join(n for n in valid if n not in BUILT_IN) or "none"
    raise DataError(f"'dataset' is {name!r}; valid choices: {', '.join(valid)} (installed through "
                    f"the '{ENTRY_POINT_GROUP}' entry point group: {plugins})"
                    + (f" (did you mean '{close[0]}'?)" if close else ""))


def prepare(problem: ProblemConfig, base: Path) -> tuple[ProblemConfig, int]:
    """Validate a problem before any trial runs: (the problem as trials will see it, its row
    count). ``base`` is the grid file's folder. Files and entry points are loaded to count."""
    data_set = lookup(problem.dataset)
    if data_set.check:
        data_set.check(problem)
    if data_set.name == "file":
        problem = _prepare_file(problem, base)
    if data_set.rows:
        return problem, data_set.rows(problem)
    return problem, len(load_arrays(problem)[0])


def load_arrays(problem: ProblemConfig) -> Arrays:
    """(x float32 [n, F], labels int64 [n] in 0..C-1) of the problem's data set, checked."""
    x, labels = lookup(problem.dataset).load(problem)
    where = f"data set '{problem.dataset}'"
    x, labels = np.asarray(x), np.asarray(labels)
    if x.ndim != 2 or labels.ndim != 1 or len(x) != len(labels) or not x.shape[1]:
        raise DataError(f"{where}: x must be [n, F >= 1] and labels [n], got {x.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise DataError(f"{where}: labels must be class ids 0..C-1, got dtype {labels.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN or infinite values")
    if len(np.unique(labels)) < 2:
        raise DataError(f"{where}: needs at least two classes, got {len(np.unique(labels))}")
    return x, labels.astype(np.int64)
