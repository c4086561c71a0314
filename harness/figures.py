"""Pure plotting: every ``plot_*`` takes result frames (as ``store.read_trials``/``read_epochs``
return them) and returns a matplotlib Figure; nothing here saves, shows or touches a file.

Figures are built as ``matplotlib.figure.Figure`` objects rather than through pyplot, so they
hold no global state, work under whatever backend the caller has (a notebook keeps its own),
and are freed when dropped. Seaborn draws into their axes; its styles apply only inside
``plot_style()``. The computations live in ``harness.analysis`` so they can be tested as numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from harness import analysis
from harness.config import ProblemConfig
from harness.problem import make_data

TRAIN_TEST = {"train": "#1f77b4", "test": "#d62728"}
DIVERGED_COLOR, FAILED_COLOR = "#7f7f7f", "#b07aa1"


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        yield


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=110)


def add_title(fig: Figure, title: str, note: str = "") -> None:
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize="large")


def add_caption(fig: Figure, text: str) -> None:
    fig.supxlabel(text, fontsize="small", color="#444444")


def bs_axis(ax, sizes) -> None:
    """Log2 batch-size x axis whose ticks are the batch sizes actually run."""
    sizes = sorted({int(s) for s in sizes})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    pad = 2 ** 0.35
    ax.set_xlim(sizes[0] / pad, sizes[-1] * pad)
    ax.set_xlabel("batch size (log2)")


def lr_text(value: float) -> str:
    """A learning rate as people write it: 0.1, 0.3, 1e-2, 3.2e-2, 3.2e-4 (never 0.031623)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    exponent = int(exponent)
    if -1 <= exponent <= 1:
        return f"{value:.2g}"
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def lr_palette(rates) -> dict[str, tuple]:
    rates = sorted(rates)
    colors = sns.color_palette("flare", max(len(rates), 2))
    return {lr_text(lr): colors[i] for i, lr in enumerate(rates)}


def bs_palette(sizes) -> dict[int, tuple]:
    sizes = sorted(sizes)
    colors = sns.color_palette("viridis", max(len(sizes), 2))
    return {int(b): colors[i] for i, b in enumerate(sizes)}


def _cell(df: pd.DataFrame, bs, lr) -> pd.DataFrame:
    return df[(df["batch_size"] == bs) & (df["learning_rate"] == lr)]


def plot_learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame, note: str = "",
                         expected: Mapping[tuple[int, float], int] | None = None) -> Figure:
    """Train and test accuracy per epoch, one panel per batch size and one row per learning
    rate: mean over the ok seeds with a 95% t-interval band. Diverged seeds are drawn thin and
    grey and left out of the mean; ``expected`` (cell -> trials planned) labels short cells."""
    curve = analysis.curves(trials, epochs)
    bands = analysis.curve_bands(curve)
    expected = expected or {}
    sizes = sorted({*trials["batch_size"], *(b for b, _ in expected)})
    rates = sorted({*trials["learning_rate"], *(lr for _, lr in expected)})
    # One learning rate: wrap the batch sizes into rows of four, so the classic figure stays
    # readable on a page instead of one long strip.
    wrap = 4 if len(rates) == 1 and len(sizes) > 4 else len(sizes)
    n_rows, n_cols = len(rates) * -(-len(sizes) // wrap), min(wrap, len(sizes))
    with plot_style():
        fig = new_figure(max(2.3 * n_cols + 0.8, 7.5), 2.0 * n_rows + 1.1)  # room for the legend's note
        axes = fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
        for ax in axes.flat[len(rates) * len(sizes):]:
            ax.set_visible(False)
        for k, (lr, bs) in enumerate((lr, bs) for lr in reversed(rates) for bs in sizes):
            i, j = divmod(k, n_cols)
            ax, cell = axes[i][j], _cell(trials, bs, lr)
            band = _cell(bands, bs, lr)
            for split, color in TRAIN_TEST.items():
                b = band[band["split"] == split]
                # Accuracy lives in [0, 1]; a t-interval over two or three seeds does not know
                # that, and unclipped it would squash every curve into a sliver.
                ax.fill_between(b["epoch"], b["low"].clip(0, 1), b["high"].clip(0, 1), color=color, alpha=0.25,
                                linewidth=0)
                ax.plot(b["epoch"], b["mean"], color=color, linewidth=1.2)
            for _, bad in _cell(curve, bs, lr).query("status == 'diverged'").groupby("trial_id"):
                ax.plot(bad["epoch"], bad["val_accuracy"], color=DIVERGED_COLOR, linewidth=0.7)
            ax.text(0.97, 0.04, _cell_label(cell, expected.get((int(bs), float(lr)))),
                    transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1.0})
            ax.set_title(f"batch size {bs}" if i == 0 or wrap < len(sizes) else "", fontsize="medium")
            ax.set_ylabel(f"lr {lr_text(lr)}\naccuracy" if j == 0 else "")
            ax.set_xlabel("epoch" if k + n_cols >= len(rates) * len(sizes) else "")
            if wrap < len(sizes):  # a wrapped last row may be short: label every panel's epochs
                ax.xaxis.set_tick_params(labelbottom=True)
        handles = [Line2D([], [], color=c, label=s) for s, c in TRAIN_TEST.items()]
        if (curve["status"] == "diverged").any():
            handles.append(Line2D([], [], color=DIVERGED_COLOR, linewidth=0.7, label="diverged seed (test)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize="small",
                   title_fontsize="small", title="mean over ok seeds with 95% CI band (clipped to [0, 1])\n"
                                                 "train = running accuracy over the epoch's batches, "
                                                 "test = after the epoch")
        add_title(fig, "Learning curves", note)
    return fig


def _cell_label(cell: pd.DataFrame, expected: int | None) -> str:
    """'3 seeds', '2 of 3 seeds, 1 diverged', 'no trials yet' ..."""
    n, ok = len(cell), int((cell["status"] == "ok").sum())
    parts = [f"{ok} of {n} ok" if ok < n else f"{n} seed{'s' if n != 1 else ''}"]
    for status in ("diverged", "failed"):
        k = int((cell["status"] == status).sum())
        if k:
            parts.append(f"{k} {status}")
    if expected and n < expected:
        parts.append(f"{expected - n} of {expected} pending")
    if n == 0:
        return f"{expected} pending" if expected else "no trials"
    return ", ".join(parts)


def plot_accuracy_heatmap(trials: pd.DataFrame, note: str = "",
                          expected: Mapping[tuple[int, float], int] | None = None) -> Figure:
    """Mean final test accuracy over the ok seeds of each (batch size, learning rate) cell, with
    its 95% CI half-width. A cell whose seeds all diverged or failed is hatched and labelled, a
    cell where some did has a red frame and says how many were left out of the mean."""
    cells = analysis.summarize_cells(trials)
    expected = expected or {}
    sizes = sorted({*cells["batch_size"], *(b for b, _ in expected)})
    rates = sorted({*cells["learning_rate"], *(lr for _, lr in expected)}, reverse=True)
    grid = cells.pivot(index="learning_rate", columns="batch_size", values="test_acc_mean")
    grid = grid.reindex(index=rates, columns=sizes)
    by_cell = {(int(r.batch_size), float(r.learning_rate)): r for r in cells.itertuples()}
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmin, vmax = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if vmax - vmin < 0.02:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    cmap = sns.color_palette("viridis", as_cmap=True)
    with plot_style():
        fig = new_figure(max(7.0, 1.6 * len(sizes) + 2.6), 0.75 * len(rates) + 2.4)
        ax = fig.subplots()
        sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=1.5, linecolor="white",
                    cbar_kws={"label": "final test accuracy"}, xticklabels=[f"{b:g}" for b in sizes],
                    yticklabels=[lr_text(lr) for lr in rates])
        for i, lr in enumerate(rates):
            for j, bs in enumerate(sizes):
                _annotate_cell(ax, i, j, by_cell.get((int(bs), float(lr))), expected.get((int(bs), float(lr))),
                               cmap, vmin, vmax)
        ax.set_xlabel("batch size (log2 order)")
        ax.set_ylabel("learning rate")
        ax.tick_params(axis="y", rotation=0)
        add_caption(fig, "mean [95% CI: Student t over the n ok seeds of a cell, clipped to [0, 1]]\n"
                      "hatched: no ok seed (all diverged, failed or not run)\n"
                      "red frame: some seeds diverged or failed; they are left out of the mean")
        add_title(fig, "Final test accuracy", note)
    return fig


def _annotate_cell(ax, i: int, j: int, row, expected: int | None, cmap, vmin: float, vmax: float) -> None:
    if row is None or row.ok == 0:
        if row is None:
            text, color = ("pending" if expected else "not run"), "#dddddd"
        else:
            text = "\n".join(f"{k} {s}" for s, k in (("diverged", row.diverged), ("failed", row.failed)) if k)
            color = DIVERGED_COLOR if row.diverged >= row.failed else FAILED_COLOR
        ax.add_patch(Rectangle((j, i), 1, 1, facecolor=color, hatch="//", edgecolor="white", linewidth=0))
        ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize="small", color="black",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5})
        return
    shade = cmap((row.test_acc_mean - vmin) / (vmax - vmin))
    ink = "black" if 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5 else "white"
    # The interval, not mean ± half-width: clipped to [0, 1] it need not be symmetric.
    interval = f" [{row.test_acc_ci_low:.2f}, {row.test_acc_ci_high:.2f}]" if np.isfinite(row.test_acc_ci_low) else ""
    lines = [f"{row.test_acc_mean:.3f}{interval}", f"n={row.ok}"]
    lost = [f"{k} {s}" for s, k in (("diverged", row.diverged), ("failed", row.failed)) if k]
    if expected and row.trials < expected:
        lost.append(f"{expected - row.trials} pending")
    if lost:
        lines[-1] += " (" + ", ".join(lost) + ")"
    if row.diverged or row.failed:
        ax.add_patch(Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, edgecolor="red", linewidth=2))
    ax.text(j + 0.5, i + 0.5, "\n".join(lines), ha="center", va="center", fontsize="small", color=ink)


def plot_data_set(trials: pd.DataFrame) -> Figure:
    """The points of each split of the (single) problem in ``trials``, coloured by class. More
    than two features are shown as a 2-D PCA projection fitted on the training rows (the
    title says so), so every data set gets the same picture."""
    problem = problem_of(trials)
    data = make_data(problem)
    splits = data.splits()
    n_features = data.x_train.shape[1]
    if n_features > 2:
        from sklearn.decomposition import PCA

        # Fitted on the training rows only, as the standardization is: the picture shows the
        # other splits in the training rows' coordinates.
        pca = PCA(n_components=2).fit(data.x_train)
        project, names = pca.transform, ("PC 1", "PC 2")
        shown = f"\n2-D PCA projection of its {n_features} features, fitted on the training rows"
    else:
        project, names, shown = (lambda x: x), ("x1", "x2"), ""
    frames = []
    for split, (x, y) in splits.items():
        xy = project(x)
        frames.append(pd.DataFrame({names[0]: xy[:, 0], names[1]: xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(x)),
                                    "class": [f"class {k}" for k in y.argmax(axis=1)], "split": split}))
    points = pd.concat(frames, ignore_index=True)
    classes = [f"class {k}" for k in range(data.n_classes)]
    with plot_style():
        fig = new_figure(1.0 + 4.0 * len(splits), 4.6)
        axes = fig.subplots(1, len(splits), sharex=True, sharey=True, squeeze=False)[0]
        for ax, split in zip(axes, splits):
            part = points[points["split"] == split]
            sns.scatterplot(part, x=names[0], y=names[1], hue="class", hue_order=classes, palette="deep", s=14,
                            alpha=0.75, linewidth=0, ax=ax, legend=split == "test")
            ax.set_title(f"{split}: {len(part)} points")
            ax.set_aspect("equal", adjustable="box")
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=None)
        name = f"file {Path(problem.path).name}" if problem.dataset == "file" else problem.dataset
        rows = ", ".join(f"{len(x)} {split}" for split, (x, _) in splits.items())
        add_title(fig, f"Data set: {name}, {data.n_classes} classes, {len(points)} rows ({rows}){shown}")
    return fig


def problem_of(trials: pd.DataFrame) -> ProblemConfig:
    """The ProblemConfig the trials were run on; ValueError if they mix several. Keys a frame
    lacks (results written before the key existed) take their defaults, as those trials did."""
    present = [f for f in dataclasses.fields(ProblemConfig) if f.name in trials.columns]
    distinct = trials[[f.name for f in present]].drop_duplicates()
    if len(distinct) != 1:
        raise ValueError(f"trials hold {len(distinct)} problems; plot one at a time")
    kinds = {"int": int, "float": float, "str": str}
    row = distinct.iloc[0]
    return ProblemConfig(**{f.name: kinds[f.type](row[f.name]) for f in present})
