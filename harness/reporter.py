"""The report: a results folder (finished or still running, one grid or several) in, the figures
and the summary table of a batch-size study out, with a report.md that shows them all.

The figures are pure functions (harness.figures, harness.scaling_figures); this module decides
which to draw and writes them (``save_figures``) and the table. The command line that calls it
(`python -m harness.report`) is harness.cli.report_main.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from harness import analysis, critical, scaling
from harness.critical_figures import (plot_critical_vs_noise, plot_learning_rate_scaling, plot_noise_scale_collapse,
                                      plot_steps_to_target, plot_steps_vs_examples)
from harness.comparison_figures import has_comparison, plot_study_comparison
from harness.config import ConfigError
from harness.figures import plot_accuracy_heatmap, plot_data_set, plot_learning_curves, problem_of
from harness.plan import planned_specs
from harness.scaling_figures import (plot_best_learning_rate, plot_stability, plot_training_speed,
                                     plot_updates_to_target)
from harness.store import (EPOCHS, POINTS, PROBES, TRIALS, StoreError, is_results_dir, read_runs, read_table,
                           write_text_atomic)
from harness.report_text import markdown_table, render_report, summary_table

FORMATS = ("png", "pdf", "svg")

# The columns the report reads, and no others: what some figure, the table or a warning uses.
# Error texts, timestamps and versions of a trial, the curves' losses and the gradient statistics
# behind B_simple stay on disk, so memory follows what is drawn rather than the width of the rows.
READ = {
    TRIALS: ("trial_id", "run_id", "hostname", *analysis.CONFIG_NAMES, "status", "train_accuracy", "val_accuracy",
             "test_accuracy", "epochs_run", "updates", "wall_clock_s", "group_size"),
    EPOCHS: ("trial_id", "epoch", "accuracy", "val_accuracy", "elapsed_s", "updates"),
    POINTS: ("trial_id", "updates", "examples_seen", "elapsed_s", "train_loss", "val_accuracy", "test_accuracy",
             "b_simple"),
    PROBES: None,  # a row per batch size: all of it
}


class ReportError(ValueError):
    """Bad input for the report; the message is one line for the user."""


@dataclass(frozen=True)
class ScalingStudy:
    """Steps to targets, fitted frontiers, B_simple and the winning rates of one study."""

    chosen: scaling.Selection
    fits: list
    best: pd.DataFrame
    curve: pd.DataFrame
    stable: pd.DataFrame
    lines: list[str]

    @classmethod
    def of(cls, trials: pd.DataFrame, points: pd.DataFrame) -> "ScalingStudy":
        chosen = scaling.selection(trials)
        fits = scaling.target_fits(trials, points, chosen)
        best = scaling.best_settings(trials, chosen)
        curve = scaling.b_simple_curve(trials, points, best)
        lines = scaling.summary_lines(fits, scaling.plateau_b_simple(curve))
        return cls(chosen, fits, best, curve, critical.largest_stable_lr(trials), lines)


@dataclass(frozen=True)
class Study:
    """One study's frames and what the figures need to know about it."""

    label: str  # '' when the results hold one study
    trials: pd.DataFrame
    epochs: pd.DataFrame
    points: pd.DataFrame  # the update clock (empty for results from before it)
    probes: pd.DataFrame  # timing probes (empty without timing_probe)
    target: float
    done: analysis.Completeness

    @property
    def clocks(self) -> dict:
        """What every clock-reading figure is given besides trials and epochs."""
        return {"points": self.points, "probes": self.probes}

    @cached_property
    def enriched(self) -> pd.DataFrame:
        """Trials with their clocks to the target and curve noise (analysis.enrich), once for all figures."""
        return analysis.enrich(self.trials, self.epochs, self.target, **self.clocks)

    @cached_property
    def cells(self) -> pd.DataFrame:
        """The per-cell summary the figures select on and the table shows, computed once."""
        return analysis.summarize_cells(self.enriched, analysis.load_reference())

    @cached_property
    def scaling(self) -> ScalingStudy:
        """The critical-batch-size analysis, computed once for all the figures that draw it."""
        return ScalingStudy.of(self.trials, self.points)

    @property
    def sizes(self) -> int:
        return self.trials["batch_size"].nunique()

    @property
    def rates(self) -> int:
        return self.trials["learning_rate"].nunique()

    def planned(self, axis: int) -> str:
        """' so far (N planned)' when the plan has more batch sizes (0) or rates (1) than the disk."""
        n = len({cell[axis] for cell in self.done.expected})
        return f" so far ({n} planned)" if n > (self.sizes, self.rates)[axis] else ""


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    draw: Callable[[Study], Figure]
    skip: Callable[[Study], str]  # why this study cannot have the figure, '' when it can


def _needs(sizes: int = 1, rates: int = 1, cells: int = 1, ok: bool = True) -> Callable[[Study], str]:
    def why(s: Study) -> str:
        if ok and not (s.trials["status"] == "ok").any():
            counts = s.trials["status"].value_counts()
            return (f"needs a trial that finished ok; these results have none "
                    f"({counts.get('diverged', 0)} diverged, {counts.get('failed', 0)} failed)")
        if s.sizes < sizes:
            return f"needs at least {sizes} batch sizes; these results have {s.sizes}{s.planned(0)}"
        if s.rates < rates:
            return f"needs at least {rates} learning rates; these results have {s.rates}{s.planned(1)}"
        if s.sizes * s.rates < cells:
            return "needs more than one batch size or learning rate; these results have one cell"
        return ""
    return why


def _needs_sgd(s: Study) -> str:
    """g = lr N / (B (1 - momentum)) is the noise scale of SGD with momentum; other optimizers have none."""
    others = sorted(set(s.trials["optimizer"]) - {"sgd"})
    if others:
        return f"the SGD noise scale describes SGD; this study's optimizer is {', '.join(others)}"
    return _needs(sizes=2)(s)


def _needs_clock(s: Study) -> str:
    """The critical-batch-size figures read the update clock and fit over batch sizes."""
    if s.points.empty:
        return ("needs the update clock's points (results written before it have none; run the grid "
                "again into a new folder)")
    return _needs(sizes=3)(s)


FIGURES = (
    FigureSpec("learning_curves", "Learning curves", lambda s: plot_learning_curves(
        s.trials, s.epochs, s.done.note, s.done.expected), _needs(ok=False)),
    FigureSpec("accuracy_heatmap", "Final test accuracy over batch size and learning rate",
               lambda s: plot_accuracy_heatmap(s.trials, s.done.note, s.done.expected, cells=s.cells),
               _needs(cells=2, ok=False)),
    FigureSpec("training_speed", "Training speed", lambda s: plot_training_speed(
        s.trials, s.epochs, s.target, s.done.note, **s.clocks, cells=s.cells), _needs(sizes=2)),
    FigureSpec("updates_to_target", "Updates (and epochs, seconds) to target", lambda s: plot_updates_to_target(
        s.trials, s.epochs, s.target, s.done.note, **s.clocks, enriched=s.enriched, cells=s.cells), _needs(sizes=2)),
    FigureSpec("best_learning_rate", "Best learning rate by batch size", lambda s: plot_best_learning_rate(
        s.trials, s.epochs, s.target, s.done.note, **s.clocks, cells=s.cells), _needs(sizes=2, rates=2)),
    FigureSpec("stability", "Stability across seeds", lambda s: plot_stability(
        s.trials, s.epochs, s.done.note, cells=s.cells), _needs(sizes=2)),
    FigureSpec("steps_to_target", "Steps to target against batch size, and the critical batch size",
               lambda s: plot_steps_to_target(s.scaling.fits, s.scaling.chosen, s.done.note), _needs_clock),
    FigureSpec("steps_vs_examples", "Steps against examples: the fitted frontier",
               lambda s: plot_steps_vs_examples(s.scaling.fits, s.scaling.chosen, s.done.note), _needs_clock),
    FigureSpec("critical_vs_noise", "Critical batch size and gradient noise scale", lambda s: plot_critical_vs_noise(
        s.scaling.fits, s.scaling.curve, s.scaling.chosen, s.done.note), _needs_clock),
    FigureSpec("learning_rate_scaling", "Learning-rate scaling rules and the stable range",
               lambda s: plot_learning_rate_scaling(s.scaling.best, s.scaling.stable,
                                                    sorted(s.trials["learning_rate"].unique()), s.scaling.chosen,
                                                    s.done.note), _needs(sizes=2, rates=2)),
    FigureSpec("noise_scale_collapse", "Final accuracy against the SGD noise scale",
               lambda s: plot_noise_scale_collapse(analysis.at_peak_rate(s.trials), s.scaling.chosen, s.done.note),
               _needs_sgd),
)


@dataclass
class Section:
    label: str
    figures: dict[str, str] = field(default_factory=dict)  # file stem -> title
    skipped: dict[str, str] = field(default_factory=dict)  # title -> reason
    table: pd.DataFrame | None = None
    note: str = ""
    scaling: list[str] = field(default_factory=list)  # one line per critical-batch-size fit


def save_figures(figures: Mapping[str, Figure], out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """The one place figures become files: ``out_dir/<name>.<format>``, each written beside its
    target and renamed into place, so a reader never sees half an image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fig.savefig(tmp, format=fmt, dpi=150 if fmt == "png" else None)
            os.replace(tmp, path)
            written.append(path)
    return written


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".=-" else "_" for c in label)


def planned_trials(results_dir: Path, runs: list[dict]) -> tuple[pd.DataFrame | None, str]:
    """Every trial the runs' grids plan, as config columns, rebuilt by the driver's own planning
    code; (None, why) when a run's grid is unknown (then the plan is inferred from the disk)."""
    # grid_path is as the run was given it, relative to where it was started: try here, beside
    # the results (results/<name>/ sits in the project), and the project this harness is in.
    roots = (Path.cwd(), results_dir.parent, results_dir.parent.parent, Path(__file__).resolve().parents[1])
    frames = []
    for run in runs:
        try:
            specs = planned_specs(run, roots)
        except ConfigError as exc:
            return None, str(exc)
        frames.append(pd.DataFrame([{"trial_id": s.trial_id, **s.config_values()} for s in specs]))
    if not frames:
        return None, "no run metadata"
    return pd.concat(frames).drop_duplicates("trial_id"), ""


def _plan_of(planned: pd.DataFrame | None, trials: pd.DataFrame) -> pd.DataFrame | None:
    """The planned trials of the study ``trials`` belongs to (same config beyond the axes; the
    engine aside, since a run may override the grid's with --engine)."""
    if planned is None:
        return None
    for col in (c for c in analysis.CONFIG_NAMES if c not in (*analysis.STUDY_AXES, "engine")):
        planned = planned[planned[col].isin(trials[col].unique())]
    return planned


def mixing_warnings(trials: pd.DataFrame, runs: list[dict]) -> list[str]:
    """What a reader must know before comparing numbers: engines, machines, amortized timings."""
    notes = []
    engines = Counter(trials["engine"])
    if len(engines) > 1:
        notes.append("rows come from several engines (" + ", ".join(f"{e}: {n}" for e, n in sorted(engines.items()))
                     + "); each engine's trials are a study of their own: a seed trained by two engines is "
                       "one seed, not two, so statistics never pool them")
    # A trial was timed where it ran (its hostname; a Ray cluster spreads one run over nodes);
    # the run's host (runs/<run_id>.json) stands in for rows that do not say.
    host_of = {r.get("run_id"): r.get("host") for r in runs}
    hosts = Counter(h or host_of.get(rid) or "unknown" for rid, h in zip(trials["run_id"], trials["hostname"]))
    if len(hosts) > 1:
        notes.append("rows come from several machines (" + ", ".join(f"{h}: {n}" for h, n in sorted(hosts.items()))
                     + "); wall-clock times are comparable only within one machine")
    drivers = sorted({str(r.get("host")) for r in runs if r.get("run_id") in set(trials["run_id"])})
    if len(drivers) > 1:
        notes.append(f"the runs were started on several machines ({', '.join(drivers)})")
    amortized = int((trials["group_size"] > 1).sum())
    if amortized:
        notes.append(f"{amortized} of {len(trials)} trials were trained in fused groups: their wall_clock_s is the "
                     f"group's time divided by the group size (amortized), not an isolated measurement")
    return notes


def build_sections(trials: pd.DataFrame, epochs: pd.DataFrame, target: float, planned: pd.DataFrame | None,
                   points: pd.DataFrame, probes: pd.DataFrame) -> Iterator[tuple[Section, dict[str, Figure]]]:
    """Per study: its section of the report and the figures it can have (the ones it cannot are
    noted in the section). One study at a time, so a big report never holds every figure."""
    studies = analysis.split_studies(trials)
    for label, part in studies:
        if len(studies) == 1:  # the whole frames: no copy
            part_epochs, part_points = epochs, points
        else:
            part_epochs = epochs[epochs["trial_id"].isin(part["trial_id"])]
            part_points = points[points["trial_id"].isin(part["trial_id"])]
        study = Study(label, part, part_epochs, part_points, probes, target,
                      analysis.completeness(part, _plan_of(planned, part)))
        section, figures = Section(label, note=study.done.note), {}
        suffix = f"-{_slug(label)}" if label else ""
        for spec in FIGURES:
            reason = spec.skip(study)
            if reason:
                section.skipped[spec.title] = reason
            else:
                section.figures[spec.name + suffix] = spec.title
                figures[spec.name + suffix] = _labelled(spec.draw(study), part, label)
        if not _needs_clock(study):
            section.scaling = study.scaling.lines
        section.table = summary_table(study.cells, label)
        yield section, figures


def _labelled(fig: Figure, trials: pd.DataFrame, label: str) -> Figure:
    """``fig`` with what it is about under its title: the data set and the optimizer, and the
    study's other settings when the results hold several studies."""
    parts = [f"data set {', '.join(map(str, sorted(trials['dataset'].unique())))}",
             f"optimizer {', '.join(map(str, sorted(trials['optimizer'].unique())))}"]
    parts += [item for item in label.split(", ") if item and not item.startswith(("dataset=", "optimizer="))]
    title = fig._suptitle.get_text() if fig._suptitle else ""
    lines = title.split("\n")
    fig.suptitle("\n".join([lines[0], " · ".join(parts), *lines[1:]]), fontsize="large")
    return fig


def read_frames(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """trials, epochs, points and probes with only the ``READ`` columns. The trial ids become one
    dense integer key shared by the first three frames (every figure joins and groups on it, and
    pandas does that several times faster on integers than on 16-character strings); the report
    never shows an id. A curve row whose trial has no row is dropped (store.live_parts already
    keeps such rows out)."""
    table = read_table(results_dir, TRIALS, READ[TRIALS])
    ids = pc.unique(table.column("trial_id"))

    def keyed(table: pa.Table) -> pd.DataFrame:
        key = pc.index_in(table.column("trial_id"), value_set=ids).cast(pa.int64())
        table = table.set_column(table.schema.get_field_index("trial_id"), "trial_id", key)
        return table.filter(pc.is_valid(key)).to_pandas()

    curves = (keyed(read_table(results_dir, kind, READ[kind])) for kind in (EPOCHS, POINTS))
    return (keyed(table), *curves, read_table(results_dir, PROBES, READ[PROBES]).to_pandas())


def write_report(results_dir: Path, out_dir: Path, target: float = 0.8,
                 formats: Sequence[str] = ("png",)) -> Path:
    """Read ``results_dir``, write every figure, summary.csv, summary.md and report.md to
    ``out_dir``; return the report.md path. ReportError/StoreError for unusable input."""
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such folder")
    if not is_results_dir(results_dir):
        raise ReportError(f"{results_dir}: not a results folder (no trials/ or runs/ inside); "
                          f"pass the folder that was given to 'harness run --results'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = read_runs(results_dir)
    trials, epochs, points, probes = read_frames(results_dir)
    if trials.empty:
        raise ReportError(f"{results_dir}: no finished trials yet ({len(runs)} run(s) started); "
                          f"report again once a trial has finished")
    planned, plan_note = planned_trials(results_dir, runs)
    notes = [str(w.message) for w in caught] + mixing_warnings(trials, runs)
    if plan_note:
        notes.append(f"planned grid unknown ({plan_note}): completeness is judged from the cells on disk")
    problems: dict = {}  # one data-set figure per distinct problem, not per study
    studies = analysis.split_studies(trials)
    for _, part in studies:
        problems.setdefault(problem_of(part), part)
    data_figures = [("data_set" if i == 0 else f"data_set-{i + 1}") for i in range(len(problems))]
    save_figures({name: plot_data_set(part) for name, part in zip(data_figures, problems.values())}, out_dir, formats)
    if has_comparison(studies):
        save_figures({"study_comparison": plot_study_comparison(studies)}, out_dir, formats)
        data_figures.append("study_comparison")
    sections = []
    for section, figures in build_sections(trials, epochs, target, planned, points, probes):
        save_figures(figures, out_dir, formats)
        sections.append(section)
    if len(sections) > 1:
        notes.append(f"the results hold {len(sections)} studies (config beyond batch size, learning rate and seed "
                     f"differs); each has its own figures and table")
    table = pd.concat([s.table for s in sections], ignore_index=True)
    write_text_atomic(out_dir / "summary.csv", table.to_csv(index=False))
    write_text_atomic(out_dir / "summary.md", markdown_table(table, target) + "\n")
    path = out_dir / "report.md"
    write_text_atomic(path, render_report(results_dir, trials, runs, target, formats, notes, data_figures, sections))
    return path
