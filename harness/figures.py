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
import math
import textwrap
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

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


def wrap_to(fig: Figure, text: str) -> str:
    """``text`` with each line wrapped to the figure's width (small type: about 15 characters an inch)."""
    width = int(fig.get_figwidth() * 15)
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def add_caption(fig: Figure, text: str) -> None:
    fig.supxlabel(wrap_to(fig, text), fontsize="small", color="#444444")


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


# Dense grids. A figure draws every learning rate only while that stays readable; past that it
# draws each batch size's best rate and a few log-spaced ones (``choose_rates``), and says so.
# The heatmap keeps every cell but drops the per-cell numbers past a size (summary.csv has them).
MAX_ALL_RATES = 8  # up to this many rates, the curves and stability figures draw every one
SPACED_RATES = 4  # past it: each batch size's best rate and this many log-spaced ones
MAX_PANEL_SIZES = 10  # batch sizes side by side in the learning curves; past it, log-spaced ones
LABEL_MAX_RATES, LABEL_MAX_SIZES = 16, 12  # the heatmap writes numbers in its cells up to this grid


def log_spaced(values, k: int) -> list:
    """``k`` of the sorted distinct ``values`` spread evenly in log: the smallest, the largest and
    the nearest (in log) to geometric steps between them; all of them when there are ``k`` or fewer."""
    values = sorted(set(values))
    if len(values) <= k:
        return values
    logs = np.log(np.asarray(values, dtype=float))
    chosen: list[int] = []
    for goal in np.linspace(logs[0], logs[-1], k):
        free = [i for i in range(len(values)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(logs[i] - goal)))
    return [values[i] for i in sorted(chosen)]


def _rate_list(rates) -> str:
    return ", ".join(lr_text(r) for r in rates)


@dataclasses.dataclass(frozen=True)
class RateChoice:
    """Which learning rates a figure with a row or line per rate draws, and the caption saying so.
    ``best`` is empty when every rate is drawn; else it maps each batch size to its own best rate
    (NaN when every rate diverged), drawn as a row or line of its own beside ``rates``."""

    rates: tuple[float, ...]  # drawn at every batch size, ascending
    best: dict[int, float]
    tried: int
    caption: str

    @property
    def every_rate(self) -> bool:
        return not self.best


def choose_rates(trials: pd.DataFrame, rates=None, max_all: int = MAX_ALL_RATES,
                 spaced: int = SPACED_RATES) -> RateChoice:
    """Every rate while there are at most ``max_all``; past that, each batch size's best rate by
    final accuracy on the selection split (highest mean among rates where no seed diverged, ties
    to the smaller: ``scaling.best_settings``) and ``spaced`` rates log-spaced over those tried."""
    from harness import scaling  # scaling's figures import this module

    rates = sorted({*trials["learning_rate"], *(rates if rates is not None else ())})
    if len(rates) <= max_all:
        return RateChoice(tuple(rates), {}, len(rates), f"every learning rate tried ({_rate_list(rates)})")
    chosen = scaling.selection(trials)
    best = scaling.best_settings(trials, chosen)
    best_of = {int(b): float(lr) for b, lr in zip(best["batch_size"], best["learning_rate"])}
    shown = log_spaced(rates, spaced)
    drawn = {*shown, *(lr for lr in best_of.values() if lr == lr)}
    caption = (f"learning rates: each batch size's best (highest mean final {chosen.split} accuracy among rates "
               f"where no seed diverged) and {len(shown)} log-spaced over the {len(rates)} tried "
               f"({_rate_list(shown)}); the other {len(rates) - len(drawn)} rates are left out here (every "
               f"cell is in the heatmap and summary.csv)")
    return RateChoice(tuple(shown), best_of, len(rates), caption)


def _groups(df: pd.DataFrame, keys) -> dict:
    """{key: rows} in one pass (a mask per panel would read the whole frame once per panel)."""
    return {k: g for k, g in df.groupby(keys, sort=False)} if len(df) else {}


def plot_learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame, note: str = "",
                         expected: Mapping[tuple[int, float], int] | None = None) -> Figure:
    """Train and test accuracy per epoch, one panel per batch size and one row per learning rate
    (``choose_rates``: every rate of a small grid; of a dense one, a row of each batch size's best
    rate, then a few log-spaced ones; at most MAX_PANEL_SIZES batch sizes, log-spaced): mean over
    the ok seeds with a 95% t-interval band. Diverged seeds are drawn thin and grey and left out
    of the mean; ``expected`` (cell -> trials planned) labels short cells. The caption states
    which rates and batch sizes are drawn and which are left out."""
    expected = expected or {}
    all_sizes = sorted({*trials["batch_size"], *(b for b, _ in expected)})
    choice = choose_rates(trials, [lr for _, lr in expected])
    sizes = log_spaced(all_sizes, MAX_PANEL_SIZES)
    rows: list = [*([None] if choice.best else []), *reversed(choice.rates)]  # None: each batch size's best

    def rate_of(row, bs) -> float:
        return choice.best.get(int(bs), math.nan) if row is None else row

    drawn = {(int(bs), rate_of(row, bs)) for row in rows for bs in sizes}
    cells = pd.MultiIndex.from_frame(trials[["batch_size", "learning_rate"]].astype({"batch_size": int}))
    shown = trials[cells.isin(list(drawn))] if len(trials) else trials
    curve = analysis.curves(shown, epochs)
    by_band = _groups(analysis.curve_bands(curve), analysis.CELL) if len(curve) else {}
    by_curve, by_trials = _groups(curve, analysis.CELL), _groups(shown, analysis.CELL)
    # One learning rate: wrap the batch sizes into rows of four, so the classic figure stays
    # readable on a page instead of one long strip.
    wrap = 4 if len(rows) == 1 and len(sizes) > 4 else len(sizes)
    n_rows, n_cols = len(rows) * -(-len(sizes) // wrap), min(wrap, len(sizes))
    with plot_style():
        fig = new_figure(max(2.3 * n_cols + 0.8, 7.5), 2.0 * n_rows + 1.5)  # room for the legend's note
        axes = fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False)
        for ax in axes.flat[len(rows) * len(sizes):]:
            ax.set_visible(False)
        for k, (row, bs) in enumerate((row, bs) for row in rows for bs in sizes):
            i, j = divmod(k, n_cols)
            lr = rate_of(row, bs)
            ax, key = axes[i][j], (bs, lr)
            band = by_band.get(key)
            for split, color in TRAIN_TEST.items() if band is not None else ():  # none: pending or no ok seed
                b = band[band["split"] == split]
                # Accuracy lives in [0, 1]; a t-interval over two or three seeds does not know
                # that, and unclipped it would squash every curve into a sliver.
                low, high = b["low"].clip(0, 1), b["high"].clip(0, 1)
                ax.fill_between(b["epoch"], low, high, color=color, alpha=0.25, linewidth=0)
                few = len(b) < 3  # a curve of one or two epochs: markers and bars, or nothing would show
                ax.plot(b["epoch"], b["mean"], color=color, linewidth=1.2, marker="o" if few else None, markersize=4)
                if few:
                    ax.vlines(b["epoch"], low, high, color=color, alpha=0.5, linewidth=2)
            bad = by_curve.get(key, pd.DataFrame(columns=["status"])).query("status == 'diverged'")
            if len(bad):  # one collection, however many seeds diverged
                ax.add_collection(LineCollection([g[["epoch", "val_accuracy"]].to_numpy(dtype=float)
                                                  for _, g in bad.groupby("trial_id")],
                                                 colors=DIVERGED_COLOR, linewidths=0.7))
                if bad["epoch"].max() < 2:  # single points: a line would not show them
                    ax.scatter(bad["epoch"], bad["val_accuracy"], s=8, marker="x", color=DIVERGED_COLOR,
                               linewidth=0.7)
                ax.autoscale_view()
            label = _cell_label(by_trials.get(key, trials.iloc[:0]), expected.get((int(bs), float(lr))))
            if row is None:
                label = (f"best lr {lr_text(lr)}\n" if lr == lr else "every lr diverged\n") + label
            ax.text(0.97, 0.04, label, transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1.0})
            ax.set_title(f"batch size {bs}" if i == 0 or wrap < len(sizes) else "", fontsize="medium")
            name = "best lr" if row is None else f"lr {lr_text(lr)}"
            ax.set_ylabel(f"{name}\naccuracy" if j == 0 else "")
            ax.set_xlabel("epoch" if k + n_cols >= len(rows) * len(sizes) else "")
            if wrap < len(sizes):  # a wrapped last row may be short: label every panel's epochs
                ax.xaxis.set_tick_params(labelbottom=True)
        last = int(curve["epoch"].max()) if len(curve) else 1  # the axes share x: set once, whole epochs
        if last <= 3:  # one to three epochs: a tick at each, the markers clear of the edges
            axes[0][0].set_xlim(0.5, last + 0.5)
            axes[0][0].xaxis.set_major_locator(FixedLocator(range(1, last + 1)))
        else:
            axes[0][0].xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        handles = [Line2D([], [], color=c, label=s) for s, c in TRAIN_TEST.items()]
        if (curve["status"] == "diverged").any():
            handles.append(Line2D([], [], color=DIVERGED_COLOR, linewidth=0.7, label="diverged seed (test)"))
        left_out = [b for b in all_sizes if b not in sizes]
        panels = choice.caption + (f"; batch sizes: {len(sizes)} log-spaced of the {len(all_sizes)} tried "
                                   f"({len(left_out)} left out: {', '.join(map(str, left_out))})" if left_out
                                   else "; every batch size tried")
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize="small",
                   title_fontsize="small", title="mean over ok seeds with 95% CI band (clipped to [0, 1])\n"
                                                 "train = running accuracy over the epoch's batches, "
                                                 "test = after the epoch\n" + wrap_to(fig, panels))
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
                          expected: Mapping[tuple[int, float], int] | None = None,
                          cells: pd.DataFrame | None = None) -> Figure:
    """Mean final test accuracy over the ok seeds of each (batch size, learning rate) cell. Up to
    LABEL_MAX_RATES x LABEL_MAX_SIZES cells each is labelled with its 95% CI and seed counts; a
    cell whose seeds all diverged or failed is hatched and labelled, a cell where some did has a
    red frame and says how many were left out of the mean. A denser grid is drawn on log axes
    without per-cell text (``_dense_heatmap``). ``cells``: ``analysis.summarize_cells`` of the
    trials, when the caller has it (it is computed otherwise)."""
    cells = analysis.summarize_cells(trials) if cells is None else cells
    expected = expected or {}
    sizes = sorted({*cells["batch_size"], *(b for b, _ in expected)})
    rates = sorted({*cells["learning_rate"], *(lr for _, lr in expected)}, reverse=True)
    grid = cells.pivot(index="learning_rate", columns="batch_size", values="test_acc_mean")
    grid = grid.reindex(index=rates, columns=sizes)
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmin, vmax = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if vmax - vmin < 0.02:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    cmap = sns.color_palette("viridis", as_cmap=True)
    if len(rates) > LABEL_MAX_RATES or len(sizes) > LABEL_MAX_SIZES:
        return _dense_heatmap(cells, grid, expected, cmap, vmin, vmax, note)
    by_cell = {(int(r.batch_size), float(r.learning_rate)): r for r in cells.itertuples()}
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
        add_caption(fig, f"every cell tried ({len(rates)} learning rates × {len(sizes)} batch sizes): "
                         "mean [95% CI: Student t over the n ok seeds of a cell, clipped to [0, 1]]\n"
                         "hatched: no ok seed (all diverged, failed or not run)\n"
                         "red frame: some seeds diverged or failed; they are left out of the mean")
        add_title(fig, "Final test accuracy", note)
    return fig


def _edges(values) -> np.ndarray:
    """Cell boundaries on a log axis: geometric midpoints, the outer cells as wide as their neighbour."""
    v = np.asarray(sorted(values), dtype=float)
    if len(v) == 1:
        return np.array([v[0] / 2 ** 0.5, v[0] * 2 ** 0.5])
    mid = np.sqrt(v[:-1] * v[1:])
    return np.concatenate([[v[0] ** 2 / mid[0]], mid, [v[-1] ** 2 / mid[-1]]])


def _dense_heatmap(cells: pd.DataFrame, grid: pd.DataFrame, expected, cmap, vmin: float, vmax: float,
                   note: str) -> Figure:
    """The heatmap of a grid too dense for numbers in its cells: cells at their batch size and
    learning rate on log axes (log2, log10), colour = mean final test accuracy; a cell with no ok
    seed in the colour of why (diverged, failed, not run), a red dot where some seeds were lost."""
    grid = grid.sort_index()  # learning rates ascending, up the axis
    sizes, rates = list(grid.columns), list(grid.index)
    status = cells.set_index(analysis.CELL).reindex(pd.MultiIndex.from_product([sizes, rates]))
    ok, diverged, failed = (status[c].fillna(0).to_numpy().reshape(len(sizes), len(rates)).T
                            for c in ("ok", "diverged", "failed"))
    # Why a cell has no colour: 0 every seed diverged, 1 failed (more failed than diverged), 2 not run.
    why = np.where(diverged + failed == 0, 2, np.where(diverged >= failed, 0, 1)).astype(float)
    why = np.ma.masked_where(ok > 0, why)
    xs, ys = _edges(sizes), _edges(rates)
    with plot_style():
        fig = new_figure(min(16.0, max(7.5, 0.45 * len(sizes) + 4.0)), min(16.0, max(5.5, 0.065 * len(rates) + 3.4)))
        ax = fig.subplots()
        mesh = ax.pcolormesh(xs, ys, np.ma.masked_invalid(grid.to_numpy(dtype=float)), cmap=cmap, vmin=vmin,
                             vmax=vmax, edgecolors="none")
        ax.pcolormesh(xs, ys, why, cmap=ListedColormap([DIVERGED_COLOR, FAILED_COLOR, "#dddddd"]), vmin=-0.5,
                      vmax=2.5, edgecolors="none")
        lost = (diverged + failed > 0) & (ok > 0)
        yi, xi = np.nonzero(lost)
        ax.scatter(np.asarray(sizes)[xi], np.asarray(rates)[yi], s=6, color="red", linewidth=0, zorder=3)
        fig.colorbar(mesh, ax=ax, label="final test accuracy, mean over ok seeds")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=10)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.xaxis.set_major_locator(FixedLocator(sizes) if len(sizes) <= LABEL_MAX_SIZES else LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        span = ys[-1] / ys[0]
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 300 else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: lr_text(v)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
        ax.grid(False)
        ax.set_xlabel("batch size (log2)")
        ax.set_ylabel("learning rate (log)")
        pending = len(set(expected) - set(zip(cells["batch_size"], cells["learning_rate"])))
        add_caption(fig, f"every cell tried ({len(rates)} learning rates × {len(sizes)} batch sizes), each drawn at "
                         f"its batch size and rate; past {LABEL_MAX_RATES} rates or {LABEL_MAX_SIZES} batch sizes "
                         f"the per-cell numbers (mean, CI, seeds) are left out: summary.csv has them\n"
                         f"grey: every seed diverged; purple: failed; light grey: not run"
                         + (f" ({pending} cells pending)" if pending else "")
                         + "; red dot: some seeds diverged or failed, left out of the mean")
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
