"""Studies side by side (harness.comparison_figures) and the figures an optimizer other than SGD
skips or reads at its real rate."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from harness import analysis
from harness.comparison_figures import best_per_study, has_comparison, plot_study_comparison
from harness.schema import CONFIG_COLUMNS


def synthetic(optimizer: str, best_rate: dict[int, float], seeds: int = 4) -> pd.DataFrame:
    """Trials whose validation accuracy peaks at ``best_rate[batch size]`` and whose test
    accuracy is 0.8 + 0.01 * seed there (0.5 elsewhere), every config column at its default."""
    defaults = {name: None for name, _, _ in CONFIG_COLUMNS}
    from harness.config import ModelConfig, ProblemConfig, TrainConfig

    for section in (ProblemConfig(), ModelConfig(), TrainConfig()):
        defaults.update(vars(section))
    rows = []
    for (size, best), rate, seed in itertools.product(best_rate.items(), (0.001, 0.01, 0.1), range(seeds)):
        hit = rate == best
        rows.append({**defaults, "optimizer": optimizer, "batch_size": size, "learning_rate": rate, "seed": seed,
                     "status": "ok", "val_accuracy": 0.9 if hit else 0.6,
                     "test_accuracy": 0.8 + 0.01 * seed if hit else 0.5, "trial_id": f"{optimizer}-{size}-{rate}-{seed}"})
    return pd.DataFrame(rows)


def test_best_per_study_picks_each_batch_sizes_rate_on_validation_and_flags_the_edges():
    studies = analysis.split_studies(pd.concat([synthetic("sgd", {8: 0.01, 64: 0.1}),
                                                synthetic("adam", {8: 0.001, 64: 0.01})]))
    table = best_per_study(studies).set_index(["study", "batch_size"])
    assert table.loc[("optimizer=sgd", 64), "learning_rate"] == 0.1
    assert table.loc[("optimizer=adam", 8), "learning_rate"] == 0.001
    assert table.loc[("optimizer=adam", 64), "learning_rate"] == 0.01
    assert table["edge"].tolist() == [True, False, False, True]  # adam 8 (0.001), adam 64, sgd 8, sgd 64 (0.1)
    cell = table.loc[("optimizer=sgd", 8)]
    test = 0.8 + 0.01 * np.arange(4)
    half = 3.182446305284263 * test.std(ddof=1) / 2  # Student t, 3 degrees of freedom, 95 %
    assert cell["test_mean"] == pytest.approx(test.mean())
    assert (cell["test_low"], cell["test_high"]) == pytest.approx((test.mean() - half, test.mean() + half))
    assert cell["seeds"] == 4


def test_comparison_needs_two_studies_and_draws_a_line_per_study():
    sgd, adam = synthetic("sgd", {8: 0.01, 64: 0.1}), synthetic("adam", {8: 0.001, 64: 0.01})
    assert not has_comparison(analysis.split_studies(sgd))
    studies = analysis.split_studies(pd.concat([sgd, adam]))
    assert has_comparison(studies)
    fig = plot_study_comparison(studies)
    acc_ax, lr_ax = fig.axes[:2]
    assert sorted(t.get_text() for t in acc_ax.get_legend().get_texts()) == ["optimizer=adam", "optimizer=sgd"]
    assert len(lr_ax.get_lines()) == 2
    assert "validation split" in fig._supxlabel.get_text() and "optimizer" in fig._supxlabel.get_text()


def test_noise_scale_collapse_is_skipped_for_adam_and_drawn_for_sgd():
    from harness.reporter import _needs_sgd

    class Fake:  # what _needs_sgd reads of a reporter.Study
        def __init__(self, trials):
            self.trials, self.sizes, self.rates = trials, trials["batch_size"].nunique(), 3

        def planned(self, axis):
            return ""

    assert "optimizer is adam" in _needs_sgd(Fake(synthetic("adam", {8: 0.01, 64: 0.1})))
    assert _needs_sgd(Fake(synthetic("sgd", {8: 0.01, 64: 0.1}))) == ""


def test_peak_rate_applies_the_batch_size_scaling():
    trials = synthetic("sgd", {8: 0.01, 64: 0.1}).assign(learning_rate_scaling="linear", base_batch_size=32)
    peak = analysis.at_peak_rate(trials)
    assert (peak["learning_rate"] / trials["learning_rate"]).round(12).tolist() == \
        (trials["batch_size"] / 32).tolist()
    plain = synthetic("sgd", {8: 0.01, 64: 0.1})
    assert analysis.at_peak_rate(plain) is plain


def test_study_labels_leave_out_keys_the_study_does_not_read():
    """Constant and step schedules: decay_epochs varies (20 for step, the default 50 where unread)
    but only the step study's label may carry it."""
    constant = synthetic("sgd", {8: 0.01}).assign(schedule="constant", decay_epochs=50.0)
    step = synthetic("sgd", {8: 0.01}).assign(schedule="step", decay_epochs=20.0)
    labels = [label for label, _ in analysis.split_studies(pd.concat([constant, step]))]
    assert labels == ["schedule=constant", "schedule=step, decay_epochs=20"]
