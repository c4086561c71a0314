"""Cost per update of each engine, against a single-model NumPy loop (the floor).

Skipped by default (the project runs pytest with --benchmark-skip). Run:

    TF_CPP_MIN_LOG_LEVEL=2 pytest tests/benchmarks --benchmark-only -p no:cacheprovider \\
        --benchmark-json=/tmp/engines.json
    python tests/benchmarks/ratios.py /tmp/engines.json

HARNESS_BENCH_QUICK=1 runs a few epochs per case (under a minute); without it each case trains
long enough for the per-update cost to dominate the fixed costs. Every benchmark records in
``extra_info`` what one call did (models, epochs, updates, model_updates), so ratios.py can
turn seconds into microseconds per (model-)update without knowing the cases.

Times are of the whole call: the Keras engine's include building and tracing its model (it
pays them per trial), so its ``extra_info`` also holds the steady-state cost after epoch 1.
The fused engine's initial weights are drawn once outside the timing (cached per process, as
in a Ray worker that runs several groups), and so are its numba kernels compiled or loaded:
``test_first_call`` measures that start-up on its own, in fresh processes. The fused engine
runs both of its paths, forced: engine ``fused`` (NumPy) and ``fused-numba``; ``steps-*`` time
the training steps alone, without the clock's scoring passes.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.grid import TrialSpec
from harness.problem import epoch_batches, initial_weights, make_data

QUICK = os.environ.get("HARNESS_BENCH_QUICK") == "1"
BATCH_SIZES = (1, 32, 500)
# Epochs per batch size: enough updates to swamp per-call costs in the full mode.
EPOCHS = {1: 1, 32: 3, 500: 10} if QUICK else {1: 6, 32: 40, 500: 200}
KERAS_EPOCHS = {1: 2, 32: 3, 500: 10} if QUICK else {1: 3, 32: 20, 500: 100}
ROUNDS = 1 if QUICK else 3
N_MODELS = 35  # as many as one batch size of grids/full.yaml: 7 learning rates x 5 seeds
# Tamer than full.yaml's 1e-4..1e-1: at batch size 1 its steepest rates diverge within a few
# epochs, and a member that stops early would make the stack look cheaper than it is.
LEARNING_RATES = (1e-4, 2.15e-4, 4.64e-4, 1e-3, 2.15e-3, 4.64e-3, 1e-2)


@pytest.fixture(scope="session", autouse=True)
def data_ready():
    make_data(ProblemConfig())  # imports scikit-learn and builds the cached data set, untimed


@pytest.fixture(autouse=True)
def one_blas_thread():
    # As in a worker: N cores run N trials, so each measurement gets one thread.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def make_spec(batch_size: int, epochs: int, learning_rate: float = 0.01, seed: int = 0,
              engine: str = "fused") -> TrialSpec:
    return TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=TrainConfig(epochs=epochs, engine=engine),
                     batch_size=batch_size, learning_rate=learning_rate, seed=seed)


def group(batch_size: int, epochs: int) -> list[TrialSpec]:
    return [make_spec(batch_size, epochs, lr, seed) for lr in LEARNING_RATES for seed in range(5)][:N_MODELS]


def train_floor(spec: TrialSpec, weights) -> tuple[np.ndarray, ...]:
    """The floor: one float32 model, plain 2-D NumPy, forward + backward + momentum SGD and
    nothing else (no metrics, no test-set pass). Same batches and update rule as the engines."""
    data = make_data(spec.problem)
    w1, b1, w2, b2 = (w.copy() for w in weights)
    params = (w1, b1, w2, b2)
    velocity = tuple(np.zeros_like(w) for w in params)
    lr, momentum, n = np.float32(spec.learning_rate), np.float32(spec.train.momentum), spec.problem.n_train
    for epoch in range(spec.train.epochs):
        order = np.concatenate(epoch_batches(spec.seed, epoch, n, spec.batch_size))
        xs, ys = data.x_train[order], data.y_train[order]
        for start in range(0, n, spec.batch_size):
            x, y = xs[start:start + spec.batch_size], ys[start:start + spec.batch_size]
            z1 = x @ w1 + b1
            a1 = np.maximum(z1, 0.0)
            logits = a1 @ w2 + b2
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            dz2 = (exp / exp.sum(axis=1, keepdims=True) - y) * np.float32(1.0 / len(x))
            dz1 = (dz2 @ w2.T) * (z1 > 0)
            for w, v, g in zip(params, velocity, (x.T @ dz1, dz1.sum(axis=0), a1.T @ dz2, dz2.sum(axis=0))):
                v *= momentum
                v -= g * lr
                w += v
    return params


def record(benchmark, spec: TrialSpec, models: int, engine: str, **extra) -> None:
    updates = spec.train.epochs * spec.updates_per_epoch
    benchmark.extra_info.update(engine=engine, batch_size=spec.batch_size, models=models, epochs=spec.train.epochs,
                                updates=updates, model_updates=updates * models, **extra)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_floor(benchmark, batch_size):
    spec = make_spec(batch_size, EPOCHS[batch_size])
    weights = initial_weights(spec.model, spec.problem, spec.seed)
    record(benchmark, spec, 1, "floor")
    benchmark.pedantic(train_floor, args=(spec, weights), rounds=ROUNDS, iterations=1, warmup_rounds=1)


# The fused engine's two paths (harness/engines/kernel_choice.py picks one per group; here each
# is forced): engine "fused" is the NumPy path, "fused-numba" the numba kernels.
FUSED_ENGINES = {"numpy": "fused", "numba": "fused-numba"}


@pytest.mark.parametrize("kernel", FUSED_ENGINES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_fused(benchmark, batch_size, kernel):
    from harness.engines.fused import train_fused

    specs = group(batch_size, EPOCHS[batch_size])
    # Draws the weights and, for numba, compiles or loads the kernels: both once per process.
    train_fused([dataclasses.replace(s, train=dataclasses.replace(s.train, epochs=1)) for s in specs], kernel=kernel)
    record(benchmark, specs[0], len(specs), FUSED_ENGINES[kernel])
    training = benchmark.pedantic(train_fused, args=(specs, kernel), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(len(r) == specs[0].train.epochs for r in training.records)  # nobody diverged


def stack_for(kernel: str, specs: list[TrialSpec]):
    """The stack train_fused would build for ``specs`` on one path, with zero momenta."""
    from harness.engines import fused

    from harness.engines.optimizers import Hyper

    theta, shape = fused._stack_initial(specs)
    return fused._make_stack(kernel, theta, Hyper.from_specs(specs), shape, "relu")


@pytest.mark.parametrize("kernel", FUSED_ENGINES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_steps(benchmark, batch_size, kernel):
    """The training steps alone (no clock points, no epoch metrics): the cost the numba kernel
    replaces, as the research measured it (0.19-0.22 us per model-update at batch size 1)."""
    from harness.engines import fused

    specs = group(batch_size, EPOCHS[batch_size])
    data = make_data(specs[0].problem)
    n, epochs, steps = specs[0].problem.n_train, specs[0].train.epochs, specs[0].updates_per_epoch
    x1, y = fused.with_ones(data.x_train), np.array(data.y_train)
    orders = [fused._epoch_rows([s.seed for s in specs], epoch, n) for epoch in range(epochs)]
    logits = np.empty((len(specs), n, y.shape[1]), np.float32)

    def train():
        stack = stack_for(kernel, specs)
        for rows in orders:
            stack.begin_epoch(x1, y, rows, batch_size, logits)
            stack.run(0, steps)

    train()  # numba: compiles or loads the kernels
    record(benchmark, specs[0], len(specs), f"steps-{kernel}")
    benchmark.pedantic(train, rounds=ROUNDS, iterations=1, warmup_rounds=0)


# Trained models make subnormal floats (vanishing softmax probabilities, the momenta of units
# whose gradient stopped), and an x86 core takes a microcode assist for each. The engine trains
# with them flushed to zero, as TensorFlow does (harness/engines/denormals.py); these time the
# steps after LATE_EPOCHS epochs at batch size 1, trained all along with them flushed or kept
# (kept, they pile up in the momenta, which decay through the subnormal range for ~200 steps).
LATE_EPOCHS = 40


@pytest.mark.parametrize("flush", [True, False], ids=["flushed", "kept"])
@pytest.mark.parametrize("kernel", FUSED_ENGINES)
def test_steps_late(benchmark, kernel, flush):
    import contextlib

    from harness.engines import denormals, fused

    if flush and not denormals.supported():
        pytest.skip("denormals can't be flushed on this platform")
    specs = group(1, 2)
    data = make_data(specs[0].problem)
    n = specs[0].problem.n_train
    x1, y = fused.with_ones(data.x_train), np.array(data.y_train)
    logits = np.empty((len(specs), n, y.shape[1]), np.float32)
    stack = stack_for(kernel, specs)

    def train(epoch: int = LATE_EPOCHS):
        with denormals.flushed() if flush else contextlib.nullcontext():
            stack.begin_epoch(x1, y, fused._epoch_rows([s.seed for s in specs], epoch, n), 1, logits)
            stack.run(0, n)

    for epoch in range(LATE_EPOCHS):  # untimed
        train(epoch)

    record(benchmark, specs[0], len(specs), f"late-{kernel}-{'flushed' if flush else 'kept'}")
    benchmark.extra_info.update(epochs=1, updates=n, model_updates=n * len(specs))
    benchmark.pedantic(train, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("kernel", FUSED_ENGINES)
def test_fused_epoch_overhead(benchmark, kernel):
    """What the fused engine pays once per epoch whatever the batch size, for 35 models: batch
    orders and gather, the epoch's loss/accuracy from the stored logits, the test-set pass."""
    from harness.engines import fused

    specs = group(500, 1)
    data = make_data(specs[0].problem)
    stack = stack_for(kernel, specs)
    x1_train, test = fused.with_ones(data.x_train), stack.eval_input(data.x_test, data.y_test)
    n, classes = specs[0].problem.n_train, data.y_train.shape[1]
    labels = fused.argmax_classes(data.y_train)
    logits = np.random.default_rng(0).standard_normal((len(specs), n, classes)).astype(np.float32)

    def epoch_overhead():
        orders = {s.seed: np.concatenate(epoch_batches(s.seed, 0, n, 500)) for s in specs}
        rows = np.stack([orders[s.seed] for s in specs])
        if kernel == "numpy":
            x1_train[rows]  # the NumPy path's per-epoch gather of the training rows
        fused._epoch_loss(stack.epoch_scores(logits, data.y_train, labels, rows)[0], 500)
        return stack.evaluate(*test)

    benchmark.extra_info.update(engine=FUSED_ENGINES[kernel], models=len(specs), epochs=1, what="per-epoch fixed work")
    benchmark.pedantic(epoch_overhead, rounds=5 if QUICK else 50, iterations=1, warmup_rounds=1)


FIRST_CALL = """import json, time
t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
from harness.engines import kernel_stack, kernels
t2 = time.perf_counter()
kernel_stack.load()
t3 = time.perf_counter()
print(json.dumps({"import_numba_s": t1 - t0, "import_kernels_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
                  "compiled": not kernels.train_steps.stats.cache_hits}))
"""


def first_call(cache: str) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_first_call(benchmark, tmp_path):
    """numba's start-up in a fresh process, the cost kernel_choice weighs against a group's
    savings: cold (an empty cache: compile both kernels) and warm (load them from the cache).
    The benchmark's time is the cold process; extra_info splits both."""
    runs: list[tuple[dict, dict]] = []

    def cold_then_warm(cache):
        runs.append((first_call(cache), first_call(cache)))

    def fresh_cache():
        return (str(tmp_path / f"cache{len(runs)}"),), {}

    benchmark.pedantic(cold_then_warm, setup=fresh_cache, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(cold["compiled"] and not warm["compiled"] for cold, warm in runs)
    best = {kind: min((run[i] for run in runs), key=lambda r: r["total_s"]) for i, kind in enumerate(("cold", "warm"))}
    benchmark.extra_info.update(what="numba start-up in a fresh process (import numba + compile or cache load)",
                                **{f"{kind}_{key}": value for kind, run in best.items() for key, value in run.items()
                                   if key != "compiled"})


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_keras(benchmark, batch_size):
    from harness.engines.keras import run_trial

    spec = make_spec(batch_size, KERAS_EPOCHS[batch_size], engine="keras")
    run_trial(dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=1)))  # import, first trace
    results = []

    def trial():
        results.append(run_trial(spec))

    record(benchmark, spec, 1, "keras")
    benchmark.pedantic(trial, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(r.status == "ok" for r in results), results[-1].error
    # Steady state: the epochs after the first (which traces the graph), best round.
    steady = min((r.epochs[-1].elapsed_s - r.epochs[0].elapsed_s) / (r.epochs_run - 1) for r in results)
    benchmark.extra_info["steady_s_per_epoch"] = steady
    benchmark.extra_info["steady_s_per_update"] = steady / spec.updates_per_epoch
    benchmark.extra_info["fit_s"] = min(r.wall_clock_s for r in results)


# Every optimizer at batch size 1, both engines: the fused engine must stay >= 10x the Keras
# engine per model-update for each (ratios.py prints the table). Rates as Keras' defaults suit.
OPTIMIZERS = {"sgd": dict(), "nesterov": dict(nesterov=True), "adam": dict(optimizer="adam"),
              "rmsprop": dict(optimizer="rmsprop")}
OPTIMIZER_RATE = {"sgd": 1.0, "nesterov": 1.0, "adam": 0.1, "rmsprop": 0.1}  # x LEARNING_RATES


def with_optimizer(spec: TrialSpec, name: str) -> TrialSpec:
    return dataclasses.replace(spec, learning_rate=spec.learning_rate * OPTIMIZER_RATE[name],
                               train=dataclasses.replace(spec.train, **OPTIMIZERS[name]))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_optimizer(benchmark, name):
    from harness.engines.fused import train_fused

    specs = [with_optimizer(s, name) for s in group(1, EPOCHS[1])]
    train_fused([dataclasses.replace(s, train=dataclasses.replace(s.train, epochs=1)) for s in specs])
    record(benchmark, specs[0], len(specs), f"fused:{name}")
    training = benchmark.pedantic(train_fused, args=(specs,), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(len(r) == specs[0].train.epochs for r in training.records)  # nobody diverged


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_keras_optimizer(benchmark, name):
    from harness.engines.keras import run_trial

    spec = with_optimizer(make_spec(1, KERAS_EPOCHS[1], learning_rate=1e-3, engine="keras"), name)
    run_trial(dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=1)))
    results = []
    record(benchmark, spec, 1, f"keras:{name}")
    benchmark.pedantic(lambda: results.append(run_trial(spec)), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(r.status == "ok" for r in results), results[-1].error
    steady = min((r.epochs[-1].elapsed_s - r.epochs[0].elapsed_s) / (r.epochs_run - 1) for r in results)
    benchmark.extra_info["steady_s_per_update"] = steady / spec.updates_per_epoch


@pytest.mark.parametrize("batch_size", (1, 7))
def test_floor_trains_the_same_model(batch_size):
    """Not a benchmark: the floor must compute what the engines compute, or its times mean nothing."""
    from harness.engines.fused import train_fused

    spec = make_spec(batch_size, 2)
    floor = train_floor(spec, initial_weights(spec.model, spec.problem, spec.seed))
    fused = train_fused([spec], kernel="numpy").weights[0]
    assert max(float(np.abs(a - b).max()) for a, b in zip(floor, fused)) < 1e-6
