"""A data set as an installed package would provide it (tests/test_datasets.py registers
``spiral`` as an entry point in-process): a callable taking the ProblemConfig, returning (x, labels)."""
import numpy as np


def spiral(problem):
    """Two interleaved spirals, n_samples rows, drawn from random_state."""
    rng = np.random.default_rng(problem.random_state)
    n = problem.n_samples
    labels = np.arange(n) % 2
    t = rng.uniform(0.5, 3.0 * np.pi, n)
    x = np.stack([t * np.cos(t + np.pi * labels), t * np.sin(t + np.pi * labels)], axis=1)
    return x + rng.normal(0.0, 0.2, x.shape), labels
