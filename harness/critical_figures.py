"""Pure plotting of the critical batch size (McCandlish et al. 2018; Shallue et al. 2018), the
learning rates that go with it (Goyal et al. 2017) and the SGD noise scale (Smith & Le 2018).
Same rules as ``harness.figures``: frames and ``scaling.TargetFit``s in, a Figure out, no I/O;
the numbers come from ``harness.critical`` and ``harness.scaling``.
"""
from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator

from harness import analysis, critical
from harness.figures import DIVERGED_COLOR, add_title, bs_axis, bs_palette, new_figure, plot_style
from harness.scaling import Selection, TargetFit
from harness.scaling_figures import MAX_TRIED_LINES, log_axis, rates_tried_axis, rates_tried_note

ROWS = {"val_accuracy": "accuracy on the validation rows", "test_accuracy": "accuracy on the test rows",
        "train_loss": "cross-entropy on all training rows"}
SHORT = {"val_accuracy": "val acc", "test_accuracy": "test acc", "train_loss": "train loss"}
STEPS = ("steps = optimizer updates to the first evaluation point of the update clock at which the target is "
         "reached (resolution: one clock point), median over seeds at each batch size's best (learning rate, "
         "momentum); a diverged seed never reaches")


def _num(v: float, digits: int = 2) -> str:
    """Compact number: '0.1', '0.32', '37', '1,234', '3.2e-2', '1e-3', '4.5e7' (never '0.031623')."""
    if not math.isfinite(v) or v == 0:
        return f"{v:g}"
    if 0.1 <= abs(v) < 1e7:
        return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _si(v, _=None) -> str:
    """Plain tick numbers short enough to sit side by side: 500, 2k, 50k, 1.5M."""
    return next((f"{v / s:g}{u}" for s, u in ((1e6, "M"), (1e3, "k")) if abs(v) >= s), f"{v:g}")


def _guide(ax, x, y, **style) -> Line2D:
    """A reference line that does not widen the axes' data limits (autoscaling ignores it)."""
    return ax.add_artist(Line2D(np.asarray(x, dtype=float), np.asarray(y, dtype=float), **style))


def _edge_labels(ax, axis: str, positions, labels, title: str = "") -> None:
    """Labels on a secondary axis (top for 'x', right for 'y'): laid out with the figure, never on the data."""
    sec = ax.secondary_xaxis("top") if axis == "x" else ax.secondary_yaxis("right")
    sec.set_ticks(list(positions), list(labels))
    (sec.xaxis if axis == "x" else sec.yaxis).set_minor_locator(NullLocator())
    sec.tick_params(which="both", length=0, labelsize="x-small")
    (sec.set_xlabel if axis == "x" else sec.set_ylabel)(title, fontsize="x-small")


def _edge_markers(ax, xs, y: float, color, marker: str = "^", gid: str = "not reached", label=None,
                  rasterized: bool = False) -> None:
    """Markers at height ``y`` (axes fraction) for x values that have nothing to plot on y."""
    if len(xs):
        ax.scatter(list(xs), [y] * len(xs), marker=marker, s=55, color=color, clip_on=False, zorder=6,
                   transform=ax.get_xaxis_transform(), gid=gid, label=label, rasterized=rasterized)


def _bcrit(interval: critical.FrontierInterval) -> str:
    low, high = interval.b_crit
    ci = f" [{_num(low)}, {_num(high)}]" if math.isfinite(low) and math.isfinite(high) else " [no interval]"
    where = " (extrapolated)" if interval.frontier.extrapolated else ""
    return f"B_crit = {_num(interval.frontier.b_crit)}{ci}{where}"


def _b_crit_bar(ax, x: float, interval: critical.FrontierInterval, color, label: str) -> None:
    """B_crit at ``x`` with its bootstrap interval as an error bar (none when it has no interval)."""
    b, (low, high) = interval.frontier.b_crit, interval.b_crit
    # A percentile bootstrap interval need not contain the fit on the full data (seen on a dense
    # one-epoch grid): the bar then reaches the interval's near end from the point, not past it.
    err = [[max(b - low, 0.0)], [max(high - b, 0.0)]] if math.isfinite(low) and math.isfinite(high) else None
    ax.errorbar([x], [b], yerr=err, fmt="o", color=color, capsize=4, markersize=7, zorder=5, label=label)


def _target_label(fit: TargetFit, mark: str = "") -> str:
    missing = fit.best.loc[~np.isfinite(fit.best["steps"]), "batch_size"]
    text = f"{fit.label}: " + (_bcrit(fit.interval) if fit.interval else "no fit (reason above)")
    return text + (f"; never reached at B = {', '.join(f'{b:g}' for b in missing)}{mark}" if len(missing) else "")


def _fit_notes(fits: Sequence[TargetFit]) -> list[str]:
    """Which rows each metric is measured on, the fit's definition, and why a target has no fit."""
    lines = ["; ".join(f"{m.replace('_', ' ')} = {ROWS.get(m, m)}" for m in dict.fromkeys(f.metric for f in fits))]
    fitted = [f.interval for f in fits if f.interval]
    if fitted:
        lines.append(f"fit: S = S_min(1 + B_crit/B) in log S; brackets: {fitted[0].level:.0%} bootstrap interval "
                     f"over seeds ({fitted[0].n_boot} replicates)")
    return lines + [f"no fit for {f.label}: {f.reason}" for f in fits if f.interval is None]


def _finish(fig: Figure, title: str, note: str, lines, selection: Selection, ncols: int = 1, extra=()) -> None:
    """One legend under the panels with every label of every panel once (then ``extra`` proxies);
    the caption (wrapped lines, then the selection) is its title."""
    seen: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    seen.update((h.get_label(), h) for h in extra)
    width = int(fig.get_figwidth() * 15)
    caption = "\n".join([*(textwrap.fill(x, width) for x in lines if x), selection.caption])
    fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=max(1, min(ncols, len(seen))),
               frameon=False, fontsize="small", title=caption, title_fontsize="small")
    add_title(fig, title, note)


def _per_metric(fits: Sequence[TargetFit], draw, height: float, title: str, note: str, lines,
                selection: Selection, extra=()) -> Figure:
    """A panel per target metric (accuracies first, then the training loss), one colour per target
    across panels; ``draw(ax, group, colors, sizes)`` fills a panel."""
    metrics = sorted(dict.fromkeys(f.metric for f in fits), key=lambda m: (m == "train_loss", m))
    panels = [(m, [f for f in fits if f.metric == m]) for m in metrics] or [("", [])]
    palette = sns.color_palette("tab10", 10)
    colors = {id(f): palette[i % 10] for i, f in enumerate(f for _, g in panels for f in g)}
    sizes = sorted({int(b) for f in fits for b in f.best["batch_size"]}) or [1]
    with plot_style():
        fig = new_figure(max(7.0, 6.2 * len(panels)), height)
        for ax, (metric, group) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            draw(ax, group, colors, sizes)
            ax.set_title(f"{metric.replace('_', ' ')} targets" if metric else "no targets", fontsize="medium")
        _finish(fig, title, note, [STEPS, *_fit_notes(fits), *lines], selection, extra=extra)
    return fig


def plot_steps_vs_examples(fits: Sequence[TargetFit], selection: Selection, note: str = "") -> Figure:
    """Steps S against examples E = S·B to each target (log-log), one panel per metric: measured
    points (each on the grey diagonal of its batch size), the fitted frontier
    (S/S_min − 1)(E/E_min − 1) = 1 traced over B, and S_min, E_min as dashed asymptotes of the
    hardest target of each panel whose B_crit lies among the batch sizes tried (else the hardest)."""
    return _per_metric(fits, _examples_panel, 6.8, "Steps vs examples to target: (S/S_min − 1)(E/E_min − 1) = 1 "
                       "(McCandlish et al. 2018)", note, [], selection)


def _examples_panel(ax, group, colors, sizes) -> None:
    grid = np.geomspace(sizes[0] / 4, sizes[-1] * 4, 200)
    for fit in group:
        c, best = colors[id(fit)], fit.best[np.isfinite(fit.best["steps"])]
        ax.plot(best["examples"], best["steps"], "o", color=c, zorder=4, label=_target_label(fit))
        if fit.interval:
            ax.plot(fit.interval.frontier.examples(grid), fit.interval.frontier.steps(grid), color=c, zorder=3)
    fitted = [f for f in group if f.interval]
    if fitted:
        fit = ([f for f in fitted if not f.interval.frontier.extrapolated] or fitted)[-1]
        front, c = fit.interval.frontier, colors[id(fit)]
        ax.axhline(front.s_min, color=c, linestyle="--", linewidth=1, label=f"asymptotes of {fit.label}: S_min = "
                   f"{_num(front.s_min, 3)} updates, E_min = {_num(front.e_min, 3)} examples")
        ax.axvline(front.e_min, color=c, linestyle="--", linewidth=1)
    ax.margins(0.08)
    log_axis(ax, "x", base=10)
    log_axis(ax, "y", base=10)
    ax.xaxis.set_major_formatter(FuncFormatter(_si))
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    top, right = {}, {}  # each batch size's diagonal E = B·S, labelled where it leaves the axes
    for b in sizes:
        _guide(ax, [x0, x1], [x0 / b, x1 / b], color="#bbbbbb", linewidth=0.6, zorder=1)
        if x0 <= b * y1 <= x1:
            top[b * y1] = f"{b:g}"
        elif y0 <= x1 / b <= y1:
            right[x1 / b] = f"{b:g}"
    for axis, where, title in (("x", top, "batch size B of the grey diagonal E = B·S"),
                               ("y", right, "B of the diagonal")):
        if where:
            _edge_labels(ax, axis, where, where.values(), title)
    ax.set_xlabel("examples to target E = S·B (log)")
    ax.set_ylabel("steps to target S, optimizer updates (log)")


def plot_steps_to_target(fits: Sequence[TargetFit], selection: Selection, note: str = "") -> Figure:
    """Updates to target against batch size (log2 x, log y), one panel per metric: medians
    (markers), the fit S = S_min(1 + B_crit/B) (line), B_crit (dashed) with its bootstrap interval
    (band), perfect scaling S ∝ 1/B from the smallest batch size reaching (dotted), and the three
    regions of the first fitted target along the top. ▲ on the top edge: not reached."""
    covered = []
    for fit in (f for f in fits if f.interval):
        have = critical.regions_covered(critical.regions(fit.best, fit.interval.frontier))
        absent = [r for r in critical.REGIONS if r not in have]
        covered.append(f"{fit.label}: data covers {', '.join(have) or 'no region'}"
                       + (f"; absent: {', '.join(absent)}" if absent else ""))
    regions = ("regions: perfect scaling B < B_crit/3 (S within 4/3 of S_min·B_crit/B), diminishing returns, "
               "plateau B > 3·B_crit (within 4/3 of S_min); " + " | ".join(covered)) if covered else ""
    extra = [Line2D([], [], color="black", linestyle=":", linewidth=1,
                    label="perfect scaling S ∝ 1/B, from the smallest batch size reaching"),
             Line2D([], [], color="black", linestyle="--", label="B_crit, band: its interval")]
    return _per_metric(fits, _steps_panel, 6.6, "Updates to target vs batch size: critical batch size "
                       "(resolution: one clock point)", note, [regions], selection, extra)


def _steps_panel(ax, group, colors, sizes) -> None:
    bs_axis(ax, sizes)
    x0, x1 = ax.get_xlim()
    grid = np.geomspace(x0, x1, 200)
    for i, fit in enumerate(group):
        c, best = colors[id(fit)], fit.best[np.isfinite(fit.best["steps"])]
        off = fit.interval is not None and not x0 <= fit.interval.frontier.b_crit <= x1
        ax.plot(best["batch_size"], best["steps"], "o", color=c, markersize=7, zorder=4, label=_target_label(
            fit, " (▲ on top)") + ("; ◀ ▶ on the edge: B_crit off the axis" if off else ""))
        _edge_markers(ax, fit.best.loc[~np.isfinite(fit.best["steps"]), "batch_size"], 0.97 - 0.05 * i, c)
        if len(best):
            b, s = best["batch_size"].iloc[0], best["steps"].iloc[0]
            _guide(ax, grid[grid >= b], s * b / grid[grid >= b], color=c, linestyle=":", linewidth=1)
        if fit.interval:
            front, (low, high) = fit.interval.frontier, fit.interval.b_crit
            ax.plot(grid, front.steps(grid), color=c, linewidth=1.5, zorder=3)
            ax.axvline(front.b_crit, color=c, linestyle="--", linewidth=1.2)
            if math.isfinite(low) and math.isfinite(high):
                ax.axvspan(low, high, color=c, alpha=0.12, linewidth=0)
            if off:  # an arrow on the edge points at it
                right = front.b_crit > x1
                _edge_markers(ax, [x1 if right else x0], 0.5, c, ">" if right else "<", gid="b_crit off axis")
    first = next((f for f in group if f.interval), None)
    if first:  # region boundaries B_crit/3 and 3·B_crit, names along the top where there is room
        b = first.interval.frontier.b_crit
        edges, where = [x0, b / critical.REGION_RATIO, b * critical.REGION_RATIO, x1], {}
        for lo, hi, name in zip(edges, edges[1:], ("perfect\nscaling", "diminishing\nreturns", "plateau")):
            lo, hi = max(lo, x0), min(hi, x1)
            if hi > lo and math.log(hi / lo) > 0.12 * math.log(x1 / x0):
                where[math.sqrt(lo * hi)] = name
        for edge in edges[1:3]:
            if x0 < edge < x1:
                ax.axvline(edge, color="#888888", linewidth=0.8, linestyle=(0, (1, 3)), zorder=1)
        _edge_labels(ax, "x", where, where.values(), f"regions of {first.label}")
    ax.margins(y=0.15)
    log_axis(ax, base=2)
    ax.set_ylabel("updates to target (log)")


def plot_critical_vs_noise(fits: Sequence[TargetFit], curve: pd.DataFrame, selection: Selection,
                           note: str = "") -> Figure:
    """Left: B_crit (bootstrap interval as error bars) per target beside the median B_simple at
    that target, their ratio under each target. Right: B_simple along training against the
    training loss (median and 25-75 % band over seeds per batch size), the training-loss targets
    dotted with their B_crit."""
    ordered = sorted(fits, key=lambda f: (f.metric == "train_loss", f.metric))
    dark = sns.color_palette("dark", 10)
    metric_colors = dict(zip(dict.fromkeys(f.metric for f in ordered), [dark[0], dark[3], dark[2]]))
    palette = bs_palette(curve["batch_size"].unique() if len(curve) else [])
    with plot_style():
        fig = new_figure(14.0, 6.6)
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.25])
        ticks = []
        for i, fit in enumerate(ordered):
            c, b_simple, ratio = metric_colors[fit.metric], float(fit.best["b_simple"].median()), "no fit"
            if fit.interval:
                _b_crit_bar(left, i - 0.12, fit.interval, c, f"B_crit, {fit.metric.replace('_', ' ')} targets")
                ratio = (f"ratio {b_simple / fit.interval.frontier.b_crit:.2g}" if math.isfinite(b_simple)
                         else "no B_simple")
                ratio += " (extrap.)" if fit.interval.frontier.extrapolated else ""
            if math.isfinite(b_simple):
                left.plot([i + 0.12], [b_simple], "s", color=c, fillstyle="none", markersize=8, markeredgewidth=1.5,
                          label=f"median B_simple at the target, {fit.metric.replace('_', ' ')} targets")
            ticks.append(f"{SHORT.get(fit.metric, fit.metric)}\n{'≥' if fit.higher_is_better else '≤'} "
                         f"{fit.target:g}\n{ratio}")
        left.set_xticks(range(len(ticks)), ticks, fontsize="x-small")
        left.set_xlim(-0.6, max(len(ticks), 1) - 0.4)
        left.margins(y=0.15)
        log_axis(left, base=10)
        left.set_ylabel("examples per update (log)")
        left.set_title("B_crit (fit) and B_simple at each target", fontsize="medium")
        for b, g in curve.sort_values("updates").groupby("batch_size"):
            g = g[g["train_loss"] < g["train_loss"].cummin().shift(fill_value=math.inf)]  # new lows only
            right.plot(g["train_loss"], g["b_simple_median"], color=palette[int(b)], linewidth=1.1, gid="b_simple",
                       label=f"B_simple, B = {b:g}")
            right.fill_between(g["train_loss"], g["b_simple_low"], g["b_simple_high"], color=palette[int(b)],
                               alpha=0.1, linewidth=0)
        if not len(curve):
            right.text(0.5, 0.5, "no B_simple measured", transform=right.transAxes, ha="center")
        losses = [f for f in ordered if f.metric == "train_loss"]
        for fit in losses:
            right.axvline(fit.target, color="black", linestyle=":", linewidth=1)
            if fit.interval:  # beside the B_simple curves it is compared with
                _b_crit_bar(right, fit.target, fit.interval, metric_colors["train_loss"], "B_crit, train loss targets")
        log_axis(right, "x", base=10)
        log_axis(right, "y", base=10)
        right.invert_xaxis()
        _edge_labels(right, "x", [f.target for f in losses], [f"≤ {f.target:g}\n" + (
            f"B_crit {_num(f.interval.frontier.b_crit)}" if f.interval else "no fit") for f in losses],
            "training-loss targets (dotted)")
        right.set_xlabel("training loss (log, falling: training runs left to right)")
        right.set_ylabel("B_simple; ● B_crit at the target (log)")
        right.set_title("B_simple over training, each batch size's best setting", fontsize="medium")
        lines = ["B_simple = tr(Σ)/|G|², exact per-example gradients over all training rows; left: at the first "
                 "evaluation point reaching the target, median over the best setting's seeds, then over batch "
                 "sizes; ratio = B_simple/B_crit. Right: median and 25-75 % band over the seeds of each batch "
                 "size's best setting at each point of the update clock (resolution: one clock point), drawn at the "
                 "points where the median training loss reaches a new low. B_crit from the fit, error bars: its "
                 "interval",
                 *_fit_notes(fits)]
        _finish(fig, "Critical batch size vs gradient noise scale B_simple (McCandlish et al. 2018)", note,
                lines, selection, ncols=3)
    return fig


def plot_learning_rate_scaling(best_lr: pd.DataFrame, stable: pd.DataFrame, rates, selection: Selection,
                               note: str = "") -> Figure:
    """Best learning rate and largest stable learning rate against batch size (log-log) over the
    rates tried (grey lines, or past 16 rates grey marks on the right edge with log ticks:
    ``scaling_figures.rates_tried_axis``), with linear (Goyal et al. 2017) and square-root
    (Krizhevsky 2014; Hoffer et al. 2017) scaling from the smallest batch size's best rate; red x:
    a winner on the edge."""
    rates = sorted({float(r) for r in rates})
    sizes = sorted({int(b) for b in (*best_lr["batch_size"], *stable["batch_size"])})
    found = best_lr.dropna(subset=["learning_rate"]).sort_values("batch_size")
    with plot_style():
        fig = new_figure(9.0, 6.4)
        ax = fig.subplots()
        # At most 8 labelled rates on a sparse axis; a dense one gets log ticks (rates_tried_axis).
        dense = rates_tried_axis(ax, rates, labelled=rates[::max(1, math.ceil(len(rates) / 8))])
        ax.plot(found["batch_size"], found["learning_rate"], marker="o", markersize=10, fillstyle="none",
                linewidth=1.5, color="C0", zorder=4, label="best lr (highest final accuracy)")
        if len(found):
            b0, lr0 = found["batch_size"].iloc[0], found["learning_rate"].iloc[0]
            x = np.geomspace(b0, sizes[-1], 50)
            for power, style, name in ((1.0, "--", "linear lr ∝ B (Goyal et al. 2017)"),
                                       (0.5, "-.", "square root lr ∝ √B (Krizhevsky 2014; Hoffer et al. 2017)")):
                _guide(ax, x, lr0 * (x / b0) ** power, color="black", linestyle=style, linewidth=1, label=name)
        edge = analysis.at_edge(found, rates)
        if len(edge):
            ax.scatter(edge["batch_size"], edge["learning_rate"], marker="x", s=50, color="red", zorder=6, gid="edge",
                       label="best at the edge of the rates tried")
        _edge_markers(ax, best_lr.loc[best_lr["learning_rate"].isna(), "batch_size"], 0.97, "C0",
                      label="top edge: no best lr (every setting diverged)")
        several = stable["momentum"].nunique() > 1
        for k, (m, g) in enumerate(stable.groupby("momentum")):
            c, tag = f"C{k + 1}", f" (momentum {m:g})" if several else ""
            ax.plot(g["batch_size"], g["largest_stable_lr"], marker="D", markersize=6, linestyle=":", color=c,
                    zorder=5, label=f"largest stable lr{tag}")
            top = g[g["largest_stable_lr"] == g["largest_lr_tried"]]
            if len(top):
                ax.plot(top["batch_size"], top["largest_stable_lr"] * 1.5, marker="$\u2191$", markersize=13,
                        linestyle="none", color=c, zorder=5, label=f"stable at every rate tried{tag}: limit above")
            _edge_markers(ax, g.loc[g["largest_stable_lr"].isna(), "batch_size"], 0.03, c, "v",
                          label=f"bottom edge: no stable lr{tag}")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _num(v)))
        ax.set_ylim(rates[0] / 1.7, rates[-1] * 2.1)
        bs_axis(ax, sizes)
        ax.set_ylabel("learning rate (log)" if dense else "learning rate (log; grey: rates tried)")
        lines = [f"best lr per batch size: highest final accuracy on the {selection.split} split "
                 "(resolution: the rates tried); largest stable lr: the largest rate at which no seed diverged "
                 "and at least one finished ok; references anchored at the smallest batch size's best lr; "
                 + rates_tried_note(len(rates))]
        _finish(fig, "Learning rate vs batch size: best and largest stable", note, lines, selection, ncols=2)
    return fig


def plot_noise_scale_collapse(trials: pd.DataFrame, selection: Selection, note: str = "") -> Figure:
    """Final test accuracy of every ok trial against the SGD noise scale g = lr·N/(B(1 − m))
    (Smith & Le 2018), colour per batch size, with the median over seeds per setting connected
    per batch size: if g is what matters the curves fall onto one. Diverged trials: grey × at
    the bottom. The per-trial markers are rasterized (an image inside an SVG or PDF)."""
    done = trials[trials["status"].isin(["ok", "diverged"])]
    done = done.assign(g=critical.sgd_noise_scale(done["learning_rate"], done["n_train"], done["batch_size"],
                                                  done["momentum"]))
    ok = done[(done["status"] == "ok") & np.isfinite(done["test_accuracy"])]
    palette = bs_palette(trials["batch_size"].unique())
    with plot_style():
        fig = new_figure(9.0, 6.2)
        ax = fig.subplots()
        # A marker per trial: as vector art 100,000 trials made a 15.7 MB SVG, so the per-trial
        # artists are one image each in SVG and PDF (axes, text and the median lines stay vector).
        ax.scatter(ok["g"], ok["test_accuracy"], c=[palette[int(b)] for b in ok["batch_size"]], s=16, alpha=0.45,
                   linewidth=0, zorder=3, label="one ok trial (colour: batch size)", rasterized=True, gid="trials")
        med = ok.groupby(critical.TUNED).agg(g=("g", "median"), acc=("test_accuracy", "median")).reset_index()
        styles = dict(zip(sorted(med["momentum"].unique()), ["-", "--", "-.", ":"] * 4))
        # Past MAX_TRIED_LINES rates a marker per median overprints into a band: the line alone.
        marker = "o" if ok["learning_rate"].nunique() <= MAX_TRIED_LINES else ""
        for (b, m), g in med.sort_values("g").groupby(["batch_size", "momentum"]):
            ax.plot(g["g"], g["acc"], color=palette[int(b)], marker=marker, markersize=4, linestyle=styles[m], zorder=4,
                    label=f"B = {b:g}" + (f", momentum {m:g}" if len(styles) > 1 else ""))
        _edge_markers(ax, done.loc[done["status"] == "diverged", "g"], 0.03, DIVERGED_COLOR, "x", gid="diverged",
                      label="diverged trial (× at the bottom)", rasterized=True)
        if len(done):
            ax.set_xlim(done["g"].min() / 1.5, done["g"].max() * 1.5)
        ax.margins(y=0.1)
        log_axis(ax, "x", base=10)
        ax.set_xlabel("SGD noise scale g = lr·N / (B(1 − m)) (log)")
        ax.set_ylabel("final test accuracy")
        lines = ["g = learning rate × N / (B (1 − momentum)), N = training rows, B = batch size (Smith & Le 2018); "
                 "each point is one ok trial's final test accuracy (accuracy on the test rows after the last "
                 "update); lines: median over seeds per (batch size, learning rate)"
                 + (f", without markers past {MAX_TRIED_LINES} rates" if not marker else "")
                 + "; the seeds of a diverged setting share one ×"]
        _finish(fig, "Final test accuracy vs SGD noise scale: do the batch sizes collapse onto one curve?", note,
                lines, selection, ncols=3)
    return fig
