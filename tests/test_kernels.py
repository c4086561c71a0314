"""The numba kernels (harness/engines/kernels.py) against the fused engine's NumPy path, and the
rule that picks between them (kernel_choice).

**When the two paths are bit-identical.** The kernels' exact order (``exact=True``, used when
``kernel_stack.blas_is_emulated()``: OpenBLAS with its SkylakeX kernels, as on the project machine,
OpenBLAS 0.3.31 and NumPy 2.4 with its AVX512F exp) reproduces the NumPy path's weights bit for
bit for relu and sigmoid networks with 3 classes and 50 or more hidden units, at every batch
size (measured: 2 to 20 features, 50/64/100/128 units, batch sizes 1 to 500), and with 2 classes
at batch sizes above 1. Elsewhere the BLAS picks other small-matrix paths whose order the kernels
do not emulate: digits' 10 classes, fewer than ~50 hidden units, or another CPU or BLAS. tanh is
never bit-identical (NumPy's float32 tanh is not ported; ours is within 0.5 ulp, NumPy's 1.4).
Off those conditions the paths differ by float32 rounding only, as the NumPy path differs from
Keras: the weight tolerances below are tests/test_fused.py's against Keras, and every test here
that asserts bit-identity says so with ``BITWISE``.

Evaluation passes (the clock's scoring of whole splits) run in another order than the NumPy
path's matmuls and with libm's log: losses within 1e-6 relative, accuracies identical.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import test_clock  # noqa: E402 - the suites re-run below on the numba path
import test_datasets  # noqa: E402
import test_fused  # noqa: E402
from harness import readers  # noqa: E402
from harness.config import ModelConfig, ProblemConfig, TrainConfig  # noqa: E402
from harness.engines import fused, kernel_choice, kernel_math, kernel_stack, score_kernels, stack  # noqa: E402
from harness.engines.fused import train_fused  # noqa: E402
from harness.engines.optimizers import Hyper  # noqa: E402
from harness.engines.kernel_choice import GroupSize, choose_kernel  # noqa: E402
from harness.grid import TrialSpec  # noqa: E402
from harness.problem import make_data  # noqa: E402

EXACT = kernel_stack.blas_is_emulated()  # the condition of the module docstring
DIGITS = ProblemConfig(dataset="digits", n_train=1000, n_val=397, standardize="zscore")


def group(batch_size: int, epochs: int, activation: str = "relu", problem: ProblemConfig = ProblemConfig(),
          learning_rates=(0.01, 0.003), schedule: str = "epoch") -> list[TrialSpec]:
    """Members that differ in learning rate, seed and momentum (0.9 and 0: both update formulas)."""
    return [TrialSpec(problem=problem, model=ModelConfig(activation=activation),
                      train=TrainConfig(epochs=epochs, momentum=momentum, engine="fused", eval_schedule=schedule),
                      batch_size=batch_size, learning_rate=lr, seed=seed)
            for lr in learning_rates for seed in (0, 1) for momentum in (0.9, 0.0)]


def with_options(specs: list[TrialSpec], nesterov: bool = False) -> list[TrialSpec]:
    """``specs`` cycled through SGD's options: warm-up with cosine decay, step decay, linear
    scaling of the rate, an L2 penalty, none; Nesterov for all members when ``nesterov`` (a
    stack shares its update rule)."""
    options = [dict(train=dict(warmup_updates=30, schedule="cosine")), dict(train=dict(schedule="step", decay_epochs=1.0)),
               dict(train=dict(learning_rate_scaling="linear", base_batch_size=4)), dict(model=dict(l2=1e-3)), {}]
    out = []
    for i, spec in enumerate(specs):
        option = options[i % len(options)]
        train = dict(option.get("train", {}), **({"nesterov": True} if nesterov else {}))
        out.append(dataclasses.replace(spec, train=dataclasses.replace(spec.train, **train),
                                       model=dataclasses.replace(spec.model, **option.get("model", {}))))
    return out


def with_optimizer(specs: list[TrialSpec], optimizer: str) -> list[TrialSpec]:
    """``specs`` trained by ``optimizer`` at a tenth of their rates, every other member with its
    own hyperparameters, and cosine decay after a warm-up in every third."""
    own = {"adam": dict(beta_1=0.8, beta_2=0.99, epsilon=1e-5), "rmsprop": dict(rho=0.8, epsilon=1e-6)}[optimizer]
    out = []
    for i, spec in enumerate(specs):
        train = dict(optimizer=optimizer, momentum=0.9, **(own if i % 2 else {}),
                     **(dict(schedule="cosine", warmup_updates=20) if i % 3 == 0 else {}))
        out.append(dataclasses.replace(spec, learning_rate=spec.learning_rate / 10,
                                       train=readers.normalised(dataclasses.replace(spec.train, **train))))
    return out


def weight_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - y).max()) for wa, wb in zip(a, b) for x, y in zip(wa, wb))


def assert_scores_close(numpy_run, numba_run, bitwise: bool) -> None:
    """Epoch records and clock points: training loss/accuracy (from the training logits) equal
    bit for bit when the weights are; evaluation losses within 1e-6 relative; accuracies identical."""
    for ra, rb in zip(numpy_run.records, numba_run.records):
        assert [(r.epoch, r.updates) for r in ra] == [(r.epoch, r.updates) for r in rb]
        for a, b in zip(ra, rb):
            if bitwise:
                np.testing.assert_array_equal([a.loss, a.accuracy], [b.loss, b.accuracy])  # NaN == NaN here
            else:
                assert b.loss == pytest.approx(a.loss, abs=test_fused.LOSS_ATOL) and a.accuracy == b.accuracy
            assert b.val_loss == pytest.approx(a.val_loss, rel=1e-6, nan_ok=True) and a.val_accuracy == b.val_accuracy
    for pa, pb in zip(numpy_run.points, numba_run.points):
        for a, b in zip(pa, pb):
            assert a.updates == b.updates
            for split in ("train", "val", "test"):
                assert getattr(b, f"{split}_loss") == pytest.approx(getattr(a, f"{split}_loss"), rel=1e-6, nan_ok=True)
                assert getattr(b, f"{split}_accuracy") == getattr(a, f"{split}_accuracy") or \
                    math.isnan(getattr(a, f"{split}_accuracy"))


# name: (specs, bit-identical where EXACT holds, weight tolerance otherwise: test_fused's against
# Keras for the batch size). Measured here, off the bitwise cases: tanh 1.2e-7, digits 1.8e-7.
CASES = {
    "bs1-1000-updates": (group(1, 2), True, 2e-4),
    "bs7-ragged": (group(7, 3), True, 2e-5),
    "bs500": (group(500, 5), True, 2e-6),
    "bs7-geometric-clock": (group(7, 3, schedule="geometric"), True, 2e-5),
    "sigmoid-bs50": (group(50, 3, "sigmoid", learning_rates=(0.05, 0.01)), True, 2e-5),
    "tanh-bs50": (group(50, 3, "tanh"), False, 2e-5),  # our tanh is not NumPy's
    "digits-bs48": (group(48, 3, problem=DIGITS), False, 2e-5),  # 64 features, 10 classes: not emulated
    "digits-bs1": (group(1, 1, problem=DIGITS, learning_rates=(0.003, 0.001)), False, 2e-4),
    # the research's other batch sizes (256: the kernel pads its buffers' rows)
    **{f"bs{b}": (group(b, 2), True, 2e-5) for b in (2, 3, 32, 64, 256, 499)},
    # SGD's other options (tests/test_axes_engines.py holds them to Keras): per-update rates
    # (warm-up, cosine, step, batch-size scaling), Nesterov, L2 in some members of the stack.
    "bs1-schedules-nesterov-l2": (with_options(group(1, 2)), True, 2e-4),
    "bs7-schedules-nesterov-l2": (with_options(group(7, 3)), True, 2e-5),
    "bs7-nesterov": (with_options(group(7, 3), nesterov=True), True, 2e-5),
    # Adam and RMSprop, their members differing in rate, schedule and hyperparameters
    **{f"bs{b}-{opt}": (with_optimizer(group(b, e), opt), True, tol)
       for b, e, tol in ((1, 2, 2e-4), (7, 3, 2e-5)) for opt in ("adam", "rmsprop")},
}


@pytest.mark.parametrize("name", CASES)
def test_numba_path_trains_what_the_numpy_path_trains(name):
    specs, bitwise, tolerance = CASES[name]
    bitwise = bitwise and EXACT
    numpy_run, numba_run = train_fused(specs, kernel="numpy"), train_fused(specs, kernel="numba")
    if bitwise:  # BITWISE
        assert weight_diff(numpy_run.weights, numba_run.weights) == 0.0
    else:
        assert weight_diff(numpy_run.weights, numba_run.weights) < tolerance
    assert_scores_close(numpy_run, numba_run, bitwise)


def test_a_diverging_member_stops_alike_and_leaves_its_neighbours_bit_identical():
    calm = group(7, 4)[:2]
    wild = dataclasses.replace(calm[0], learning_rate=1e3)
    specs = [calm[0], wild, calm[1]]
    numpy_run, numba_run = train_fused(specs, kernel="numpy"), train_fused(specs, kernel="numba")
    assert [len(r) for r in numpy_run.records] == [len(r) for r in numba_run.records] == [4, 1, 4]
    assert not math.isfinite(numba_run.records[1][-1].loss)
    if EXACT:  # BITWISE, the blown-up member's NaN and inf weights included
        for a, b in zip(numpy_run.weights, numba_run.weights):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    assert_scores_close(numpy_run, numba_run, EXACT)
    alone = train_fused(calm, kernel="numba")
    assert weight_diff([numba_run.weights[0], numba_run.weights[2]], alone.weights) == 0.0


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("problem", [ProblemConfig(), DIGITS], ids=["blobs", "digits"])
def test_evaluation_pass_matches_numpy(activation, problem):
    """Trained weights of a stack, and two blown-up members (a NaN weight, an infinite logit),
    scored on every split by both paths."""
    specs = group(7, 2, activation, problem)
    training = train_fused(specs, kernel="numpy")
    w1, b1, w2, b2 = (np.stack([w[i] for w in training.weights]) for i in range(4))
    w1[0, 0, 0] = np.nan
    b2[1, 0] = np.inf
    theta = np.concatenate([w.reshape(len(w), -1) for w in (w1, b1, w2, b2)], axis=1)
    shape = (w1.shape[1], w1.shape[2], w2.shape[2])
    numba_stack = kernel_stack.NumbaStack.from_flat(theta, np.zeros_like(theta), Hyper.plain(len(theta)), shape,
                                                    activation, EXACT)
    numpy_stack = stack.Stack.for_scoring(theta, shape, activation)
    for x, y in make_data(problem).splits().values():
        # The kernel itself, even where NumbaStack scores with NumPy because that is faster there
        x1t = np.ascontiguousarray(stack.with_ones(x).T)
        with np.errstate(all="ignore"):
            loss_a, accuracy_a = numpy_stack.evaluate(*numpy_stack.eval_input(x, y))
            loss_b, accuracy_b = score_kernels.evaluate(*numba_stack.tensors[:3], x1t, np.array(y), y.argmax(axis=1),
                                                  kernel_math.ACTIVATION_CODES[activation])
            loss_c, accuracy_c = numba_stack.evaluate(*numba_stack.eval_input(x, y))  # what the clock calls
        np.testing.assert_array_equal(accuracy_c, accuracy_a)
        np.testing.assert_allclose(loss_c, loss_a, rtol=1e-6)
        finite = np.isfinite(loss_a)
        assert not finite[:2].any() and finite[2:].all() and np.array_equal(finite, np.isfinite(loss_b))
        np.testing.assert_allclose(loss_b[finite], loss_a[finite], rtol=1e-6)
        np.testing.assert_array_equal(accuracy_b, accuracy_a)


def test_fixed_order_stays_within_the_keras_tolerances(monkeypatch):
    """The order used where the BLAS's is not emulated, on this machine: test_fused's cases and
    tolerances against Keras itself."""
    monkeypatch.setattr(kernel_stack, "blas_is_emulated", lambda: False)
    cases = [(test_fused.make_spec(1, 2), 2e-4), (test_fused.make_spec(7, 3, momentum=0.0), 2e-5),
             (test_fused.make_spec(7, 3, seed=3), 2e-5), (test_fused.make_spec(500, 5), 2e-6),
             (test_fused.make_spec(50, 3, activation="tanh", seed=1), 2e-5),
             (test_fused.make_spec(50, 3, learning_rate=0.05, activation="sigmoid"), 2e-5)]
    for spec, tolerance in cases:
        keras_weights, keras_records, _ = test_fused.keras_reference(spec)
        training = train_fused([spec], kernel="numba")
        assert test_fused.max_weight_diff(training.weights[0], keras_weights) < tolerance, spec
        test_fused.assert_records_close(training.records[0], keras_records)


def elementwise(scalar):
    """A compiled loop applying one of kernel_math's scalar functions to every element."""
    @numba.njit(cache=False)
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = scalar(x[i])
        return out
    return apply


exp_array, tanh_array, log_array = (elementwise(f) for f in (kernel_math.np_expf, kernel_math.tanh, kernel_math.np_logf))


def skip_unless_numpy_runs_the_ported(function: str) -> None:
    """The ports are of NumPy's AVX2/AVX512F float32 loops: elsewhere np.exp and np.log run others."""
    from numpy._core._multiarray_umath import __cpu_features__

    if not (__cpu_features__.get("AVX512F") or __cpu_features__.get("AVX2")):
        pytest.skip(f"NumPy's SIMD {function} (the ported one) is not what np.{function} runs on this CPU")


def test_exp_port_is_numpys_exp():
    """BITWISE on any CPU where NumPy runs its AVX2/AVX512F float32 exp (the one ported)."""
    skip_unless_numpy_runs_the_ported("exp")
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.exponential(3.0, 1_000_000), rng.uniform(-110.0, 90.0, 1_000_000),
                        rng.uniform(-1.0, 1.0, 1_000_000),  # every range: overflow, subnormal results, near 1
                        [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283935546875, 88.7228, -103.97208404541015625,
                         -103.972, -87.4, -100.0, 1e-30, -1e-30]]).astype(np.float32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(exp_array(x).view(np.int32), np.exp(x).view(np.int32))


def test_log_port_is_numpys_log():
    """BITWISE on any CPU where NumPy runs its AVX2/AVX512F float32 log (the one ported), over
    random bit patterns (every positive float32, subnormals included) and the special cases."""
    skip_unless_numpy_runs_the_ported("log")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 0x7F800000, 2_000_000).astype(np.uint32).view(np.float32),
                        rng.uniform(1.0, 3.0, 1_000_000).astype(np.float32),  # a softmax's row totals
                        -rng.exponential(1.0, 1000).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 1e-45, 1.1754942e-38, 1.17549435e-38,
                                  0.70710677, 0.70710683, 3.4028235e38], np.float32)])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(log_array(x).view(np.int32), np.log(x).view(np.int32))


def test_tanh_is_within_half_an_ulp():
    x = np.concatenate([np.random.default_rng(0).normal(0, 2, 200_000), 10.0 ** np.linspace(-40, 1.2, 20_000),
                        [0.0, 9.0, 10.0, 1e30, np.inf]]).astype(np.float32)
    x = np.concatenate([x, -x])
    got, exact = tanh_array(x), np.tanh(x.astype(np.float64))
    assert np.max(np.abs(got - exact) / np.spacing(np.abs(got)).astype(np.float64)) <= 0.5 + 1e-6
    assert np.array_equal(np.signbit(got), np.signbit(x))  # odd, and -0.0 stays -0.0
    assert np.isnan(tanh_array(np.array([np.nan], np.float32))[0])


def grid_group(models: int, batch_size: int, epochs: int, activation: str = "relu") -> GroupSize:
    return GroupSize(models=models, batch_size=batch_size, n_train=500, epochs=epochs, weights=300, eval_rows=1000,
                     eval_points=epochs + 1, activation=activation)


def test_rule_keeps_small_groups_on_numpy_and_puts_large_ones_on_numba(monkeypatch):
    monkeypatch.delenv(kernel_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: True)
    smoke = grid_group(2, 32, 10)  # grids/smoke.yaml's size: milliseconds of work
    full_bs1 = grid_group(35, 1, 200)  # a batch size of grids/full.yaml: seconds of work
    middle = grid_group(35, 1, 80)
    assert kernel_choice.estimate_numpy_s(smoke) < 0.1 and kernel_choice.estimate_numpy_s(full_bs1) > 5
    assert 1.5 < kernel_choice.estimate_numpy_s(middle) < 6
    assert choose_kernel(smoke) == "numpy" and choose_kernel(full_bs1) == choose_kernel(middle) == "numba"
    assert choose_kernel(grid_group(35, 32, 200, "tanh")) == "numpy"  # numba's tanh is slower there
    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: False)  # a compile is only worth a big group
    assert choose_kernel(middle) == "numpy" and choose_kernel(grid_group(35, 1, 1000)) == "numba"


def test_saving_exceeds_the_start_up_it_pays(monkeypatch):
    """No group that the rule sends to numba saves less than numba's start-up costs it."""
    monkeypatch.delenv(kernel_choice.ENV_VAR, raising=False)
    for cached, start_s in ((True, kernel_choice.WARM_START_S), (False, kernel_choice.COLD_START_S)):
        monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: cached)
        for activation in ("relu", "tanh", "sigmoid"):
            for batch_size in (1, 2, 7, 32, 100, 500):
                for epochs in (1, 5, 20, 50, 100, 200, 1000):
                    g = grid_group(35, batch_size, epochs, activation)
                    share = kernel_choice.numba_share(batch_size, activation, g.weights)
                    saved_s = kernel_choice.estimate_numpy_s(g) * (1 - share)
                    assert (choose_kernel(g) == "numba") == (saved_s > start_s)


def test_override_and_its_error(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV_VAR, "numba")
    assert choose_kernel(grid_group(1, 500, 1)) == "numba"
    assert choose_kernel(grid_group(1, 500, 1), "numpy") == "numpy"  # the argument wins
    monkeypatch.setenv(kernel_choice.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"unknown kernel 'fast' .*valid: auto, numpy, numba"):
        choose_kernel(grid_group(1, 500, 1))
    monkeypatch.delenv(kernel_choice.ENV_VAR)
    monkeypatch.setattr(kernel_choice.importlib.util, "find_spec", lambda name: None)  # numba not installed
    assert choose_kernel(grid_group(35, 1, 1000)) == "numpy"


def test_cache_dir_is_explicit_and_falls_back_to_a_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    kernel_choice.cache_dir.cache_clear()
    assert kernel_choice.cache_dir().parent == tmp_path / "xdg" / "harness-numba"
    unusable = tmp_path / "a-file"  # a home whose cache cannot be a directory
    unusable.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(unusable))
    kernel_choice.cache_dir.cache_clear()
    assert kernel_choice.cache_dir().parent.parent == Path(tempfile.gettempdir())
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "chosen"))
    kernel_choice.cache_dir.cache_clear()
    folder = kernel_choice.cache_dir()
    assert folder.parent == tmp_path / "chosen" and folder.name.startswith("kernels-") and folder.is_dir()
    kernel_choice.cache_dir.cache_clear()


def test_a_cache_counts_as_warm_only_for_this_copy_of_the_kernels(monkeypatch, tmp_path):
    """numba keeps a sub-folder per source folder under the cache: another install of the same
    sources (a new virtual environment) shares the harness's cache folder but compiles anew, so
    its index files must not make this copy's cache look warm."""
    from numba.core.caching import UserProvidedCacheLocator

    from harness.engines import kernels

    monkeypatch.setattr(kernel_choice, "cache_dir", lambda: tmp_path)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"

    def index_files(source_file: str) -> None:
        folder = tmp_path / UserProvidedCacheLocator.get_suitable_cache_subpath(source_file)
        folder.mkdir(parents=True)
        for name in kernel_choice.COMPILED:
            (folder / f"{name}-10.{tag}.nbi").write_bytes(b"")

    index_files("/elsewhere/.venv/lib/site-packages/harness/engines/kernels.py")
    assert not kernel_choice.kernels_cached()
    index_files(kernels.__file__)
    assert kernel_choice.kernels_cached()


ONE_SIGNATURE = """
import json
from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.engines import kernel_stack, kernels, noise_kernel, score_kernels
from harness.engines.fused import train_fused
from harness.grid import TrialSpec

kernel_stack.load(noise=True)
for batch_size, schedule in ((1, "epoch"), (7, "epoch"), (500, "epoch"), (500, "geometric")):
    train = TrainConfig(epochs=2, engine="fused", eval_schedule=schedule)
    train_fused([TrialSpec(ProblemConfig(), ModelConfig(), train, batch_size, 0.01, seed) for seed in (0, 1)],
                kernel="numba")
kernel_functions = (kernels.train_steps, score_kernels.evaluate, score_kernels.epoch_scores,
                    noise_kernel.gradient_noise)
print(json.dumps({f.__name__: [str(s) for s in f.signatures] for f in kernel_functions}))
"""


def test_groups_of_every_shape_run_on_the_kernels_that_load_compiled():
    """An argument of another type (a read-only array, another layout) makes numba compile a
    kernel again inside a group's clock, ~5 s on a machine's first run. In a fresh process,
    groups at batch size 1, a ragged 7, the whole training set as one batch, and the geometric
    clock's noise, leave each kernel with the one signature kernel_stack.load compiled."""
    proc = subprocess.run([sys.executable, "-c", ONE_SIGNATURE], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    signatures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name: len(types) for name, types in signatures.items()} == dict.fromkeys(signatures, 1), signatures



WORKER_START = """
import sys, time
from harness.engines import kernel_stack
kernel_stack.load()
print("scipy.linalg" in sys.modules)
import scipy.linalg.cython_blas  # still importable afterwards
"""


def test_a_worker_loads_the_kernels_without_importing_scipy():
    """numba's first kernel load imports scipy.linalg (0.2 s of a worker's start) to learn
    whether np.convolve may use BLAS; kernel_stack.load keeps it out, and leaves it importable."""
    proc = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"

def test_numba_caches_where_the_harness_says():
    kernel_stack.load()
    assert numba.config.CACHE_DIR == str(kernel_choice.cache_dir()) and kernel_choice.kernels_cached()
    assert kernel_math.JIT["cache"]


@pytest.mark.slow
def test_fresh_process_compiles_once_then_loads_from_the_cache(tmp_path):
    """A new cache directory (a new machine, CI, a Ray worker's first group): the first process
    compiles, the second loads, and neither touches os.environ."""
    script = ("import os, time; before = dict(os.environ); t = time.perf_counter()\n"
              "from harness.engines import kernels, kernel_choice, kernel_stack; kernel_stack.load()\n"
              "assert dict(os.environ) == before and kernel_choice.kernels_cached()\n"
              "print(kernels.train_steps.stats.cache_hits and 'hit' or 'miss', time.perf_counter() - t)")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    (first, first_s), (second, second_s) = (r.stdout.split() for r in runs)
    assert (first, second) == ("miss", "hit"), [r.stderr for r in runs]
    assert float(second_s) < float(first_s)
    assert list(tmp_path.glob("kernels-*/**/kernels.train_steps-*.nbi"))


# --- the fused suites again, on the numba path ------------------------------------------------
# Groups there are small, so the rule keeps them on NumPy; HARNESS_FUSED_KERNEL forces numba.

RERUN = {test_fused: [name for name in vars(test_fused) if name.startswith("test_")],
         test_clock: ["test_points_are_scored_on_whole_splits_and_end_at_the_final_scores",
                      "test_update_clock_is_the_same_in_both_engines", "test_finite_blow_up_is_diverged_in_both_engines",
                      "test_divergence_factor_is_a_grid_key"],
         test_datasets: ["test_changed_file_fails_its_trials_with_one_line_naming_it",
                         "test_both_engines_give_equal_results_on"]}
for _module, _names in RERUN.items():
    for _name in _names:
        globals()[f"{_name}__numba"] = getattr(_module, _name)


@pytest.fixture(autouse=True)
def numba_for_the_reruns(request, monkeypatch):
    if request.node.name.split("[")[0].endswith("__numba"):
        monkeypatch.setenv(kernel_choice.ENV_VAR, "numba")
    yield


def test_results_say_which_path_trained_them(monkeypatch):
    import numba

    spec = TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=TrainConfig(epochs=1, engine="fused"),
                     batch_size=100, learning_rate=0.01, seed=0)
    for path, version in (("numpy", f"numpy {np.__version__}"),
                          ("numba", f"numpy {np.__version__} + numba {numba.__version__}")):
        monkeypatch.setenv("HARNESS_FUSED_KERNEL", path)
        assert fused.run_group([spec])[0].engine_version == version


def spec_group(batch_size: int, models: int = 2, depth: int = 1) -> list[TrialSpec]:
    return [TrialSpec(problem=ProblemConfig(), model=ModelConfig(depth=depth),
                      train=TrainConfig(epochs=2, engine="fused"), batch_size=batch_size, learning_rate=0.01, seed=seed)
            for seed in range(models)]


def test_run_plan_pays_numba_start_up_once_per_process(monkeypatch):
    """The driver's plan: groups that each save less than numba's start-up go to numba together
    when their savings exceed the start-up of the processes they occupy; the per-group rule
    alone would keep every one of them on NumPy."""
    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: True)
    monkeypatch.setattr(kernel_choice, "WARM_START_S", 0.65)
    savings = {1: 0.5, 2: 0.5, 4: 0.5, 8: 0.5, 16: -0.2}  # by batch size; start-up 0.65 s
    monkeypatch.setattr(kernel_choice, "saving_s", lambda g: savings[g.batch_size])
    groups = [spec_group(b) for b in savings]
    assert all(s < 0.65 for s in savings.values())
    assert kernel_choice.plan(groups, slots=2) == ["numba"] * 4 + ["numpy"]  # 2.0 s saved, 1.3 s paid
    assert kernel_choice.plan(groups, slots=8) == ["numpy"] * 5  # four processes: 2.6 s paid
    assert kernel_choice.plan(groups[:2], slots=2) == ["numpy"] * 2  # 1.0 s saved, 1.3 s paid
    savings[1] = 3.0  # a big group pays alone; then each next one must beat a process of its own
    assert kernel_choice.plan(groups, slots=8) == ["numba"] + ["numpy"] * 4
    deep = spec_group(2, depth=2)  # the kernels train one hidden layer
    assert kernel_choice.plan([groups[0], deep], slots=2) == ["numba", "numpy"]
    monkeypatch.setattr(kernel_choice.importlib.util, "find_spec", lambda name: None)  # numba not installed
    assert kernel_choice.plan(groups, slots=2) == ["numpy"] * 5


def test_run_plan_sends_every_batch_size_of_the_full_grid_to_numba(monkeypatch):
    from harness.config import load_grid
    from harness.grid import expand_grid
    from harness.work import group_specs

    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: True)
    root = Path(__file__).resolve().parents[1]
    full = group_specs(expand_grid(load_grid(root / "grids" / "full.yaml")))
    assert kernel_choice.plan(full, slots=2) == ["numba"] * 10
    smoke = group_specs(expand_grid(load_grid(root / "grids" / "smoke.yaml")))
    assert set(kernel_choice.plan([g for g in smoke], slots=2)) == {"numpy"}


def test_a_cold_cache_is_compiled_once_ahead_of_a_run_that_repays_it(monkeypatch):
    """grids/full.yaml on a cold cache: a compile in each of two workers would cost more than
    the run saves, so the plan keeps NumPy (and the cache would stay cold for every later run);
    one compile ahead is repaid, so the driver starts it, with the noise kernel only for a clock
    that measures noise. Not for small grids, one worker, Keras trials or a warm cache."""
    from harness.config import load_grid, with_engine
    from harness.grid import expand_grid
    from harness.work import group_specs

    started = []
    monkeypatch.setattr(kernel_choice.subprocess, "Popen", lambda command, **kw: started.append(command) or "child")
    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: False)
    root = Path(__file__).resolve().parents[1]
    full = expand_grid(load_grid(root / "grids" / "full.yaml"))
    assert kernel_choice.plan(group_specs(full), slots=2) == ["numpy"] * 10
    assert kernel_choice.compile_ahead(full, slots=2) == "child"
    geometric = expand_grid(load_grid(root / "grids" / "full.yaml", ["train.eval_schedule=geometric"]))
    assert kernel_choice.compile_ahead(geometric, slots=2) == "child"
    assert started == [[sys.executable, "-m", "harness.engines.kernel_stack", "--no-noise"],
                       [sys.executable, "-m", "harness.engines.kernel_stack"]]
    smoke = expand_grid(with_engine(load_grid(root / "grids" / "smoke.yaml"), "fused"))
    keras = expand_grid(with_engine(load_grid(root / "grids" / "full.yaml"), "keras"))
    assert kernel_choice.compile_ahead(smoke, 2) is kernel_choice.compile_ahead(full, 1) is None
    assert kernel_choice.compile_ahead(keras, 2) is None
    monkeypatch.setattr(kernel_choice, "kernels_cached", lambda: True)
    assert kernel_choice.compile_ahead(full, 2) is None and len(started) == 2


def test_driver_waits_for_the_compile_ahead_before_planning_the_paths(monkeypatch, tmp_path):
    from harness.config import parse_grid
    from harness.driver import run_study
    from harness.scheduler import SerialBackend

    class Child:
        waited = False

        def wait(self):
            self.waited = True

        def poll(self):
            return 0 if self.waited else None

    child, seen = Child(), []
    monkeypatch.setattr(kernel_choice, "compile_ahead", lambda specs, slots: child)
    real_attach = kernel_choice.attach
    monkeypatch.setattr(kernel_choice, "attach", lambda tasks, slots: seen.append(child.waited) or real_attach(tasks, slots))
    grid = parse_grid({"train": {"epochs": 1, "engine": "fused"},
                       "sweep": {"batch_size": [50], "learning_rate": [0.01], "seed": [0]}}, "g.yaml")
    run_study(grid, tmp_path, SerialBackend(), progress=False)
    assert seen == [True]


def test_train_fused_follows_the_attached_path_unless_overridden(monkeypatch):
    from harness import initial

    monkeypatch.delenv(kernel_choice.ENV_VAR, raising=False)
    (task,) = initial.attach([tuple(spec_group(50))], {})
    assert choose_kernel(kernel_choice.group_size(task)) == "numpy"  # alone, too small for numba
    task.kernel = "numba"
    assert "numba" in train_fused(task).engine_version
    monkeypatch.setenv(kernel_choice.ENV_VAR, "numpy")
    assert "numba" not in train_fused(task).engine_version
    assert "numba" not in train_fused(initial.attach([tuple(spec_group(50))], {})[0]).engine_version


def test_driver_attaches_the_run_plan_to_fused_tasks(monkeypatch, tmp_path):
    from harness.config import parse_grid
    from harness.driver import run_study
    from harness.scheduler import SerialBackend
    from harness.store import read_table

    monkeypatch.delenv(kernel_choice.ENV_VAR, raising=False)
    monkeypatch.setattr(kernel_choice, "plan", lambda groups, slots: ["numba"] * len(groups))
    grid = parse_grid({"train": {"epochs": 2, "engine": "fused"},
                       "sweep": {"batch_size": [50, 100], "learning_rate": [0.01], "seed": [0, 1]}}, "g.yaml")
    run_study(grid, tmp_path, SerialBackend(), progress=False)
    versions = read_table(tmp_path, "trials")["engine_version"].to_pylist()
    assert len(versions) == 4 and all("numba" in v for v in versions)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_numba_gradient_noise_equals_the_exact_estimator(activation):
    """The numba stack's noise scale against noise.mlp_noise_scale (float64, the full per-example
    gradients), to float32 rounding as the NumPy path is (tests/test_noise.py); a diverged
    member's is NaN and leaves its neighbours alone."""
    from harness.noise import mlp_noise_scale

    rng = np.random.default_rng(7)
    shape, m = (2, 50, 3), 4
    theta = np.concatenate([rng.normal(0, 1 / np.sqrt(2), (m, 2 * 50)), rng.normal(0, 0.1, (m, 50)),
                            rng.normal(0, 1 / np.sqrt(50), (m, 50 * 3)), rng.normal(0, 0.1, (m, 3))], axis=1)
    theta = theta.astype(np.float32)
    theta[3, 0] = np.nan
    specs = [TrialSpec(problem=ProblemConfig(), model=ModelConfig(activation=activation),
                       train=TrainConfig(epochs=1, engine="fused"), batch_size=50, learning_rate=0.01, seed=s)
             for s in range(m)]
    numba_stack = fused._make_stack("numba", theta, Hyper.from_specs(specs), shape, activation)
    x = rng.normal(0, 2, (300, 2)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 300)]
    got_g, got_t = numba_stack.gradient_noise(x, y)
    want_g, want_t = mlp_noise_scale([w.astype(np.float64) for w in numba_stack.weights()], x, y, activation)
    np.testing.assert_allclose(got_g[:3], want_g[:3], rtol=2e-5)
    np.testing.assert_allclose(got_t[:3], want_t[:3], rtol=2e-5)
    assert np.all(want_t[:3] / want_g[:3] > 0.5) and np.isnan(got_g[3]) and np.isnan(got_t[3])
