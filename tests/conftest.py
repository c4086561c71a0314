"""Shared fixtures: tiny grids, and one in-process Ray for the tests that need it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.config import parse_grid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


def tiny_grid(epochs: int = 3, **sweep):
    """A small grid on the reference problem; keyword arguments replace sweep axes."""
    axes = {"batch_size": [100, 500], "learning_rate": [0.05], "seed": [0]}
    axes.update(sweep)
    return parse_grid({"name": "tiny", "train": {"epochs": epochs}, "sweep": axes}, "tiny.yaml")


def grid_file(folder: Path, name: str, text: str) -> Path:
    """A grid YAML file written into ``folder``, for tests that run the command line."""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def check_golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; HARNESS_UPDATE_GOLDEN=1 writes it on purpose. A missing
    golden is a failure, never a new golden: a test that writes its own answer cannot fail."""
    path = GOLDEN / name
    if os.environ.get("HARNESS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"tests/golden/{name} is missing; rerun with HARNESS_UPDATE_GOLDEN=1 to write it "
                    f"on purpose, read it, and commit it")
    expected = path.read_text()
    if text != expected:
        diff = [f"line {i + 1}: expected {a!r}, got {b!r}" for i, (a, b) in
                enumerate(zip(expected.splitlines(), text.splitlines())) if a != b]
        pytest.fail(f"{name} changed ({len(diff)} lines differ, {len(expected.splitlines())} vs "
                    f"{len(text.splitlines())} lines):\n" + "\n".join(diff[:20]) +
                    "\nIf the change is intended, rerun with HARNESS_UPDATE_GOLDEN=1 and commit the file.")


@pytest.fixture(scope="session")
def ray_local():
    """One private Ray instance for the session's in-process Ray tests (2 CPUs, quiet)."""
    ray = pytest.importorskip("ray")
    import logging

    import fakes
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(fakes)  # Ray workers cannot import tests/ by name
    if not ray.is_initialized():
        from harness import private_ray
        from harness.scheduler import worker_env

        private_ray.start(worker_env(1), num_cpus=2, verbose=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
