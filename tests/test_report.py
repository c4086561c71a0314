"""The report: analysis numbers with known answers, every figure drawn and written, the command's
error exits, and end-to-end runs on results folders written through harness.store."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import analysis
from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.grid import TrialSpec
from harness.store import read_epochs, read_trials, write_results, write_run_metadata
from harness.results import EpochRecord, TrialResult

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def synthetic_result(bs: int, lr: float, seed: int, epochs: int = 30, diverge_at: int | None = None,
                     failed: bool = False, group_size: int = 1, engine: str = "keras",
                     train: TrainConfig | None = None, host: str = "node-a") -> TrialResult:
    """A trial whose test accuracy climbs as 0.35 + 0.5 (1 - exp(-rate * updates)), where the
    rate per update grows with the batch up to 32 (perfect scaling) and then stops growing."""
    train = train or TrainConfig(epochs=epochs, engine=engine)
    spec = TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=train,
                     batch_size=bs, learning_rate=lr, seed=seed)
    if failed:
        return TrialResult(spec=spec, status="failed", error="RuntimeError: boom", started_at=T0, finished_at=T0)
    per_epoch = spec.updates_per_epoch
    rate = lr * min(bs, 32) * 0.02
    wobble = np.random.default_rng([bs, int(lr * 1e6), seed])
    records = []
    for e in range(1, train.epochs + 1):
        u = e * per_epoch
        acc = 0.35 + 0.5 * (1 - math.exp(-rate * u)) + wobble.normal(0, 0.004)
        loss = math.nan if diverge_at and e >= diverge_at else 1.0 - acc
        records.append(EpochRecord(epoch=e, loss=loss, accuracy=acc + 0.01, val_loss=loss, val_accuracy=acc,
                                   elapsed_s=e * (0.01 + 0.0005 * per_epoch), updates=u))
        if diverge_at and e >= diverge_at:
            break
    if group_size > 1:
        # As the fused engine records it: every member carries the group's elapsed time, and
        # wall_clock_s is the group's time divided by the group size.
        records = [dataclasses.replace(r, elapsed_s=r.elapsed_s * group_size * 0.2) for r in records]
    last = records[-1]
    ok = diverge_at is None
    wall = last.elapsed_s / group_size
    return TrialResult(
        spec=spec, status="ok" if ok else "diverged", error=None if ok else "loss became non-finite",
        train_accuracy=last.accuracy if ok else math.nan, test_accuracy=last.val_accuracy if ok else math.nan,
        train_loss=last.loss, test_loss=last.val_loss, epochs_run=len(records), updates=last.updates,
        examples_seen=len(records) * 500, wall_clock_s=wall, first_epoch_s=records[0].elapsed_s,
        group_size=group_size, group_wall_clock_s=wall * group_size, engine_version=engine, hostname=host,
        started_at=T0, finished_at=T0 + timedelta(seconds=wall), epochs=tuple(records))


def write_study(results: Path, sizes=(1, 8, 64, 500), rates=(0.001, 0.01, 0.1), seeds=(0, 1, 2),
                run_id: str = "run-a", host: str = "node-a", **kwargs) -> list[TrialResult]:
    """A full synthetic grid written as the driver would: lr 0.1 diverges at batch size 1 for every
    seed and at batch size 8 for seed 0; one trial at (64, 0.001) failed."""
    out = []
    for bs in sizes:
        for lr in rates:
            for seed in seeds:
                diverge = 3 if (lr == 0.1 and bs == 1) or (lr == 0.1 and bs == 8 and seed == 0) else None
                failed = bs == 64 and lr == 0.001 and seed == 2
                out.append(synthetic_result(bs, lr, seed, diverge_at=diverge, failed=failed, host=host, **kwargs))
    write_results(results, out, run_id, 0)
    write_run_metadata(results, {"run_id": run_id, "host": host, "grid_path": "", "grid_sha256": ""})
    return out


def frames(results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_trials(results), read_epochs(results)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("study") / "results"
    write_study(results, epochs=15)
    return results


# ---- analysis: numbers with known answers -------------------------------------------------

def test_mean_ci_is_student_t_over_seeds():
    mean, low, high = analysis.mean_ci([0.80, 0.82, 0.84])
    # t(0.975, 2 dof) = 4.302653; sd = 0.02; half-width = 4.302653 * 0.02 / sqrt(3)
    assert mean == pytest.approx(0.82)
    assert high - mean == pytest.approx(0.0496828, abs=1e-6)
    assert mean - low == pytest.approx(0.0496828, abs=1e-6)
    assert analysis.mean_ci([0.7, math.nan, 0.9])[0] == pytest.approx(0.8)  # NaN (diverged) left out
    one = analysis.mean_ci([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in analysis.mean_ci([]))
    groups = pd.Series([0.80, 0.82, 0.84, 0.5], index=["a", "a", "a", "b"])
    bands = analysis.mean_ci_frame(groups.groupby(level=0))  # the vectorised form the curves use
    assert tuple(bands.loc["a", ["mean", "low", "high"]]) == pytest.approx(analysis.mean_ci([0.80, 0.82, 0.84]))
    assert bands.loc["b", "n"] == 1 and math.isnan(bands.loc["b", "low"])


def _curve(trial_id: str, accs, per_epoch: int, seconds_per_epoch: float = 0.5) -> pd.DataFrame:
    return pd.DataFrame({"trial_id": trial_id, "epoch": range(1, len(accs) + 1), "val_accuracy": accs,
                         "updates": [per_epoch * e for e in range(1, len(accs) + 1)],
                         "seconds": [seconds_per_epoch * e for e in range(1, len(accs) + 1)]})


def test_to_target_reads_the_three_clocks_at_the_first_crossing():
    curve = pd.concat([_curve("a", [0.5, 0.79, 0.80, 0.70, 0.9], per_epoch=16),
                       _curve("b", [0.5, 0.6, 0.7], per_epoch=4)])
    out = analysis.to_target(curve, 0.8).set_index("trial_id")
    assert out.loc["a"].tolist() == [3.0, 48.0, 1.5]  # epoch 3, 3 x 16 updates, 3 x 0.5 s
    assert all(math.isinf(v) for v in out.loc["b"])


def test_diverged_trials_never_reach_target_and_failed_ones_are_unknown(study):
    trials, epochs = frames(study)
    enriched = analysis.enrich(trials, epochs, 0.8).set_index(["batch_size", "learning_rate", "seed"])
    # (1, 0.1) diverges in epoch 3, after its test accuracy crossed 0.8: still 'never'
    assert math.isinf(enriched.loc[(1, 0.1, 0), "updates_to_target"])
    assert math.isnan(enriched.loc[(64, 0.001, 2), "updates_to_target"])  # the failed trial
    # (64, 0.1): rate 0.064 per update, 8 updates per epoch -> 0.35 + 0.5 (1 - e^-0.512 k) >= 0.8 at k = 5
    assert enriched.loc[(64, 0.1, 1), "epochs_to_target"] == 5
    assert enriched.loc[(64, 0.1, 1), "updates_to_target"] == 40


def _cells(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["batch_size", "learning_rate", "updates_to_target"])


def test_best_lr_by_updates_and_the_perfect_scaling_line():
    cells = _cells([(8, 0.01, 800), (8, 0.1, 400), (16, 0.01, 200), (16, 0.1, 200),
                    (32, 0.01, math.inf), (32, 0.1, math.inf), (64, 0.1, 100)])
    best = analysis.best_lr_by_clock(cells, "updates")
    assert best["learning_rate"].tolist()[:2] == [0.1, 0.01]  # 16: a tie goes to the smaller rate
    assert best["updates_to_target"].tolist()[:2] == [400, 200]
    assert math.isnan(best["learning_rate"].iloc[2]) and math.isinf(best["updates_to_target"].iloc[2])
    ideal = analysis.perfect_scaling(best)
    assert ideal["batch_size"].tolist() == [8, 16, 32, 64]
    assert ideal["updates_to_target"].tolist() == [400, 200, 100, 50]  # anchored at 8: 400 x 8 / b


def test_best_lr_by_accuracy_refuses_rates_where_a_seed_diverged():
    cells = pd.DataFrame({"batch_size": [8, 8, 8, 32, 32], "learning_rate": [0.001, 0.01, 0.1, 0.01, 0.1],
                          "diverged": [0, 0, 1, 2, 2], "test_acc_mean": [0.70, 0.80, 0.90, math.nan, 0.5]})
    best = analysis.best_lr_by_accuracy(cells)
    assert best.set_index("batch_size").loc[8, "learning_rate"] == 0.01  # 0.1 is more accurate but diverged once
    assert math.isnan(best.set_index("batch_size").loc[32, "learning_rate"])
    assert analysis.at_edge(best, cells["learning_rate"]).empty
    cells.loc[1, "diverged"] = 1
    best = analysis.best_lr_by_accuracy(cells)
    assert analysis.at_edge(best, cells["learning_rate"])["batch_size"].tolist() == [8]  # 0.001 wins: an edge


def test_cell_summary_counts_outcomes_and_averages_ok_seeds_only(study):
    trials, epochs = frames(study)
    cells = analysis.summarize_cells(analysis.enrich(trials, epochs, 0.8)).set_index(analysis.CELL)
    assert len(cells) == 12
    row = cells.loc[(8, 0.1)]
    assert (row["trials"], row["ok"], row["diverged"], row["failed"]) == (3, 2, 1, 0)
    assert row["share_diverged"] == pytest.approx(1 / 3)
    ok = trials.query("batch_size == 8 and learning_rate == 0.1 and status == 'ok'")["test_accuracy"]
    assert row["test_acc_mean"] == pytest.approx(ok.mean())
    assert (row["test_acc_ci_low"], row["test_acc_ci_high"]) == pytest.approx(analysis.mean_ci(ok)[1:])
    all_diverged = cells.loc[(1, 0.1)]
    assert all_diverged["share_diverged"] == 1 and math.isnan(all_diverged["test_acc_mean"])
    assert math.isinf(all_diverged["updates_to_target"])
    failed = cells.loc[(64, 0.001)]
    assert (failed["ok"], failed["failed"], failed["share_diverged"]) == (2, 1, 0)


def test_reference_values_only_beside_cells_of_the_reference_setting(tmp_path):
    results = tmp_path / "r"
    rows = [synthetic_result(32, 0.01, s, epochs=200) for s in (0, 1)] + [synthetic_result(32, 0.1, 0, epochs=200)]
    rows += [synthetic_result(32, 0.01, 0, train=TrainConfig(epochs=200, momentum=0.5))]
    write_results(results, rows, "run-r", 0)
    trials = read_trials(results)
    ref = analysis.load_reference()
    reference_setting = analysis.summarize_cells(trials[trials["momentum"] == 0.9], ref).set_index(analysis.CELL)
    assert reference_setting.loc[(32, 0.01), ["ref_train_accuracy", "ref_test_accuracy"]].tolist() == [0.832, 0.812]
    assert math.isnan(reference_setting.loc[(32, 0.1), "ref_test_accuracy"])  # no reference run there
    other = analysis.summarize_cells(trials[trials["momentum"] == 0.5], ref)
    assert other["ref_test_accuracy"].isna().all()


def test_packaged_reference_holds_the_four_published_runs_and_our_setting():
    packaged = json.loads((REPO / "harness" / "data" / "reference.json").read_text())
    # The tutorial's table (Brownlee, "How to Control the Speed and Stability of Training Neural
    # Networks With Batch Size"): (batch size, lr) -> (train, test) accuracy of its single runs.
    published = {(500, 0.01): (0.816, 0.830), (1, 0.01): (0.612, 0.606), (1, 0.001): (0.816, 0.824),
                 (32, 0.01): (0.832, 0.812)}
    assert {(r["batch_size"], r["learning_rate"]): (r["train_accuracy"], r["test_accuracy"])
            for r in packaged["runs"]} == published
    for key in ("n_samples", "centers", "n_features", "cluster_std", "random_state", "epochs"):
        assert analysis.REFERENCE_CONFIG[key] == packaged["problem"][key]


def test_completeness_against_the_plan_and_without_one(study):
    trials, _ = frames(study)
    some = trials[~((trials["batch_size"] == 500) & (trials["seed"] == 2))]
    inferred = analysis.completeness(some)
    assert inferred.planned is None and "3 of 12 cells" in inferred.note
    assert analysis.completeness(trials).note == ""
    planned = trials.assign(engine="fused")  # a run may override the grid's engine: still the same trials
    known = analysis.completeness(some, planned)
    assert (known.done, known.planned) == (33, 36)
    assert known.note == "partial: 33 of 36 planned trials on disk, 3 missing"
    assert known.expected[(500, 0.01)] == 3


# ---- figures: pure functions, checked through what they draw ------------------------------

def test_heatmap_marks_diverged_and_failed_cells_and_leaves_them_out_of_the_mean(study):
    from harness.figures import plot_accuracy_heatmap

    trials, _ = frames(study)
    fig = plot_accuracy_heatmap(trials)
    ax = fig.axes[0]
    rates = [float(t.get_text()) for t in ax.get_yticklabels()]
    sizes = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert rates == [0.1, 0.01, 0.001] and sizes == [1, 8, 64, 500]
    values = ax.collections[0].get_array().reshape(len(rates), len(sizes))
    assert np.ma.is_masked(values[0, 0])  # (1, 0.1): every seed diverged, no colour
    ok = trials.query("batch_size == 8 and learning_rate == 0.1 and status == 'ok'")["test_accuracy"]
    assert values[0, 1] == pytest.approx(ok.mean())
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [(p.get_x(), p.get_y()) for p in hatched] == [(0, 0)]
    framed = sorted((int(p.get_x()), int(p.get_y())) for p in ax.patches if not p.get_fill())
    assert framed == [(1, 0), (2, 2)]  # red frames: (8, 0.1) had a diverged seed, (64, 0.001) a failed one
    texts = [t.get_text() for t in ax.texts]
    assert "3 diverged" in texts
    assert any("(1 diverged)" in t for t in texts) and any("(1 failed)" in t for t in texts)


def test_heatmap_and_curves_show_pending_cells_of_a_partial_run(study):
    from harness.figures import plot_accuracy_heatmap, plot_learning_curves

    trials, epochs = frames(study)
    partial = trials[trials["batch_size"] != 500]
    done = analysis.completeness(partial, trials)
    heat = plot_accuracy_heatmap(partial, done.note, done.expected)
    assert [t.get_text() for t in heat.axes[0].texts].count("pending") == 3
    assert "27 of 36 planned trials on disk, 9 missing" in heat.get_suptitle()
    curves = plot_learning_curves(partial, epochs, done.note, done.expected)
    panels = [ax for ax in curves.axes if ax.get_title() or ax.get_ylabel() or ax.texts]
    assert len(curves.axes) == 12  # 4 batch sizes x 3 rates, the missing batch size included
    assert sum("3 pending" in t.get_text() for ax in panels for t in ax.texts) == 3


def test_log2_batch_size_axes_tick_the_batch_sizes_run(study):
    from harness.scaling_figures import plot_updates_to_target

    trials, epochs = frames(study)
    fig = plot_updates_to_target(trials, epochs, target=0.8)
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "64", "500"]
    updates = fig.axes[1]
    assert updates.get_yscale() == "log" and updates.yaxis.get_transform().base == 2
    ideal = next(line for line in updates.get_lines() if line.get_label() == "perfect scaling")
    x, y = ideal.get_data()
    assert np.allclose(np.asarray(x) * np.asarray(y), x[0] * y[0])  # updates x batch size is constant
    never = [c for c in updates.collections if c.get_label() == "never reaches target"]
    assert len(never) == 1 and never[0].get_offsets().shape[0] >= 1  # 500 never reaches 0.8 in 15 epochs


# ---- the report: files, notes and the command line ----------------------------------------

FIGURE_NAMES = ("data_set", "learning_curves", "accuracy_heatmap", "training_speed", "updates_to_target",
                "best_learning_rate", "stability", "steps_to_target", "steps_vs_examples", "critical_vs_noise",
                "learning_rate_scaling", "noise_scale_collapse")


def test_summary_table_counts_every_trial_and_marks_what_is_not_a_number(study):
    from harness.report_text import TABLE_COLUMNS, markdown_table, summary_table

    trials, epochs = frames(study)
    cells = analysis.summarize_cells(analysis.enrich(trials, epochs, 0.8), analysis.load_reference())
    table = summary_table(cells)
    assert list(table.columns) == list(TABLE_COLUMNS) and len(table) == 12
    assert table["trials"].sum() == len(trials) == 36
    text = markdown_table(table, 0.8)
    assert text.startswith("| batch size | lr | seeds (ok/div/fail) | train acc [95% CI] | test acc [95% CI] |")
    assert "epochs to 0.8 | updates to 0.8 | seconds to 0.8" in text  # three clocks, three columns
    assert "| 8 | 0.1 | 3 (2/1/0) |" in text  # seeds run, and how many ok / diverged / failed
    assert "| 1 | 0.1 | 3 (0/3/0) | — | — |" in text  # all diverged: no accuracy, not a zero
    low, high = analysis.mean_ci(trials.query("batch_size == 8 and learning_rate == 0.01")["test_accuracy"])[1:]
    assert f"[{low:.3f}, {high:.3f}]" in text
    assert "| 64 | 0.1 | 3 (3/0/0) |" in text and "| 5 | 40 |" in text  # epochs and updates to target
    assert "not reached" in text and "amortized" not in text


MESSY_GRID = """\
name: messy
train:
  epochs: 6
sweep:
  batch_size: [8, 64]
  learning_rate: [0.01, 0.1]
  seed: [0, 1]
  momentum: [0.5, 0.9]
"""


def test_partial_mixed_results_are_labelled_split_and_warned(tmp_path):
    """Two runs of one grid, half done: keras on one machine, fused groups on another, two momenta."""
    import hashlib

    from harness.cli import report_main

    grid = tmp_path / "messy.yaml"
    grid.write_text(MESSY_GRID)
    sha = hashlib.sha256(grid.read_bytes()).hexdigest()
    results = tmp_path / "results"
    keras = [synthetic_result(bs, lr, s, train=TrainConfig(epochs=6, momentum=0.9), host="node-a")
             for bs in (8, 64) for lr in (0.01, 0.1) for s in (0, 1)]
    fused = [synthetic_result(8, lr, s, group_size=4, host="node-b",
                              train=TrainConfig(epochs=6, momentum=0.5, engine="fused"))
             for lr in (0.01, 0.1) for s in (0, 1)]
    for run_id, rows, host in (("run-a", keras, "node-a"), ("run-b", fused, "node-b")):
        write_results(results, rows, run_id, 0)
        write_run_metadata(results, {"run_id": run_id, "host": host, "grid_path": str(grid), "grid_sha256": sha})
    assert report_main([str(results)]) == 0
    out = results / "report"
    report = (out / "report.md").read_text()
    # Engines are studies of their own: a seed trained twice is not two seeds.
    assert "**Partial results:** momentum=0.5, engine=fused: 4 of 8 planned trials on disk, 4 missing" in report
    assert "several engines (fused: 4, keras: 8)" in report
    assert "several machines (node-a: 8, node-b: 4)" in report
    assert "4 of 12 trials were trained in fused groups" in report
    assert "## momentum=0.5, engine=fused" in report and "## momentum=0.9, engine=keras" in report
    for name in FIGURE_NAMES[1:7]:
        assert (out / f"{name}-momentum=0.9__engine=keras.png").exists(), name
    assert (out / "learning_curves-momentum=0.5__engine=fused.png").exists()
    assert not (out / "training_speed-momentum=0.5__engine=fused.png").exists()  # one batch size
    assert "*Skipped: needs at least 2 batch sizes; these results have 1 so far (2 planned).*" in report
    assert (out / "data_set.png").exists() and not (out / "data_set-2.png").exists()  # one problem, drawn once
    table = pd.read_csv(out / "summary.csv")
    assert sorted(table["study"].unique()) == ["momentum=0.5, engine=fused", "momentum=0.9, engine=keras"]
    assert set(table.loc[table["study"] == "momentum=0.5, engine=fused", "timing"]) == {analysis.AMORTIZED}
    assert "\\* amortized" in report
    assert not list(out.glob(".*tmp"))  # every file renamed into place


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness report: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, study):
    from harness.cli import report_main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert "not a results folder" in _one_error_line(capsys)
    assert report_main([str(tmp_path / "absent")]) == 2
    assert "no such folder" in _one_error_line(capsys)
    started = tmp_path / "started"
    write_run_metadata(started, {"run_id": "run-x", "host": "h"})
    assert report_main([str(started)]) == 2
    assert "no finished trials yet" in _one_error_line(capsys)
    assert report_main([str(study), "--format", "png,jpg"]) == 2
    assert "valid formats: png, pdf, svg" in _one_error_line(capsys)
    assert report_main([str(study), "--target-accuracy", "80"]) == 2
    assert "--target-accuracy" in _one_error_line(capsys)
    assert report_main([str(study), "--colour"]) == 2
    assert "unrecognized arguments: --colour" in _one_error_line(capsys)
    broken = tmp_path / "broken"
    (broken / "trials").mkdir(parents=True)
    (broken / "trials" / "part-x.parquet").write_bytes(b"not parquet")
    assert report_main([str(broken)]) == 2
    assert "not a readable Parquet file" in _one_error_line(capsys)


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"harness report: error: {tmp_path}: not a results folder (no trials/ or "
                                                f"runs/ inside); pass the folder that was given to 'harness run "
                                                f"--results'"]


TINY_GRID = """\
name: tiny
problem:
  n_val: 200
train:
  epochs: 8
  eval_schedule: geometric
sweep:
  batch_size: [32, 100, 500]
  learning_rate: [0.01, 0.1]
  seed: [0, 1]
"""


@pytest.mark.slow
def test_end_to_end_run_then_report(tmp_path, capsys):
    """The real pipeline: harness.run trains a tiny grid (fused engine: seconds, not minutes), then
    the report command reads what it wrote and writes every figure in both formats."""
    from harness.cli import report_main

    grid = tmp_path / "tiny.yaml"
    grid.write_text(TINY_GRID)
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "harness.run", str(grid), "--backend", "serial", "--engine", "fused",
                          "--results", str(results), "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "report"
    assert report_main([str(results), "--out", str(out), "--format", "png,pdf", "--target-accuracy", "0.75"]) == 0
    assert capsys.readouterr().out.strip() == f"harness report: wrote {out / 'report.md'}"
    report = (out / "report.md").read_text()
    for name in FIGURE_NAMES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
        assert f"![{name}]({name}.png)" in report and f"[pdf]({name}.pdf)" in report
    table = pd.read_csv(out / "summary.csv")
    assert len(table) == 6 and (table["trials"] == 2).all() and (table["ok"] == 2).all()
    assert "Partial" not in report and "Skipped" not in report
    assert "### Critical batch size" in report and "B_crit = " in report
    assert "planned grid unknown" not in report  # the run's grid file was found through runs/*.json
    assert "target accuracy 0.75 (on the validation split" in report and "fused groups" in report
    assert (out / "summary.md").read_text().startswith("| batch size | lr |")


def test_seconds_per_epoch_leaves_out_diverged_members_of_fused_groups():
    """A fused member's time is the group's share; one that diverged after 2 of 200 epochs would
    read 100 times the group's seconds per epoch. A trial timed alone keeps its own clock."""
    from harness.analysis import with_derived

    trials = pd.DataFrame({"status": ["ok", "diverged", "ok", "diverged"], "group_size": [35, 35, 1, 1],
                           "wall_clock_s": [2.0, 2.0, 4.0, 0.5], "epochs_run": [200, 2, 200, 5]})
    got = with_derived(trials)["epoch_s"].tolist()
    assert got[0] == 0.01 and math.isnan(got[1]) and got[2] == 0.02 and got[3] == 0.1
