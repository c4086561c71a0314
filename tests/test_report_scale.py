"""The report on dense grids: figures of a 100-learning-rate study stay a readable size and say
which panels they draw, a heatmap past its label limit keeps colour bar and log ticks but no
per-cell text, the report reads only the columns it uses, and a 5,000-trial folder reports in
seconds (a quadratic blow-up, as a shared axis per learning rate was, takes minutes)."""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from harness import analysis, reporter
from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.figures import (LABEL_MAX_RATES, LABEL_MAX_SIZES, SPACED_RATES, choose_rates, log_spaced, lr_text,
                             plot_accuracy_heatmap, plot_learning_curves)
from harness.grid import TrialSpec
from harness.results import EpochRecord, PointRecord, TrialResult
from harness.scaling_figures import plot_best_learning_rate, plot_stability
from harness.store import (EPOCHS, POINTS, TRIALS, read_epochs, read_points, read_trials, write_results,
                           write_run_metadata)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
DPI = 150  # what save_figures writes PNGs at
MAX_PX = 4000  # the largest side a figure may have at that resolution
RATES = tuple(float(r) for r in np.geomspace(1e-4, 1.0, 100))


def dense_result(bs: int, lr: float, seed: int, epochs: int = 3, n_val: int = 200) -> TrialResult:
    """A trial with epochs and update-clock points: accuracy climbs as 0.35 + 0.5 (1 - exp(-k u)),
    k growing with lr and batch size up to 32; large rates at small batches diverge in epoch 1."""
    problem, train = ProblemConfig(n_val=n_val), TrainConfig(epochs=epochs)
    spec = TrialSpec(problem=problem, model=ModelConfig(), train=train, batch_size=bs, learning_rate=lr, seed=seed)
    per, rate = spec.updates_per_epoch, lr * min(bs, 32) * 0.02
    rng = np.random.default_rng([bs, int(lr * 1e9), seed])
    diverged = lr * min(bs, 64) ** 0.5 > 2.0 and rng.random() < 0.8
    records, points = [], [PointRecord(0, 0, 0.0, 1.1, 0.33, 1.1, 0.33, 1.1, 0.33, 0.5, 40.0, 80.0)]
    for e in range(1, (1 if diverged else epochs) + 1):
        u = e * per
        acc = 0.35 + 0.5 * (1 - math.exp(-rate * u)) + rng.normal(0, 0.004)
        loss = math.nan if diverged else 1.0 - acc
        records.append(EpochRecord(e, loss, acc + 0.01, loss, acc, e * 0.01, u))
        grad_sq = 0.5 * math.exp(-rate * u) + 0.01
        points.append(PointRecord(u, e * problem.n_train, e * 0.01, loss, acc, loss, acc + rng.normal(0, 0.004),
                                  loss, acc, grad_sq, 40.0, 40.0 / grad_sq))
    last, ok = records[-1], not diverged
    return TrialResult(spec=spec, status="ok" if ok else "diverged", error=None if ok else "loss became non-finite",
                       train_accuracy=last.accuracy if ok else math.nan, test_accuracy=last.val_accuracy if ok else math.nan,
                       val_accuracy=points[-1].val_accuracy if ok else math.nan, train_loss=last.loss,
                       test_loss=last.val_loss, epochs_run=len(records), updates=last.updates,
                       examples_seen=len(records) * problem.n_train, wall_clock_s=last.elapsed_s,
                       first_epoch_s=records[0].elapsed_s, group_size=1, group_wall_clock_s=last.elapsed_s,
                       engine_version="keras", hostname="node-a", started_at=T0, finished_at=T0,
                       epochs=tuple(records), points=tuple(points))


def write_dense(results: Path, sizes, rates=RATES, seeds=2, part: int = 2000, **kwargs) -> int:
    """Every (batch size, rate, seed) trial, written as the driver would: parts of ``part`` trials."""
    rows = [dense_result(bs, lr, s, **kwargs) for bs in sizes for lr in rates for s in range(seeds)]
    for seq, start in enumerate(range(0, len(rows), part)):
        write_results(results, rows[start:start + part], "run-dense", seq)
    write_run_metadata(results, {"run_id": "run-dense", "host": "node-a", "grid_path": "", "grid_sha256": ""})
    return len(rows)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """3 batch sizes x 100 learning rates x 2 seeds, 3 epochs: trials and epochs frames."""
    results = tmp_path_factory.mktemp("dense") / "results"
    write_dense(results, sizes=(8, 64, 500))
    return read_trials(results), read_epochs(results)


def pixels(fig: Figure) -> tuple[float, float]:
    width, height = fig.get_size_inches()
    return width * DPI, height * DPI


def all_text(fig: Figure) -> str:
    """Every piece of text a figure draws (titles, captions, legend titles, labels), with line
    breaks as spaces: captions are wrapped to the figure's width."""
    return " ".join(" ".join(t.get_text().split()) for t in fig.findobj(lambda a: hasattr(a, "get_text")))


# ---- the rule for which learning rates are drawn -----------------------------------------------

def test_log_spaced_keeps_both_ends_and_spreads_in_log():
    assert log_spaced(RATES, 4) == [RATES[0], RATES[33], RATES[66], RATES[99]]
    assert log_spaced([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048], 4) == [1, 16, 128, 2048]
    assert log_spaced([0.1, 0.01], 4) == [0.01, 0.1]  # few: all of them, sorted


def test_a_dense_grid_draws_each_batch_size_best_rate_and_a_few_log_spaced(dense):
    trials, _ = dense
    choice = choose_rates(trials)
    assert not choice.every_rate and len(choice.rates) == SPACED_RATES and choice.tried == 100
    assert choice.rates[0] == RATES[0] and choice.rates[-1] == RATES[-1]
    # The best rate: highest mean final validation accuracy among rates where no seed diverged.
    ok = trials.groupby(["batch_size", "learning_rate"]).filter(lambda g: (g["status"] == "ok").all())
    expect = ok.groupby(["batch_size", "learning_rate"])["val_accuracy"].mean().groupby(level=0).idxmax()
    assert choice.best == {bs: lr for bs, (_, lr) in expect.items()}
    assert "each batch size's best" in choice.caption and "4 log-spaced over the 100 tried" in choice.caption
    assert "left out" in choice.caption
    small = choose_rates(trials[trials["learning_rate"].isin(RATES[:3])])
    assert small.every_rate and small.rates == RATES[:3] and small.caption.startswith("every learning rate tried")


# ---- figures of a 100-learning-rate study -------------------------------------------------------

def test_learning_curves_of_100_rates_stay_small_and_say_what_they_left_out(dense):
    trials, epochs = dense
    fig = plot_learning_curves(trials, epochs)
    assert max(pixels(fig)) <= MAX_PX
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == (1 + SPACED_RATES) * 3  # a best-rate row and 4 log-spaced rows, 3 batch sizes
    rows = [ax.get_ylabel().split("\n")[0] for ax in panels[::3]]
    assert rows == ["best lr", "lr 1", "lr 4.6e-2", "lr 2.2e-3", "lr 1e-4"]
    text = all_text(fig)
    assert "each batch size's best" in text and "the other" in text and "left out" in text
    best = choose_rates(trials).best
    assert all(f"best lr {lr_text(best[bs])}" in text for bs in (8, 64, 500))


def test_learning_curves_show_at_most_ten_batch_sizes_and_name_the_others(tmp_path):
    sizes = (1, 2, 4, 8, 16, 32, 64, 100, 128, 200, 256, 400, 500)
    results = tmp_path / "wide"
    write_dense(results, sizes=sizes, rates=(0.01,), seeds=1, epochs=2)
    fig = plot_learning_curves(read_trials(results), read_epochs(results))
    assert max(pixels(fig)) <= MAX_PX
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 10 and titles[0] == "batch size 1" and titles[-1] == "batch size 500"
    assert "10 log-spaced of the 13 tried (3 left out:" in all_text(fig)


def test_a_heatmap_past_the_label_limit_has_no_cell_text_but_a_colour_bar_and_log_ticks(dense):
    trials, _ = dense
    assert trials["learning_rate"].nunique() > LABEL_MAX_RATES
    fig = plot_accuracy_heatmap(trials)
    assert max(pixels(fig)) <= MAX_PX
    ax, bar = fig.axes  # the map and its colour bar
    assert len(ax.texts) == 0 and bar.get_ylabel() == "final test accuracy, mean over ok seeds"
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    assert ticks == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # log-spaced, not one per rate
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["8", "64", "500"]
    caption = all_text(fig)
    assert f"past {LABEL_MAX_RATES} rates or {LABEL_MAX_SIZES} batch sizes the per-cell numbers" in caption
    assert "100 learning rates × 3 batch sizes" in caption
    # Every cell is still there: 100 x 3 values, masked where no seed finished ok.
    values = ax.collections[0].get_array()
    assert values.size == 300 and values.count() == int(
        trials[trials["status"] == "ok"].groupby(["batch_size", "learning_rate"]).ngroups)


def test_stability_and_best_rate_figures_of_100_rates_stay_readable(dense):
    trials, epochs = dense
    stability = plot_stability(trials, epochs)
    assert max(pixels(stability)) <= MAX_PX
    labels = stability.axes[-1].get_legend_handles_labels()[1]
    assert labels == ["1e-4", "2.2e-3", "4.6e-2", "1", "best lr of each batch size"]
    assert "4 log-spaced over the 100 tried" in all_text(stability)
    best = plot_best_learning_rate(trials, epochs)
    ax = best.axes[0]
    assert len(ax.get_lines()) < 10  # no line per rate tried: they are marks on the edge
    low, high = ax.get_ylim()
    assert len([t for t in ax.get_yticks() if low <= t <= high]) <= 10
    assert "the 100 rates tried are grey marks on the right edge, with log ticks (past 16 rates" in all_text(best)
    assert [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high] == [
        "1e-4", "1e-3", "1e-2", "0.1", "1"]


# ---- the report: columns read, and time on a 5,000-trial folder -------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """5 batch sizes x 100 learning rates x 10 seeds = 5,000 trials, 3 epochs, in parts of 2,000."""
    results = tmp_path_factory.mktemp("big") / "results"
    assert write_dense(results, sizes=(1, 8, 32, 128, 500), seeds=10) == 5000
    return results


def test_a_5000_trial_folder_reports_in_seconds_with_every_figure_small(big, tmp_path, monkeypatch):
    asked: list[tuple[str, tuple | None]] = []
    handed: dict[str, set] = {}
    real_read, real_curves = reporter.read_table, reporter.plot_learning_curves

    def read_table(results_dir, kind, columns=None, **kwargs):
        asked.append((kind, None if columns is None else tuple(columns)))
        return real_read(results_dir, kind, columns, **kwargs)

    def plot_learning_curves(trials, epochs, *args, **kwargs):
        handed.update(trials=set(trials.columns), epochs=set(epochs.columns))
        return real_curves(trials, epochs, *args, **kwargs)

    monkeypatch.setattr(reporter, "read_table", read_table)
    monkeypatch.setattr(reporter, "plot_learning_curves", plot_learning_curves)
    start = time.perf_counter()
    reporter.write_report(big, tmp_path / "report")
    seconds = time.perf_counter() - start
    # About 10 s on 2 busy cores; the report before the dense-grid rules took minutes here.
    assert seconds < 60, f"report of 5,000 trials took {seconds:.0f} s"

    # Only the columns some figure or table uses are read; the rest stay on disk.
    columns = dict(asked)
    assert set(columns) == {TRIALS, EPOCHS, POINTS, "probes"}
    assert columns[TRIALS] is not None and not {"error", "started_at", "finished_at", "engine_version",
                                                  "node_id", "first_epoch_s"} & set(columns[TRIALS])
    assert set(columns[EPOCHS]) == {"trial_id", "epoch", "accuracy", "val_accuracy", "elapsed_s", "updates"}
    assert not {"grad_sq", "trace_sigma", "val_loss", "test_loss", "train_accuracy"} & set(columns[POINTS])
    assert handed["epochs"] == set(columns[EPOCHS]) and handed["trials"] == set(columns[TRIALS])

    report = (tmp_path / "report" / "report.md").read_text()
    assert "Skipped" not in report and "### Critical batch size" in report
    for png in sorted((tmp_path / "report").glob("*.png")):
        with Image.open(png) as image:
            assert max(image.size) <= MAX_PX, (png.name, image.size)
    table = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert len(table) == 500 and table["trials"].sum() == 5000  # the table keeps every cell


def test_the_frames_the_report_reads_join_on_one_integer_key(big):
    trials, epochs, points, probes = reporter.read_frames(big)
    assert len(trials) == 5000 and trials["trial_id"].tolist() == list(range(5000))
    assert epochs["trial_id"].dtype == np.int64 and epochs["trial_id"].isin(trials["trial_id"]).all()
    assert points["trial_id"].isin(trials["trial_id"]).all() and probes.empty
    # The same clocks as from the frames read_trials and friends return, string ids and all.
    order = ["batch_size", "learning_rate", "seed"]
    by_key, by_id = (analysis.enrich(t, e, 0.8, p).drop(columns="trial_id").sort_values(order).reset_index(drop=True)
                     for t, e, p in ((trials, epochs, points), (read_trials(big), read_epochs(big), read_points(big))))
    pd.testing.assert_frame_equal(by_key, by_id[by_key.columns])
