"""Distribution-level equivalence: final test accuracy over 10 seeds at 200 epochs, Keras engine
against fused engine, in a stable cell and in a chaotic one.

Weight-level equality (tests/test_fused.py, tests/test_axes_engines.py) cannot hold in a chaotic
cell: one rounding apart, two runs of the same seed part ways. What must hold there is that the
two engines draw final accuracies from the same distribution. Mann-Whitney's U test checks that;
its power is shown by a control that must be rejected: the fused engine at a neighbouring
rate, whose distribution does differ.

Cells (batch size 32, SGD with momentum 0.9, the default study): lr 0.01 is stable (seeds
spread 0.007 around 0.82, measured on the fused engine), lr 0.3 is chaotic (0.07 around 0.46).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.engines import fused, keras
from harness.grid import TrialSpec

SEEDS = range(10)


def final_accuracy(engine: str, learning_rate: float) -> np.ndarray:
    specs = [TrialSpec(ProblemConfig(), ModelConfig(), TrainConfig(epochs=200, engine=engine), 32, learning_rate, seed)
             for seed in SEEDS]
    results = fused.run_group(specs) if engine == "fused" else keras.run_group(specs)
    # The last evaluation point: a diverged trial's row has no final accuracy, its last point does.
    return np.array([r.points[-1].test_accuracy for r in results])


@pytest.fixture(scope="module")
def chaotic():
    return final_accuracy("keras", 0.3), final_accuracy("fused", 0.3)


def test_stable_cell_final_accuracy_matches_seed_by_seed():
    ours, reference = final_accuracy("fused", 0.01), final_accuracy("keras", 0.01)
    # Each seed within 2 test rows of 500; the means within half a row.
    assert np.abs(ours - reference).max() <= 0.004 + 1e-9, (ours, reference)
    assert abs(ours.mean() - reference.mean()) <= 0.001, (ours, reference)


def test_chaotic_cell_final_accuracy_has_the_same_distribution(chaotic):
    reference, ours = chaotic
    assert reference.std() > 0.03  # chaotic indeed: else this test would only repeat the stable one
    assert mannwhitneyu(ours, reference).pvalue > 0.05, (ours, reference)
    spread = np.sqrt((ours.var(ddof=1) + reference.var(ddof=1)) / len(SEEDS))
    assert abs(ours.mean() - reference.mean()) < 2.5 * spread, (ours, reference)


def test_chaotic_check_rejects_another_rate(chaotic):
    reference, _ = chaotic
    other = final_accuracy("fused", 0.1)
    assert mannwhitneyu(other, reference).pvalue < 0.01, (other, reference)
