"""The text half of the report: the summary table (CSV and Markdown) and report.md itself."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from harness.figures import LABEL_MAX_RATES, LABEL_MAX_SIZES, MAX_ALL_RATES, MAX_PANEL_SIZES, SPACED_RATES

# Columns of summary.csv, in order; the Markdown view formats a subset of them.
TABLE_COLUMNS = (
    "batch_size", "learning_rate", "trials", "seeds", "ok", "diverged", "failed", "share_diverged",
    "train_acc_mean", "train_acc_ci_low", "train_acc_ci_high", "test_acc_mean", "test_acc_ci_low",
    "test_acc_ci_high", "ref_train_accuracy", "ref_test_accuracy", "wall_clock_s_mean", "epoch_s_mean", "timing",
    "updates_mean", "epochs_to_target", "updates_to_target", "seconds_to_target", "reached", "test_acc_std",
    "curve_noise",
)


def summary_table(cells: pd.DataFrame, label: str = "") -> pd.DataFrame:
    """The per-cell summary in the published column order, with a 'study' column first when the
    results hold several studies."""
    table = cells[list(TABLE_COLUMNS)].copy()
    if label:
        table.insert(0, "study", label)
    return table


def _acc(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.3f}" + (f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) else "")


def _clock(value: float, fmt: str) -> str:
    if value != value:  # NaN: no finished trial
        return "—"
    return "not reached" if math.isinf(value) else format(value, fmt)


def _seconds(value: float) -> str:
    return _clock(value, ".3g" if value < 10 else ",.1f")


def markdown_rows(table: pd.DataFrame, target: float) -> pd.DataFrame:
    """The table as a reader wants it: CIs in brackets, the reference beside ours, clocks apart."""
    t = f"{target:g}"
    rows = []
    for r in table.itertuples():
        row = {"study": getattr(r, "study", None)} if "study" in table else {}
        ref = (f"{r.ref_train_accuracy:.3f} / {r.ref_test_accuracy:.3f}" if math.isfinite(r.ref_test_accuracy)
               else "")
        star = " *" if r.timing != "isolated" and math.isfinite(r.wall_clock_s_mean) else ""
        row.update({
            "batch size": f"{r.batch_size}", "lr": f"{r.learning_rate:g}",
            # Seeds run; the outcome counts are per trial (a seed run by two engines is two trials).
            "seeds (ok/div/fail)": (f"{r.seeds}" if r.seeds == r.trials else f"{r.seeds} seeds, {r.trials} trials")
                                   + f" ({r.ok}/{r.diverged}/{r.failed})",
            "train acc [95% CI]": _acc(r.train_acc_mean, r.train_acc_ci_low, r.train_acc_ci_high),
            "test acc [95% CI]": _acc(r.test_acc_mean, r.test_acc_ci_low, r.test_acc_ci_high),
            "reference train / test": ref,
            "wall-clock s": _seconds(r.wall_clock_s_mean) + star,
            "updates": _clock(r.updates_mean, ",.0f"),
            f"epochs to {t}": _clock(r.epochs_to_target, ".3g"),
            f"updates to {t}": _clock(r.updates_to_target, ",.0f"),
            f"seconds to {t}": _seconds(r.seconds_to_target),
            "diverged": "—" if r.share_diverged != r.share_diverged else f"{r.share_diverged:.0%}",
        })
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, target: float) -> str:
    view = markdown_rows(table, target)
    if view.empty:
        return "(no cells)"
    lines = ["| " + " | ".join(view.columns) + " |", "|" + "|".join("---" for _ in view.columns) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in view.itertuples(index=False)]
    if (table["timing"] != "isolated").any():
        lines.append("\n\\* amortized: fused-group time divided by group size, not an isolated measurement")
    return "\n".join(lines)


DEFINITIONS = """\
- **Three clocks.** *Epochs to target* counts passes over the training data, *updates to target*
  counts optimizer steps, *seconds to target* is updates to target times the timing probe's
  seconds per update (one Keras model alone on one thread), or without a probe an isolated
  trial's own clock. Each is read at the first point of the update clock at which the accuracy
  on the selection split reaches the target, so it is as fine as one clock point (one epoch
  for results written before the clock). Per cell the median over seeds is shown; a seed that
  never reaches the target (or diverges) counts as infinitely slow, so a cell reads "not
  reached" once half of its seeds miss.
- **Accuracies** are the final train/test accuracy of the trials that finished ok; the 95% interval
  is Student's t over seeds, clipped to [0, 1] (none with one seed). Diverged and failed trials are
  counted, never averaged in.
- **Selection**: the best learning rate is chosen on the validation split when the grid has one
  (`n_val`), else on the test set (and the figures say so); by final accuracy, the highest mean
  among rates where no seed diverged; by updates, the fewest median updates to target. Ties go
  to the smaller rate.
- **Diverged**: the loss became non-finite or exceeded `divergence_factor` times its initial value.
  **Share diverged** is diverged / (ok + diverged); failed trials (exceptions) are not outcomes.
- **Critical batch size** B_crit: fitted to S = S_min(1 + B_crit/B) over the steps to a target at
  each batch size's best setting (McCandlish et al. 2018), with a bootstrap interval over seeds;
  **B_simple** = tr(Σ)/|G|², the gradient noise scale from exact per-example gradients.
- **Reference** values are the original single runs of the classic study (harness/data/reference.json),
  shown only for cells with exactly the reference setting.
- **Dense grids.** Up to {all_rates} learning rates the learning curves and the stability figure draw
  every rate; past that, each batch size's best rate (by final accuracy, as above) and {spaced}
  rates log-spaced over those tried, and their captions name them. The learning curves show at
  most {sizes} batch sizes (log-spaced past that). Past {label_rates} learning rates or {label_sizes} batch
  sizes the heatmap draws every cell on log axes without numbers in the cells. The summary
  table and summary.csv always have every cell.
""".format(all_rates=MAX_ALL_RATES, spaced=SPACED_RATES, sizes=MAX_PANEL_SIZES, label_rates=LABEL_MAX_RATES,
           label_sizes=LABEL_MAX_SIZES)


def _image(stem: str, formats: Sequence[str]) -> str:
    shown = "png" if "png" in formats else ("svg" if "svg" in formats else None)
    links = " · ".join(f"[{fmt}]({stem}.{fmt})" for fmt in formats)
    if not shown:
        return links
    return f"![{stem}]({stem}.{shown})" + (f"\n\n{links}" if len(formats) > 1 else "")


COMPARISON = "study_comparison"  # the figure that sets the studies of a folder side by side


def render_report(results_dir: Path, trials: pd.DataFrame, runs: list[dict], target: float,
                  formats: Sequence[str], notes: Sequence[str], data_figures: Sequence[str], sections) -> str:
    """report.md: provenance, warnings, every figure and every table in one page."""
    status = trials["status"].value_counts()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Batch-size study: {results_dir.name}", "",
           f"Generated {now} from `{results_dir}`: {len(trials)} trials "
           f"({status.get('ok', 0)} ok, {status.get('diverged', 0)} diverged, {status.get('failed', 0)} failed) "
           f"from {trials['run_id'].nunique()} run(s); target accuracy {target:g} (on the validation split where the study "
           f"has one, else the test set).", ""]
    partial = [s.note for s in sections if s.note]
    if partial:
        out += ["> **Partial results:** " + "; ".join(f"{s.label + ': ' if s.label else ''}"
                                                    f"{s.note.removeprefix('partial: ')}" for s in sections if s.note)
                + ". Figures are drawn from what is on disk and say what is missing.", ""]
    if notes:
        out += ["## Warnings", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Data set", ""] + [_image(name, formats) + "\n" for name in data_figures if name != COMPARISON]
    if COMPARISON in data_figures:
        out += ["## Studies compared", "", _image(COMPARISON, formats), ""]
    for section in sections:
        out += [f"## {section.label or 'Results'}", ""]
        for stem, title in section.figures.items():
            out += [f"### {title}", "", _image(stem, formats), ""]
        for title, reason in section.skipped.items():
            out += [f"### {title}", "", f"*Skipped: {reason}.*", ""]
        if section.scaling:
            out += ["### Critical batch size", ""] + [f"- {line}" for line in section.scaling] + [""]
        table = section.table.drop(columns="study", errors="ignore")  # the heading names the study
        out += ["### Summary table", "", markdown_table(table, target), ""]
    out += ["Full precision: [summary.csv](summary.csv) · all studies: [summary.md](summary.md)", "",
            "## Definitions", "", DEFINITIONS, "## Runs", ""]
    facts = (("host", "host"), ("grid", "grid_path"), ("started", "started_at"), ("backend", "backend"),
             ("harness", "harness_version"), ("commit", "git_commit"), ("keras", "keras"),
             ("tensorflow", "tensorflow"), ("ray", "ray"))
    for run in runs:
        known = [f"{name} {run[key]}" for name, key in facts if run.get(key)]
        out.append(f"- `{run.get('run_id')}`: " + (", ".join(known) or "no details recorded"))
    if not runs:
        out.append("- no run metadata (runs/*.json) in the results folder")
    return "\n".join(out) + "\n"
