"""Critical-batch-size figures (harness.critical_figures) on synthetic studies with known answers:
steps S = S_min(1 + B_crit/B) per batch size, fitted with harness.critical as the report does."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from harness import critical
from harness.critical_figures import (_num, plot_critical_vs_noise, plot_learning_rate_scaling,
                                      plot_noise_scale_collapse, plot_steps_to_target, plot_steps_vs_examples)
from harness.scaling import Selection, TargetFit

SIZES = 2 ** np.arange(1, 10)  # 2..512
VALIDATION = Selection("val_accuracy", "validation")
TEST_ONLY = Selection("test_accuracy", "test")


def make_fit(metric: str, target: float, b_crit: float, s_min: float = 100.0, never=(), seeds: int = 4,
             rng_seed: int = 0) -> TargetFit:
    """A TargetFit as scaling.target_fits builds it, from noisy synthetic cells: steps follow the
    frontier × a learning-rate penalty × lognormal noise; batch sizes in ``never`` never reach."""
    rng = np.random.default_rng(rng_seed)
    rows = [{"trial_id": f"{b}-{j}-{s}", "batch_size": int(b), "learning_rate": 0.01 * 2 ** j, "seed": s,
             "momentum": 0.9, "status": "ok",
             "steps": math.inf if b in never else float(math.ceil(s_min * (1 + b_crit / b) * pen
                                                                  * math.exp(rng.normal(0, 0.08))))}
            for b in SIZES for j, pen in enumerate((1.0, 1.5, 2.4)) for s in range(seeds)]
    cells = pd.DataFrame(rows)
    best = critical.best_steps(cells)
    best = best.assign(examples=best["steps"] * best["batch_size"],
                       b_simple=np.where(np.isfinite(best["steps"]), 0.4 * b_crit * (1 + 0.05 * np.arange(len(best))),
                                         np.nan))
    higher = metric != "train_loss"
    try:
        interval, reason = critical.bootstrap_frontier(cells, n_boot=200), ""
    except ValueError as exc:
        interval, reason = None, str(exc)
    return TargetFit(metric, target, higher, best, interval, reason)


@pytest.fixture(scope="module")
def fits() -> list[TargetFit]:
    return [make_fit("val_accuracy", 0.6, 16.0), make_fit("val_accuracy", 0.75, 64.0, rng_seed=1),
            make_fit("val_accuracy", 0.85, 128.0, never=(512,), rng_seed=2),
            make_fit("train_loss", 0.3, 48.0, s_min=60.0, rng_seed=3),
            make_fit("train_loss", 0.2, 5000.0, s_min=20.0, rng_seed=6),  # B_crit far beyond the batch sizes
            make_fit("train_loss", 0.1, 96.0, s_min=200.0, never=tuple(SIZES[2:]), rng_seed=4)]


def make_trials(rates=10 ** np.arange(-3, 0.01, 0.5), sizes=(1, 8, 32, 128, 512), seeds: int = 3) -> pd.DataFrame:
    """Accuracy peaks at g = lr·N/(B(1-m)) = 40 whatever the batch size; rates above 0.5 diverge
    below B = 64, and at B = 1 every rate diverges."""
    rng = np.random.default_rng(5)
    rows = []
    for b in sizes:
        for lr in rates:
            for seed in range(seeds):
                g = critical.sgd_noise_scale(lr, 1000, b, 0.9)
                diverged = b == 1 or (lr > 0.5 and b < 64)
                acc = np.nan if diverged else 0.93 - 0.05 * (math.log10(g) - math.log10(40)) ** 2 + rng.normal(0, 0.005)
                rows.append({"trial_id": f"{b}-{lr:.4g}-{seed}", "batch_size": b, "learning_rate": float(lr),
                             "seed": seed, "momentum": 0.9, "n_train": 1000, "test_accuracy": acc,
                             "val_accuracy": acc, "status": "diverged" if diverged else "ok"})
    rows.append({**rows[-1], "trial_id": "failed", "status": "failed", "test_accuracy": np.nan})
    return pd.DataFrame(rows)


def texts(fig: Figure) -> str:
    """Every text drawn in the figure, whitespace collapsed (wrapped captions read as one line)."""
    fig.draw_without_rendering()
    return " ".join(" ".join(t.get_text().split()) for t in fig.findobj(Text))


def save(fig: Figure, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_numbers_are_compact():
    assert [_num(v) for v in (0.031623, 0.001, 0.1, 0.316, 37.2, 1234.5, 4.5e7, 3.0)] == \
        ["3.2e-2", "1e-3", "0.1", "0.32", "37", "1,234", "4.5e7", "3"]


def test_steps_to_target_shows_each_fitted_b_crit_and_the_unreached(fits, tmp_path):
    fig = plot_steps_to_target(fits, VALIDATION, note="synthetic")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # accuracy panel, training-loss panel
    labels = legend_texts(fig)
    for fit in fits:
        [label] = [x for x in labels if x.startswith(fit.label + ":")]
        if fit.interval is None:
            assert "no fit" in label
            continue
        shown = float(re.search(r"B_crit = ([\d,.]+)", label).group(1).replace(",", ""))
        assert shown == pytest.approx(fit.interval.frontier.b_crit, rel=0.05)
        assert ("(extrapolated)" in label) == fit.interval.frontier.extrapolated
    # the synthetic truth is recovered: B_crit 64 for the second accuracy target
    assert fits[1].interval.b_crit[0] < 64 < fits[1].interval.b_crit[1]
    assert fits[4].interval.frontier.extrapolated and fits[4].interval.frontier.b_crit > 512
    every = texts(fig)
    assert VALIDATION.caption in every
    assert "resolution: one clock point" in every
    assert "no fit for train loss <= 0.1: the S = S_min(1 + B_crit/B) fit needs" in every
    assert "perfect scaling" in every and "diminishing returns" in every
    accuracy, loss = fig.axes
    [marks] = [c for c in accuracy.collections if c.get_gid() == "not reached"]
    assert marks.get_offsets()[:, 0].tolist() == [512]
    [marks] = [c for c in loss.collections if c.get_gid() == "not reached"]
    assert sorted(marks.get_offsets()[:, 0].tolist()) == [float(b) for b in SIZES[2:]]
    [arrow] = [c for c in loss.collections if c.get_gid() == "b_crit off axis"]  # B_crit beyond the right edge
    assert arrow.get_offsets()[0, 0] == pytest.approx(loss.get_xlim()[1])
    save(fig, tmp_path, "steps_to_target")


def test_steps_vs_examples_draws_the_frontier_per_target(fits, tmp_path):
    fig = plot_steps_vs_examples(fits, TEST_ONLY)
    assert len(fig.axes) == 2
    every = texts(fig)
    assert TEST_ONLY.caption in every and "resolution: one clock point" in every
    accuracy = fig.axes[0]
    hardest = fits[2].interval.frontier
    assert any(line.get_ydata()[0] == hardest.s_min for line in accuracy.get_lines())  # dashed S_min asymptote
    assert f"S_min = {_num(hardest.s_min, 3)} updates" in every
    # measured (E, S) points for each target, and one frontier curve per fitted target
    points = [ln for ln in accuracy.get_lines() if ln.get_marker() == "o"]
    assert sorted(len(ln.get_xdata()) for ln in points) == [len(SIZES) - 1, len(SIZES), len(SIZES)]
    curves = [ln for ln in accuracy.get_lines() if len(ln.get_xdata()) == 200]
    assert len(curves) == 3
    e, s = np.asarray(curves[1].get_xdata()), np.asarray(curves[1].get_ydata())
    f = fits[1].interval.frontier
    np.testing.assert_allclose((s / f.s_min - 1) * (e / f.e_min - 1), 1.0, rtol=1e-9)
    save(fig, tmp_path, "steps_vs_examples")


def test_steps_figures_draw_without_any_frontier(tmp_path):
    lonely = make_fit("val_accuracy", 0.9, 64.0, never=tuple(SIZES[2:]))
    assert lonely.interval is None
    for plot in (plot_steps_to_target, plot_steps_vs_examples):
        fig = plot([lonely], VALIDATION)
        assert len(fig.axes) == 1
        assert "no fit for val accuracy >= 0.9: the S = S_min(1 + B_crit/B) fit needs" in texts(fig)
    assert len(plot_steps_to_target([], VALIDATION).axes) == 1


def make_curve() -> pd.DataFrame:
    rows = []
    for b in (8, 64, 512):
        for u in np.unique(np.round(np.geomspace(1, 4000, 25))):
            loss = 0.04 + 1.06 * math.exp(-u * b ** 0.3 / 400)
            mid = 20 / loss ** 0.8 * (1 + b / 2000)
            rows.append({"batch_size": b, "updates": u, "train_loss": loss, "b_simple_median": mid,
                         "b_simple_low": mid * 0.8, "b_simple_high": mid * 1.25})
    return pd.DataFrame(rows)


def test_critical_vs_noise_compares_b_crit_with_b_simple(fits, tmp_path):
    fig = plot_critical_vs_noise(fits, make_curve(), VALIDATION)
    assert len(fig.axes) == 2
    every = texts(fig)
    assert "B_simple = tr(Σ)/|G|², exact per-example gradients over all training rows" in every
    assert VALIDATION.caption in every
    left, right = fig.axes
    ticks = [t.get_text() for t in left.get_xticklabels()]
    assert len(ticks) == len(fits)
    b_simple, b_crit = float(fits[1].best["b_simple"].median()), fits[1].interval.frontier.b_crit
    assert f"ratio {b_simple / b_crit:.2g}" in ticks[1] and "no fit" in ticks[-1]
    assert f"B_crit {_num(fits[3].interval.frontier.b_crit)}" in every  # the training-loss targets on the right
    assert right.xaxis_inverted() and right.get_yscale() == "log"
    assert len([ln for ln in right.get_lines() if ln.get_gid() == "b_simple"]) == 3  # one per batch size
    save(fig, tmp_path, "critical_vs_noise")


def best_learning_rates(trials: pd.DataFrame) -> pd.DataFrame:
    """Per batch size the rate with the highest mean accuracy among those where no seed diverged."""
    per = trials.groupby(["batch_size", "learning_rate"]).agg(
        acc=("val_accuracy", "mean"), bad=("status", lambda s: (s == "diverged").any())).reset_index()
    per = per[~per["bad"]].sort_values("acc").drop_duplicates("batch_size", keep="last")
    return pd.DataFrame({"batch_size": sorted(trials["batch_size"].unique())}).merge(
        per[["batch_size", "learning_rate"]], how="left")


def test_learning_rate_scaling_has_compact_ticks_and_marks_the_edges(tmp_path):
    trials = make_trials()
    best, stable = best_learning_rates(trials), critical.largest_stable_lr(trials)
    rates = sorted(trials["learning_rate"].unique())
    assert best["learning_rate"].isna().sum() == 1  # B = 1: every rate diverged
    fig = plot_learning_rate_scaling(best, stable, rates, TEST_ONLY)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    every = texts(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "3.2e-2" in labels and "1e-3" in labels and "0.1" in labels
    assert not [x for x in labels if re.search(r"\d\.\d{3,}", x)]
    assert TEST_ONLY.caption in every
    assert "linear lr ∝ B (Goyal et al. 2017)" in every and "√B" in every
    [edge] = [c for c in ax.collections if c.get_gid() == "edge"]  # red x: winner on the edge of the grid
    assert len(edge.get_offsets()) and set(edge.get_offsets()[:, 1]) <= {rates[0], rates[-1]}
    assert "stable at every rate tried" in every  # B >= 64 never diverged
    [top] = [c for c in ax.collections if c.get_gid() == "not reached" and c.get_offsets()[0, 1] > 0.5]
    assert top.get_offsets()[:, 0].tolist() == [1]
    save(fig, tmp_path, "learning_rate_scaling")


DENSE_RATES = np.geomspace(1e-4, 1.0, 100)


def test_learning_rate_scaling_of_100_rates_marks_them_on_the_edge_with_decade_ticks(tmp_path):
    trials = make_trials(DENSE_RATES)
    best, stable = best_learning_rates(trials), critical.largest_stable_lr(trials)
    fig = plot_learning_rate_scaling(best, stable, DENSE_RATES, TEST_ONLY)
    every = texts(fig)
    ax = fig.axes[0]
    # A grey line per rate was 100 lines (105 in all) and 8 ticks at odd rates (3.4e-4, 1.1e-3, ...).
    assert len(ax.get_lines()) < 10
    [marks] = [c for c in ax.collections if c.get_gid() == "rates tried"]
    assert len(marks.get_offsets()) == 100 and set(marks.get_offsets()[:, 0]) == {1.0}  # on the right edge
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert labels == ["1e-4", "1e-3", "1e-2", "0.1", "1"]
    assert len([t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]) <= 30
    assert "the 100 rates tried are grey marks on the right edge, with log ticks (past 16 rates" in every
    assert "grey: rates tried" not in ax.get_ylabel()
    save(fig, tmp_path, "learning_rate_scaling_dense")


def test_noise_scale_collapse_of_a_dense_grid_rasterizes_the_trials(tmp_path):
    trials = make_trials(DENSE_RATES, seeds=10)  # 5,000 trials
    fig = plot_noise_scale_collapse(trials, TEST_ONLY)
    ax = fig.axes[0]
    per_trial = [c for c in ax.collections if c.get_gid() in ("trials", "diverged")]
    assert len(per_trial) == 2 and all(c.get_rasterized() for c in per_trial)
    assert not any(t.get_rasterized() for t in fig.findobj(Text))  # text and axes stay vector
    assert all(ln.get_marker() in ("", "None", None) for ln in ax.get_lines())  # 100 markers a line overprint
    assert "without markers past 16 rates" in texts(fig)
    path = tmp_path / "noise_scale_collapse.svg"
    fig.savefig(path)
    # As vector markers this SVG was 0.9 MB (100,000 trials: 15.7 MB); rasterized about 0.14 MB.
    assert path.stat().st_size < 300_000 and path.read_text().count("<image") == 2


def test_noise_scale_collapse_plots_every_trial(tmp_path):
    trials = make_trials()
    fig = plot_noise_scale_collapse(trials, VALIDATION)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    every = texts(fig)
    assert "g = learning rate × N / (B (1 − momentum))" in every and "one ok trial's final test accuracy" in every
    assert VALIDATION.caption in every
    [crosses] = [c for c in ax.collections if c.get_gid() == "diverged"]
    assert len(crosses.get_offsets()) == (trials["status"] == "diverged").sum()
    ok = trials[trials["status"] == "ok"]
    assert len(ax.collections[0].get_offsets()) == len(ok)
    medians = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(medians) == ok["batch_size"].nunique()
    save(fig, tmp_path, "noise_scale_collapse")


def test_edge_cases_still_draw(tmp_path):
    """No targets at all, no B_simple curve, two momenta and a dense grid of rates."""
    empty = pd.DataFrame(columns=["batch_size", "updates", "train_loss", "b_simple_median", "b_simple_low",
                                  "b_simple_high"])
    assert len(plot_critical_vs_noise([], empty, VALIDATION).axes) == 2
    assert len(plot_steps_vs_examples([], VALIDATION).axes) == 1
    trials = make_trials()
    both = pd.concat([trials, trials.assign(momentum=0.0, trial_id=trials["trial_id"] + "-m0")], ignore_index=True)
    fig = plot_noise_scale_collapse(both, VALIDATION)
    assert "B = 8, momentum 0" in texts(fig) and "B = 8, momentum 0.9" in texts(fig)
    rates = list(10 ** np.linspace(-4, 0, 17))
    fig = plot_learning_rate_scaling(best_learning_rates(trials), critical.largest_stable_lr(both), rates, VALIDATION)
    fig.draw_without_rendering()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert 3 <= len(labels) <= 9 and not [x for x in labels if re.search(r"\d\.\d{3,}", x)]
    assert "largest stable lr (momentum 0)" in texts(fig)
    save(fig, tmp_path, "learning_rate_scaling_edge")


def test_an_interval_that_misses_the_fit_still_draws():
    """A percentile bootstrap interval can lie wholly on one side of the full-data fit; the bar
    must not ask matplotlib for a negative length (a traceback in the report on a dense grid)."""
    from matplotlib.figure import Figure

    from harness import critical
    from harness.critical_figures import _b_crit_bar

    frontier = critical.Frontier(s_min=10.0, e_min=400.0, b_crit=40.0, n_points=5, residual_rms=0.1,
                                 b_min=1.0, b_max=500.0)
    interval = critical.FrontierInterval(frontier=frontier, b_crit=(45.0, 60.0), s_min=(9.0, 11.0),
                                         e_min=(350.0, 450.0), level=0.95, n_boot=100, n_failed=0)
    ax = Figure().subplots()
    _b_crit_bar(ax, 0.0, interval, "C0", "B_crit")
    (bar,) = [c for c in ax.containers]
    low, high = bar.lines[2][0].get_segments()[0][:, 1]
    assert (low, high) == (40.0, 60.0)  # from the point up to the interval's far end
