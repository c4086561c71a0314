"""Pure plotting of how a study changes with batch size: training speed, the three clocks to a
target accuracy, the best learning rate and seed-to-seed stability. Same rules as
``harness.figures``: frames in, a Figure out, no I/O; the numbers come from ``harness.analysis``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator,
                               ScalarFormatter)

from harness import analysis, scaling
from harness.figures import (add_caption, add_title, bs_axis, bs_palette, choose_rates, lr_palette, lr_text, new_figure,
                             plot_style, wrap_to)

CLOCK_LABELS = {"epochs": "epochs to target", "updates": "updates to target",
                "seconds": "seconds to target"}
MEDIAN_COLOR, SEED_COLOR = "#1f77b4", "#9aa5b1"
MAX_TRIED_LINES = 16  # past this many rates tried, the best-rate figure marks them on its edge instead


def _count(v, _=None) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def log_axis(ax, axis: str = "y", base: float = 2) -> None:
    """Log scale with plain-number labels, chosen from what is drawn (call it after plotting).
    A range narrower than 4x gets evenly spaced ticks: a log locator finds at most one power in it."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", base=base)
    ax.autoscale_view()
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target = ax.yaxis if axis == "y" else ax.xaxis
    if high / low < 4:
        target.set_major_locator(MaxNLocator(nbins=5))
        target.set_major_formatter(ScalarFormatter(useOffset=False))
    else:
        span = high / low
        target.set_major_locator(LogLocator(base=base, subs=(1.0, 2.0, 5.0) if base == 10 and span < 300 else (1.0,)))
        target.set_major_formatter(FuncFormatter(_count))
    target.set_minor_locator(NullLocator())


def rates_tried_axis(ax, rates, labelled=None) -> bool:
    """A log learning-rate y axis that shows every rate tried: up to MAX_TRIED_LINES rates, a grey
    line each and a tick at each of ``labelled`` (default: all); past that, a grey mark per rate
    on the right edge and log ticks (decades; 1-2-5 when the rates span less than 300x), since
    a line and a label per rate would grey the panel and overprint. True when dense."""
    rates = sorted(float(r) for r in rates)
    dense = len(rates) > MAX_TRIED_LINES
    if dense:
        ax.scatter([1.0] * len(rates), rates, marker="_", s=60, color="#999999", clip_on=False,
                   transform=ax.get_yaxis_transform(), zorder=1, gid="rates tried")
    else:
        for lr in rates:
            ax.axhline(lr, color="#cccccc", linewidth=0.8, zorder=1)
    ax.set_yscale("log")
    span = rates[-1] / rates[0]
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 300 else (1.0, 2.0, 5.0)) if dense
                               else FixedLocator(rates if labelled is None else labelled))
    ax.yaxis.set_minor_locator(NullLocator())
    if dense:  # a faint grid at the log ticks instead of the lines
        ax.grid(True, axis="y", color="#eeeeee")
    else:
        ax.grid(False, axis="y")
    return dense


def rates_tried_note(count: int) -> str:
    """The caption's words for what ``rates_tried_axis`` drew."""
    if count > MAX_TRIED_LINES:
        return (f"the {count} rates tried are grey marks on the right edge, with log ticks (past {MAX_TRIED_LINES} "
                "rates a line and a tick per rate would fill the panel)")
    return f"grey lines: the {count} rates tried"


def _not_reached(ax, sizes, label: str = "never reaches target", color: str = "black") -> None:
    """Triangles on the top edge for batch sizes that have no value to plot."""
    if len(sizes):
        ax.scatter(list(sizes), [0.96] * len(sizes), marker="^", s=60, color=color, clip_on=False,
                   zorder=5, transform=ax.get_xaxis_transform(), label=label)


def _shared_legend(fig: Figure, caption: str = "") -> None:
    """One legend under the panels with every label once, so no legend sits on the data; the
    caption rides along as its title (a separate caption would collide with it)."""
    seen: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=max(len(seen), 1), frameon=False,
               title=wrap_to(fig, caption) or None, title_fontsize="small", fontsize="small")


def _cells(cells: pd.DataFrame | None, trials, epochs, target, points, probes) -> pd.DataFrame:
    """The per-cell summary the figures select on: the caller's, or computed from the frames."""
    if cells is not None:
        return cells
    return analysis.summarize_cells(analysis.enrich(trials, epochs, target, points, probes))


def plot_training_speed(trials: pd.DataFrame, epochs: pd.DataFrame, target: float = 0.8,
                        note: str = "", points: pd.DataFrame | None = None,
                        probes: pd.DataFrame | None = None, cells: pd.DataFrame | None = None) -> Figure:
    """Wall clock per trial and per epoch against batch size (mean over trials of all learning
    rates, 95% CI), and test accuracy against (amortized) seconds for each batch size at the rate
    that reaches ``target`` soonest (else the most accurate rate). Isolated and amortized
    (fused-group) timings are separate lines, never pooled. ``cells``: ``analysis.summarize_cells``
    of ``analysis.enrich`` at ``target``, when the caller has it (computed otherwise)."""
    enriched = analysis.with_derived(trials)
    ok = enriched[enriched["status"] == "ok"]  # a diverged trial stopped early: its total says nothing
    finished = enriched[enriched["status"].isin(["ok", "diverged"])]
    sizes = sorted(trials["batch_size"].unique())
    best = analysis.best_lr_for_time(_cells(cells, trials, epochs, target, points, probes))
    # Only the best cells' epochs are drawn: select the trials first, so the merge reads no more.
    shown = trials.merge(best[["batch_size", "learning_rate"]], on=["batch_size", "learning_rate"])
    curve = analysis.curves(shown, epochs, probes).query("status == 'ok'").dropna(subset=["seconds"])
    curve["timing"] = analysis.timing_kind(curve)
    kinds = sorted(finished["timing"].unique())
    with plot_style():
        fig = new_figure(15.0, 4.6)
        ax_trial, ax_epoch, ax_acc = fig.subplots(1, 3)
        for ax, frame, col, label in ((ax_trial, ok, "wall_clock_s", "seconds per trial"),
                                      (ax_epoch, finished, "epoch_s", "seconds per epoch")):
            if len(frame):
                sns.lineplot(frame, x="batch_size", y=col, hue="timing", hue_order=kinds, style="engine",
                             markers=True, dashes=False, errorbar=analysis.ci_band, ax=ax,
                             palette="colorblind", legend=ax is ax_trial)
            bs_axis(ax, sizes)
            log_axis(ax, base=10)
            ax.set_ylabel(label)
        if ax_trial.get_legend():
            sns.move_legend(ax_trial, "best", fontsize="x-small", title_fontsize="x-small")
        palette = bs_palette(sizes)
        for (bs, kind), g in curve.groupby(["batch_size", "timing"]):
            mean = g.groupby("epoch")[["seconds", "val_accuracy"]].mean()
            ax_acc.plot(mean["seconds"], mean["val_accuracy"], color=palette[int(bs)], linewidth=1.3,
                        linestyle="-" if kind == analysis.ISOLATED else "--")
        ax_acc.axhline(target, color="black", linestyle=":", linewidth=1)
        log_axis(ax_acc, axis="x", base=10)
        ax_acc.set_xlabel("seconds of training (log): " + ("updates × probed s/update" if probes is not None
                                                              and len(probes) else "isolated trials' own clock"))
        ax_acc.set_ylabel("test accuracy (mean over seeds)")
        handles = [Line2D([], [], color=palette[int(b)], label=f"{b} (lr {lr_text(lr)})")
                   for b, lr in zip(best["batch_size"], best["learning_rate"])]
        handles.append(Line2D([], [], color="black", linestyle=":", label=f"target {target:g}"))
        ax_acc.legend(handles=handles, title="batch size", fontsize="x-small", title_fontsize="x-small",
                      loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax_acc.set_title("time to accuracy, fastest lr per batch size", fontsize="medium")
        ax_trial.set_title("wall clock per trial (ok trials)", fontsize="medium")
        ax_epoch.set_title("wall clock per epoch (fused groups: ok trials)" if analysis.AMORTIZED in kinds
                           else "wall clock per epoch", fontsize="medium")
        caption = (f"left and middle: the trials of all {trials['learning_rate'].nunique()} learning rates pooled per "
                   "batch size (mean, 95% CI); right: one learning rate per batch size (the fastest to the target, "
                   "else the most accurate), the others left out")
        if analysis.AMORTIZED in kinds:
            caption += ("\namortized = a fused group's time divided by its size, not an isolated measurement (per epoch: "
                        "ok trials only, a diverged member's share covers the others' epochs); it never enters the "
                        "time-to-accuracy panel, which needs a timing probe (timing_probe: true) for fused trials")
        add_caption(fig, caption)
        add_title(fig, "Training speed", note)
    return fig


def plot_updates_to_target(trials: pd.DataFrame, epochs: pd.DataFrame, target: float = 0.8,
                           note: str = "", points: pd.DataFrame | None = None,
                           probes: pd.DataFrame | None = None, enriched: pd.DataFrame | None = None,
                           cells: pd.DataFrame | None = None) -> Figure:
    """The three clocks to ``target`` accuracy on the selection split against batch size, each
    at the learning rate that is best for it (median over seeds, grey dots = single seeds).
    Perfect scaling (twice the batch, half the updates; the same number of epochs) is drawn for
    reference, and batch sizes that never reach the target are triangles on the top edge.
    ``enriched`` and ``cells``: ``analysis.enrich`` at ``target`` and its ``summarize_cells``, when
    the caller has them (computed otherwise)."""
    if enriched is None:
        enriched = analysis.enrich(trials, epochs, target, points, probes)
    cells = analysis.summarize_cells(enriched) if cells is None else cells
    sizes = sorted(trials["batch_size"].unique())
    with plot_style():
        fig = new_figure(15.0, 4.8)
        for ax, clock in zip(fig.subplots(1, 3), ("epochs", "updates", "seconds")):
            col = analysis.CLOCKS[clock]
            best = analysis.best_lr_by_clock(cells, clock)
            reached = best[np.isfinite(best[col])]
            seeds = enriched.merge(reached[["batch_size", "learning_rate"]], on=["batch_size", "learning_rate"])
            seeds = seeds[np.isfinite(seeds[col])]
            ax.scatter(seeds["batch_size"], seeds[col], s=14, color=SEED_COLOR, label="single seeds", zorder=2)
            ax.plot(reached["batch_size"], reached[col], marker="o", color=MEDIAN_COLOR, zorder=3,
                    label="median over seeds, best lr")
            for k, r in enumerate(reached.itertuples()):  # above and below in turn: neighbours never overlap
                ax.annotate(lr_text(r.learning_rate), (r.batch_size, getattr(r, col)), textcoords="offset points",
                            xytext=(0, 8 if k % 2 == 0 else -13), ha="center", fontsize="x-small")
            if clock == "updates" and len(reached):
                ideal = analysis.perfect_scaling(best)
                ax.plot(ideal["batch_size"], ideal[col], color="black", linestyle="--", linewidth=1,
                        label="perfect scaling")
            if clock == "epochs" and len(reached):
                ax.plot([reached["batch_size"].iloc[0], sizes[-1]], [reached[col].iloc[0]] * 2, color="black",
                        linestyle="--", linewidth=1, label="perfect scaling")
            _not_reached(ax, best.loc[~np.isfinite(best[col]), "batch_size"])
            bs_axis(ax, sizes)
            ax.margins(y=0.12)
            if len(reached):
                log_axis(ax, base=10 if clock == "seconds" else 2)
            else:  # nothing to put on a log scale: say so instead of ticking an empty range
                ax.set_yticks([])
                ax.text(0.5, 0.5, f"no batch size reaches {target:g}", transform=ax.transAxes, ha="center")
            ax.set_ylabel(CLOCK_LABELS[clock] + " (log)")
        caption = ("perfect scaling: the same number of epochs at every batch size, so each doubling of "
                   "the batch halves the updates; anchored at the smallest batch size that reaches the target")
        caption += ("\nseconds = updates to target × the timing probe's seconds per update (one Keras model, one "
                    "thread)" if probes is not None and len(probes) else
                    "\nseconds: isolated trials' own clock; fused trials have none without a timing probe")
        caption += (f"; points and labels: each batch size's best learning rate only, of the "
                    f"{trials['learning_rate'].nunique()} tried; {scaling.selection(trials).caption}")
        _shared_legend(fig, caption)
        split = "validation" if analysis.selection_metric(trials) == "val_accuracy" else "test"
        add_title(fig, f"Speed of learning to {target:g} {split} accuracy: three clocks "
                    f"(resolution: {analysis.clock_resolution(trials, points)})", note)
    return fig


def plot_best_learning_rate(trials: pd.DataFrame, epochs: pd.DataFrame, target: float = 0.8,
                            note: str = "", points: pd.DataFrame | None = None,
                            probes: pd.DataFrame | None = None, cells: pd.DataFrame | None = None) -> Figure:
    """Best learning rate against batch size, by final accuracy on the selection split (among
    rates where no seed diverged) and by fewest updates to ``target``. Grey lines are the rates
    tried (past MAX_TRIED_LINES rates, grey marks on the right edge, and log ticks:
    ``rates_tried_axis``), so a winner on the edge of the grid (a sign the grid is too narrow)
    is plain to see. ``cells``: as ``plot_training_speed`` takes it."""
    cells = _cells(cells, trials, epochs, target, points, probes)
    chosen = scaling.selection(trials)
    by_acc = analysis.best_lr_by_accuracy(cells, "val" if chosen.split == "validation" else "test")
    by_updates = analysis.best_lr_by_clock(cells, "updates")
    rates = sorted(trials["learning_rate"].unique())
    with plot_style():
        fig = new_figure(7.5, 4.6)
        ax = fig.subplots()
        dense = rates_tried_axis(ax, rates)
        ax.plot(by_acc["batch_size"], by_acc["learning_rate"], marker="o", markersize=11, fillstyle="none",
                linewidth=1.5, label=f"highest final {chosen.split} accuracy", zorder=3)
        ax.plot(by_updates["batch_size"], by_updates["learning_rate"], marker="s", markersize=5, linestyle="--",
                label=f"fewest updates to {target:g}", zorder=4)
        edge = analysis.at_edge(pd.concat([by_acc, by_updates])[["batch_size", "learning_rate"]], rates)
        if len(edge):
            ax.scatter(edge["batch_size"], edge["learning_rate"], marker="x", s=40, color="red", zorder=5,
                       label="best at the edge of the rates tried")
        _not_reached(ax, by_acc.loc[by_acc["learning_rate"].isna(), "batch_size"], "every lr diverged", "C0")
        _not_reached(ax, by_updates.loc[by_updates["learning_rate"].isna(), "batch_size"],
                     f"no lr reaches {target:g}", "C1")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: lr_text(v)))
        ax.set_ylim(rates[0] / 1.6, rates[-1] * 1.6)
        bs_axis(ax, trials["batch_size"].unique())
        ax.set_ylabel("learning rate (log)" if dense else "learning rate (grey: rates tried)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.04, 1.0), frameon=False)
        add_caption(fig, f"one best rate per batch size by each rule, among every rate tried; "
                         f"{rates_tried_note(len(rates))}; {chosen.caption}")
        add_title(fig, "Best learning rate by batch size", note)
    return fig


def plot_stability(trials: pd.DataFrame, epochs: pd.DataFrame, note: str = "",
                   cells: pd.DataFrame | None = None) -> Figure:
    """Per learning rate against batch size: the spread across seeds of the final test accuracy
    (standard deviation over ok seeds), the noise left in the curves (std of the test accuracy
    over the last 10% of epochs, mean over seeds) and the share of seeds that diverged. A dense
    grid draws the rates ``figures.choose_rates`` picks (each batch size's best as one black line,
    and a few log-spaced ones), and its caption says which. ``cells``: ``analysis.summarize_cells``
    of ``analysis.enrich`` at any target (none of these columns depends on it), when the caller has it."""
    cells = _cells(cells, trials, epochs, math.inf, None, None)
    choice = choose_rates(trials)
    best = pd.DataFrame({"batch_size": list(choice.best), "learning_rate": list(choice.best.values())})
    best = cells.merge(best.dropna(), on=["batch_size", "learning_rate"]).sort_values("batch_size")
    cells = cells[cells["learning_rate"].isin(choice.rates)].copy()
    cells["lr"] = [lr_text(lr) for lr in cells["learning_rate"]]
    palette = lr_palette(choice.rates)
    panels = (("test_acc_std", "std of final test accuracy\nacross seeds"),
              ("curve_noise", "std of test accuracy over\nlast 10% of epochs"),
              ("share_diverged", "share of seeds diverged"))
    with plot_style():
        fig = new_figure(15.0, 4.4)
        axes = fig.subplots(1, 3)
        for ax, (col, label) in zip(axes, panels):
            shown = cells.dropna(subset=[col])
            if len(shown):
                sns.lineplot(shown, x="batch_size", y=col, hue="lr", hue_order=list(palette), palette=palette,
                             marker="o", ax=ax, legend=ax is axes[-1])
            top = best.dropna(subset=[col])
            if len(top):
                ax.plot(top["batch_size"], top[col], color="black", marker="s", markersize=4, linewidth=1.6,
                        label="best lr of each batch size")
            if not len(shown) and not len(top):
                ax.text(0.5, 0.5, "needs 2 or more ok seeds per cell", transform=ax.transAxes, ha="center")
            bs_axis(ax, cells["batch_size"])
            ax.set_ylabel(label)
        axes[2].set_ylim(-0.05, 1.05)
        if len(best) or len(cells):
            axes[-1].legend(*axes[-1].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                            title="learning rate", frameon=False)
        add_caption(fig, choice.caption)
        add_title(fig, "Stability across seeds", note)
    return fig
