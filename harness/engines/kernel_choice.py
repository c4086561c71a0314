"""Which path trains a fused group, NumPy or the numba kernels, and where numba's compiled code
lives. Imports neither numba nor the kernels: a group that stays on NumPy never pays for them.

**The rule.** numba pays off per update but costs a start-up once per process: importing numba
and loading the compiled kernels from the cache (``WARM_START_S``, 0.46 s), or, the first time
on a machine, compiling them (``COLD_START_S``, 9.7 s). What a group saves on numba is
estimated from its size (``saving_s``):

    saving = numpy_s(group) * (1 - share(batch size, activation, network size))

``numpy_s`` is the NumPy path's time predicted from the update count, batch size, network size
and scoring rows (``estimate_numpy_s``: within ~15 % of measured on the default network; it
underestimates sigmoid and overestimates large networks at large batches, where numba is slower
anyway); ``share`` is the numba path's time as a share of the NumPy path's (``NUMBA_SHARE``: for
relu on the default network 0.25 at batch size 1, 0.6 at 32; on digits' 0.75 at 1, above 1 from 4).

*For a run* (``plan``, what the driver sends with each task: ``attach``), the groups that save
most go to numba as long as their savings together exceed the start-up of every process they
occupy (at most the run's slots): every batch size of grids/full.yaml saves 0.4-5 s, and all ten
go, where the per-group rule below sent only the five smallest batch sizes. The plan depends
only on the grid, the slots and the cache's state, so a group takes the same path in every
worker, whatever that worker ran before.

*For a group on its own* (``choose_kernel``: a group trained outside a run, a test, a notebook),
it goes to numba when its own saving exceeds the start-up. So with a warm cache a relu group at
batch size 1 needs about 0.6 s of NumPy work to go to numba; with a cold cache about 13 s. A small
grid never waits for a compile it cannot win back.

*On a cold cache* each worker would compile for itself, so ``plan`` counts a compile per
process, and a run as big as grids/full.yaml (15 s of savings against 2 x 9.7 s) would stay on
NumPy, and with it every later run, the cache never filled. ``compile_ahead`` compiles once
instead, in a child of the driver while Ray starts, when the run's savings on a warm cache
repay that one compile; the plan then finds the cache warm. ``python -m
harness.engines.kernel_stack`` does the same by hand.

``HARNESS_FUSED_KERNEL`` (numpy, numba or auto, the default), or ``train_fused(kernel=...)``,
overrides the rule: the tests run the whole fused suite on each path with it.

**Cache.** ``cache_dir()`` is where the kernels are compiled to, chosen explicitly (numba's default
``__pycache__`` beside the module is read-only in an installed package): ``$NUMBA_CACHE_DIR`` if
set, else ``$XDG_CACHE_HOME/harness-numba`` (``~/.cache/harness-numba``), else
``<tempdir>/harness-numba-<uid>`` when the home directory is not writable (a Ray worker or a CI
runner without one), each with a sub-folder named by a hash of the kernel sources and numba's
version. numba itself only notices edits to the file of the function it caches, not to the
functions it calls in other files; the hash makes any edit start a fresh cache.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from harness import cachedir
from harness.clock import eval_points, noise_points
from harness.engines.stack import n_params
from harness.grid import TrialSpec
from harness.problem import data_shape, make_data
from harness.work import estimated_cost, group_key

KERNELS = ("numpy", "numba")
CHOICES = ("auto", *KERNELS)
ENV_VAR = "HARNESS_FUSED_KERNEL"
SOURCES = ("kernel_math.py", "kernels.py", "noise_kernel.py", "score_kernels.py")  # the numba code, beside this module
# What kernel_stack.load() compiles before a group's clock starts; noise_kernel.gradient_noise
# compiles (first time on a machine, ~2.4 s) or loads on the first noise measurement instead, so
# that groups on the epoch clock never wait for it.
COMPILED = ("kernels.train_steps", "score_kernels.evaluate", "score_kernels.epoch_scores")

# Measured on the project machine, quiet (tests/benchmarks/test_engines.py::test_first_call;
# under load from other jobs both grow to ~1.6x):
WARM_START_S = 0.46  # import numba 0.21 s + import the kernels 0.08 s + load them from the cache 0.17 s
COLD_START_S = 9.7  # the same, compiling the three kernels instead of loading them (best of 3)
# The NumPy path's cost (35 models, 50 hidden units, 1 BLAS thread): per step, per model and
# step, per model-row of a batch and per model-row of a scoring pass (both per unit of
# P = (F+1)*H + H*C, the multiply-adds of one row), and per model and epoch (row order, metrics).
NUMPY_STEP_S = 18e-6
NUMPY_MODEL_STEP_S = 0.9e-6
NUMPY_ROW_PER_WEIGHT_S = 0.17e-6 / 300
NUMPY_EVAL_ROW_PER_WEIGHT_S = 0.11e-6 / 300
NUMPY_EPOCH_MODEL_S = 30e-6
# The numba path's time as a share of the NumPy path's for a whole group (training and scoring,
# 35 models, both paths measured in one run, rounded up) at batch sizes 1, 4, 32 and 500, for
# the default network (P = 300: 2 features, 50 units, 3 classes; relu measured again with
# denormals flushed, the epoch scores in numba and the wide logits, the larger of two runs:
# grids/full.yaml's groups; bs 4 from the release before) and for
# digits' (P = 3750: 64 features, 10 classes); interpolated on log2 of the batch size and of P,
# clamped at the ends.
# The kernels' loops gain most where NumPy's per-call cost dominates: small batches of small
# networks. Past batch size ~4, or at digits' size, BLAS's blocked matmuls are as fast or faster,
# and tanh's loops are slower than NumPy's SIMD tanh, so such groups never go to numba.
SHARE_BATCH_SIZES = (1, 4, 32, 500)
SHARE_WEIGHTS = (300, 3750)
NUMBA_SHARE = {"relu": ((0.25, 0.5, 0.6, 0.6), (0.75, 1.05, 1.5, 1.7)),
               "sigmoid": ((0.35, 0.65, 0.95, 0.95), (0.8, 1.1, 1.55, 1.75)),
               "tanh": ((0.4, 1.0, 1.5, 2.5), (0.65, 1.05, 1.6, 1.7))}


@dataclass(frozen=True)
class GroupSize:
    """What the estimate needs to know about a group."""

    models: int
    batch_size: int
    n_train: int
    epochs: int
    weights: int  # P = (F+1)*H + H*C, the multiply-adds of one row through the network
    eval_rows: int  # rows scored per clock point (all splits)
    eval_points: int
    activation: str


def estimate_numpy_s(g: GroupSize) -> float:
    """Predicted seconds of the NumPy path for the whole group (training and clock points)."""
    steps = -(-g.n_train // g.batch_size) * g.epochs
    per_row = NUMPY_ROW_PER_WEIGHT_S * g.weights
    train = steps * (NUMPY_STEP_S + g.models * NUMPY_MODEL_STEP_S) + g.epochs * g.n_train * g.models * per_row
    scoring = g.eval_points * g.models * g.eval_rows * NUMPY_EVAL_ROW_PER_WEIGHT_S * g.weights
    return train + scoring + g.epochs * g.models * NUMPY_EPOCH_MODEL_S


def _interpolate(x: float, xs: tuple[float, ...], ys: tuple[float, ...]) -> float:
    """Piecewise-linear ys(x) through (xs, ys), constant beyond the ends."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x < x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def numba_share(batch_size: int, activation: str, weights: int = SHARE_WEIGHTS[0]) -> float:
    """NUMBA_SHARE at a batch size and network size (P weights per row), interpolated on logs."""
    log_batch = math.log2(batch_size)
    small, large = (_interpolate(log_batch, tuple(math.log2(b) for b in SHARE_BATCH_SIZES), table)
                    for table in NUMBA_SHARE[activation])
    return _interpolate(math.log2(weights), tuple(math.log2(p) for p in SHARE_WEIGHTS), (small, large))


def group_size(specs: Sequence[TrialSpec]) -> GroupSize:
    """What the estimate needs to know about a group of specs (one ``work.group_key``)."""
    spec = specs[0]
    problem = spec.problem
    n_features, n_classes = data_shape(problem)
    shape = (n_features, *[spec.model.hidden_units] * spec.model.depth, n_classes)
    return GroupSize(models=len(specs), batch_size=spec.batch_size, n_train=problem.n_train, epochs=spec.train.epochs,
                     weights=n_params(shape), eval_rows=sum(len(x) for x, _ in make_data(problem).splits().values()),
                     eval_points=len(eval_points(spec)), activation=spec.model.activation)


def numba_supports(spec: TrialSpec) -> bool:
    """The kernels train networks of one hidden layer, with every optimizer option; deeper
    networks take the NumPy path."""
    return spec.model.depth == 1


def plan(groups: Sequence[Sequence[TrialSpec]], slots: int) -> list[str]:
    """A path for each fused group of a run (``groups``: each one ``work.group_key``), chosen for
    the run as a whole: the driver's choice, sent with each task (``attach``). numba's start-up
    is paid once per process that loads it, and a run's groups share ``slots`` processes, so the
    groups that save most go to numba as long as their savings together exceed the start-up of
    every process they would occupy (at most ``slots``); groups numba can't train, or that
    would not gain, stay on NumPy. Deterministic for a grid, its slots and the cache's state.
    ``HARNESS_FUSED_KERNEL`` overrides it in the workers, as it overrides ``choose_kernel``."""
    paths = ["numpy"] * len(groups)
    if not groups or importlib.util.find_spec("numba") is None:
        return paths
    chosen, _ = _most_saving(groups, WARM_START_S if kernels_cached() else COLD_START_S, slots)
    for i in chosen:
        paths[i] = "numba"
    return paths


def _whole_groups(specs: Iterable[TrialSpec]) -> dict[tuple, list[TrialSpec]]:
    """The fused specs by ``work.group_key``: the groups a run's plan weighs, whole (a task
    split from a group counts with it)."""
    groups: dict[tuple, list[TrialSpec]] = {}
    for spec in specs:
        if spec.train.engine == "fused":
            groups.setdefault(group_key(spec), []).append(spec)
    return groups


def _most_saving(groups: Sequence[Sequence[TrialSpec]], start_s: float, slots: int) -> tuple[list[int], float]:
    """The groups (their indices) that save most on numba net of the start-up of the processes
    they occupy, and that net saving; groups numba can't train save nothing."""
    saving = {i: saving_s(group_size(group)) for i, group in enumerate(groups) if numba_supports(group[0])}
    best, net, total = 0, 0.0, 0.0
    order = sorted((i for i in saving if saving[i] > 0), key=lambda i: -saving[i])
    for k, i in enumerate(order, 1):
        total += saving[i]
        if total - start_s * min(slots, k) > net:
            best, net = k, total - start_s * min(slots, k)
    return order[:best], net


def compile_ahead(specs: Sequence[TrialSpec], slots: int) -> subprocess.Popen | None:
    """On a cold cache, start compiling the kernels in a child process (``python -m
    harness.engines.kernel_stack``) if the fused groups of ``specs`` would repay one compile with
    the plan of a warm cache; the caller waits on the child before ``attach``. ``slots``: the
    run's workers that share this machine's cache (below 2, a worker's own compile costs the
    same and ``plan`` already weighs it). The noise kernel (~2.4 s more) only if the run
    measures the noise scale. None when there is nothing to do."""
    if slots < 2 or importlib.util.find_spec("numba") is None or kernels_cached():
        return None
    groups = list(_whole_groups(specs).values())
    if _most_saving(groups, WARM_START_S, slots)[1] < COLD_START_S:
        return None
    noise = any(len(noise_points(group[0])) for group in groups)  # the clock is a group's own
    return subprocess.Popen([sys.executable, "-m", "harness.engines.kernel_stack", *([] if noise else ["--no-noise"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def attach(tasks: Sequence[Sequence[TrialSpec]], slots: int) -> None:
    """Sets ``kernel`` (``plan``'s path) on each fused task that can carry it (``initial.Unit``),
    which ``fused.train_fused`` follows. A task split from a group takes the group's path."""
    fused = [t for t in tasks if t and t[0].train.engine == "fused" and hasattr(t, "initial")]
    whole = _whole_groups(s for t in fused for s in t)
    paths = dict(zip(whole, plan(list(whole.values()), slots)))
    for task in fused:
        task.kernel = paths[group_key(task[0])]


def choose_kernel(g: GroupSize, requested: str | None = None) -> str:
    """"numpy" or "numba" for a group: ``requested`` (or $HARNESS_FUSED_KERNEL) when it names a
    path, else the rule of the module docstring."""
    requested = requested or os.environ.get(ENV_VAR) or "auto"
    if requested not in CHOICES:
        raise ValueError(f"fused engine: unknown kernel {requested!r} (from {ENV_VAR} or kernel=); "
                         f"valid: {', '.join(CHOICES)}")
    if requested != "auto":
        return requested
    if importlib.util.find_spec("numba") is None:
        return "numpy"
    start_s = WARM_START_S if kernels_cached() else COLD_START_S
    return "numba" if saving_s(g) > start_s else "numpy"


def task_s(task: Sequence[TrialSpec]) -> float:
    """Predicted seconds of a task on one core: a fused one on the faster of its paths (what
    ``plan`` mostly picks), start-up aside; a Keras one by ``work.estimated_cost``. Neither is
    exact, but this one errs the same way for both paths and ``estimated_cost`` does not (on one
    core, full.yaml on numba: 11.9 s predicted, 8.8 s measured, 21.1 s by estimated_cost;
    digits.yaml on NumPy: 21.9 s, about 7.5 s, 3.8 s), so ``work.ray_pays_off`` uses this one."""
    if task[0].train.engine != "fused":
        return estimated_cost(task)
    g = group_size(task)
    numpy_s = estimate_numpy_s(g)
    return numpy_s - max(0.0, saving_s(g)) if numba_supports(task[0]) else numpy_s


def saving_s(g: GroupSize) -> float:
    """Seconds the numba path saves a group, start-up aside (negative where it is slower)."""
    return estimate_numpy_s(g) * (1.0 - numba_share(g.batch_size, g.activation, g.weights))


@lru_cache(maxsize=1)
def cache_dir() -> Path:
    """The directory numba compiles the kernels to (module docstring), created if missing."""
    here = Path(__file__).parent
    digest = hashlib.sha256(importlib.metadata.version("numba").encode())
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    leaf = f"kernels-{digest.hexdigest()[:16]}"
    try:
        return cachedir.cache_dir("harness-numba", leaf, os.environ.get("NUMBA_CACHE_DIR"))
    except OSError as exc:
        raise OSError(f"fused engine: {exc} for numba's kernels; set NUMBA_CACHE_DIR to one") from None


def kernels_cached() -> bool:
    """Whether the kernels ``load`` compiles are in ``cache_dir()`` for this Python and this copy
    of the sources: numba's index files, in the sub-folder numba keeps for their folder (named as
    numba's ``UserProvidedCacheLocator.get_suitable_cache_subpath`` names it). Another install of
    the same sources shares ``cache_dir()`` but not that sub-folder, and compiles for itself."""
    try:
        folder = cache_dir()
    except OSError:
        return False
    here = os.path.dirname(os.path.abspath(__file__))  # the kernels' folder too
    sub = folder / f"{os.path.basename(here)}_{hashlib.sha1(here.encode()).hexdigest()}"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return all(any(sub.glob(f"{name}-*.{tag}.nbi")) for name in COMPILED)
