"""Denormals flushed to zero while the fused engine trains (harness/engines/denormals.py), as
TensorFlow flushes them for the Keras engine."""
from __future__ import annotations

import numpy as np
import pytest

from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.engines import denormals, stack
from harness.engines.fused import train_fused
from harness.grid import TrialSpec

TINY = np.float32(1e-38)  # normal; half of it is subnormal (float32's smallest normal is 1.18e-38)
SUBNORMAL = np.float32(1e-39)

pytestmark = pytest.mark.skipif(not denormals.supported(), reason="flushing needs x86-64 with the System V ABI")


def test_flushed_flushes_results_and_restores_the_register():
    assert TINY * np.float32(0.5) != 0 and not denormals.flushing()
    with denormals.flushed() as on:
        assert on and denormals.flushing()
        assert TINY * np.float32(0.5) == 0  # flush-to-zero: a subnormal result is 0
        assert (np.full(64, TINY) * np.float32(0.5) == 0).all()  # SIMD loops too
    assert TINY * np.float32(0.5) != 0 and not denormals.flushing()


def test_flushed_reads_subnormal_inputs_as_zero():
    big = np.float32(1e30)
    assert SUBNORMAL * big == pytest.approx(1e-9, rel=1e-3)
    with denormals.flushed():
        assert SUBNORMAL * big == 0  # denormals-are-zero: the input is read as 0
    assert SUBNORMAL * big == pytest.approx(1e-9, rel=1e-3)


def test_flushed_restores_the_register_when_the_block_raises():
    with pytest.raises(RuntimeError), denormals.flushed():
        raise RuntimeError("boom")
    assert not denormals.flushing()


def test_tensorflow_flushes_denormals_as_the_fused_engine_does():
    """The reason for the mode: Keras' arithmetic (TensorFlow's threads) has it."""
    from harness.problem import import_tensorflow

    tf = import_tensorflow()
    assert float((tf.constant([TINY]) * 0.5).numpy()[0]) == 0.0
    assert float(tf.function(lambda x: x * 0.5)(tf.constant([TINY])).numpy()[0]) == 0.0


def _specs() -> list[TrialSpec]:
    return [TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=TrainConfig(epochs=2, engine="fused"),
                      batch_size=50, learning_rate=lr, seed=0) for lr in (0.01, 0.1)]


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
def test_train_fused_trains_and_scores_with_denormals_flushed(monkeypatch, kernel):
    if kernel == "numba":
        pytest.importorskip("numba")
        from harness.engines.kernel_stack import NumbaStack as cls
    else:
        cls = stack.Stack
    seen = []
    for name in ("run", "evaluate"):
        original = getattr(cls, name)

        def spy(self, *args, _original=original, _name=name):
            seen.append((_name, denormals.flushing()))
            return _original(self, *args)

        monkeypatch.setattr(cls, name, spy)
    training = train_fused(_specs(), kernel=kernel)
    assert {name for name, _ in seen} == {"run", "evaluate"}
    assert all(on for _, on in seen)
    assert not denormals.flushing()  # restored on the way out
    assert "denormals kept" not in training.engine_version


def test_train_fused_says_when_it_cannot_flush(monkeypatch):
    monkeypatch.setattr(denormals, "_register", lambda: None)
    training = train_fused(_specs(), kernel="numpy")
    assert training.engine_version.endswith("(denormals kept)")
    assert all(len(r) == 2 for r in training.records)
    # and the numbers are the flushed run's wherever no value came near 1e-38
    monkeypatch.undo()
    flushed = train_fused(_specs(), kernel="numpy")
    for kept, on in zip(training.weights, flushed.weights):
        for a, b in zip(kept, on):
            np.testing.assert_array_equal(a, b)
