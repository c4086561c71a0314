"""What Ray costs: per-trial overhead against the serial backend, and parallel efficiency.

    pytest tests/benchmarks/test_scheduling.py --benchmark-only -p no:cacheprovider --benchmark-json=/tmp/s.json
    python tests/benchmarks/ratios.py /tmp/s.json

Both numbers are ratios measured in one run (the machine is noisy); nothing here asserts a time.
"""
from __future__ import annotations

import os
import time

from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.grid import TrialSpec
from harness.scheduler import RayBackend, SerialBackend
from harness.engines import run_group
from harness.engines.keras import run_trial

from fakes import instant_work

QUICK = os.environ.get("HARNESS_BENCH_QUICK") == "1"
N_TRIVIAL = 20 if QUICK else 200
N_CORES = 2


def spec(batch_size: int, epochs: int, seed: int = 0, engine: str = "keras", lr: float = 0.01) -> TrialSpec:
    return TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=TrainConfig(epochs=epochs, engine=engine),
                     batch_size=batch_size, learning_rate=lr, seed=seed)


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_ray_overhead_per_trial(benchmark, ray_local):
    """A trivial trial through Ray against the same through the serial backend; the difference,
    per trial, set against the time of one real smoke-grid trial (10 epochs at batch size 32)."""
    groups = [(spec(32, 1, seed=i),) for i in range(N_TRIVIAL)]
    backend = RayBackend(work=instant_work)
    serial_s = min(_wall(lambda: list(SerialBackend(work=instant_work).run(groups))) for _ in range(3))
    benchmark.pedantic(lambda: list(backend.run(groups)), rounds=1 if QUICK else 3, warmup_rounds=1)
    ray_s = benchmark.stats.stats.min
    overhead_s = max(ray_s - serial_s, 0.0) / N_TRIVIAL
    smoke = run_trial(spec(32, 10))
    smoke_s = (smoke.finished_at - smoke.started_at).total_seconds()
    benchmark.extra_info.update(
        what=f"{N_TRIVIAL} trivial trials through Ray", trials=N_TRIVIAL,
        ray_overhead_ms_per_trial=overhead_s * 1e3, serial_ms_per_trial=serial_s / N_TRIVIAL * 1e3,
        smoke_trial_s=smoke_s, ray_overhead_share_of_smoke_trial=overhead_s / smoke_s)
    assert smoke.status == "ok"


def test_parallel_efficiency(benchmark, ray_local):
    """2 x N_CORES equal CPU-bound tasks (fused groups): serial time / (cores x Ray wall time)."""
    epochs = 20 if QUICK else 100
    groups = [tuple(spec(16, epochs, seed=s, engine="fused", lr=lr) for s in range(5) for lr in (0.001, 0.01))
              for _ in range(2 * N_CORES)]
    run_group(groups[0])  # initial weights drawn and cached in this process, untimed
    # best of two, as the Ray side is best of its rounds: both sides get the same luck
    serial_s = min(_wall(lambda: [run_group(g) for g in groups]) for _ in range(1 if QUICK else 2))
    backend = RayBackend()
    # warm-up: each worker imports TensorFlow and draws the initial weights once, as in a long run
    benchmark.pedantic(lambda: list(backend.run(groups)), rounds=1 if QUICK else 3, warmup_rounds=1)
    ray_s = benchmark.stats.stats.min
    efficiency = serial_s / (N_CORES * ray_s)
    benchmark.extra_info.update(what=f"{len(groups)} fused groups on {N_CORES} cores", tasks=len(groups),
                                serial_s=serial_s, parallel_efficiency=efficiency)
