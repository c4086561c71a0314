"""One study's batch-size scaling on the update clock: steps to several targets at the best
settings per batch size, the fitted critical batch size for each target (harness.critical), the
gradient noise scale B_simple at the same targets, and the learning rates that win.

Settings are chosen on the validation split when the study has one (``n_val`` > 0) and on the
test set otherwise; ``Selection`` says which, and every figure that selects prints it.
Pure pandas: frames in (trials, points), dataclasses and frames out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness import analysis, critical


@dataclass(frozen=True)
class Selection:
    """Which split picks the best settings, and how figures say it."""

    metric: str  # 'val_accuracy' or 'test_accuracy'
    split: str  # 'validation' or 'test'

    @property
    def caption(self) -> str:
        if self.split == "validation":
            return "settings chosen on the validation split, reported on the test set"
        return "settings chosen on the test set (no validation split: n_val = 0), so the reported best is optimistic"


@dataclass(frozen=True)
class TargetFit:
    """Steps to one target at each batch size's best setting, and the frontier fitted to them."""

    metric: str  # points column the target is on: 'val_accuracy', 'test_accuracy' or 'train_loss'
    target: float
    higher_is_better: bool
    best: pd.DataFrame  # critical.best_steps + 'examples' (= steps x batch_size) + 'b_simple' (median at target)
    interval: critical.FrontierInterval | None  # None when no frontier could be fitted
    reason: str  # why there is no fit; '' when there is

    @property
    def label(self) -> str:
        relation = ">=" if self.higher_is_better else "<="
        return f"{self.metric.replace('_', ' ')} {relation} {self.target:g}"


def selection(trials: pd.DataFrame) -> Selection:
    """Validation when every trial of the study has a validation split, else the test set."""
    metric = analysis.selection_metric(trials)
    return Selection(metric, "validation" if metric == "val_accuracy" else "test")


def _b_simple_at(points: pd.DataFrame, trial_ids, metric: str, target: float, higher: bool) -> float:
    """Median B_simple over ``trial_ids`` where each first reaches ``target``: at the last point
    at or before it that measured the noise scale (clock.noise_points skips epoch ends)."""
    steps = critical.steps_to_target(points, metric, target, higher, trial_ids)
    hit = steps[np.isfinite(steps["steps"])].rename(columns={"steps": "updates"}).astype({"updates": "int64"})
    measured = points.loc[np.isfinite(points["b_simple"]), ["trial_id", "updates", "b_simple"]]
    if hit.empty or measured.empty:
        return math.nan
    at = pd.merge_asof(hit.sort_values("updates"), measured.sort_values("updates"), on="updates", by="trial_id",
                       direction="backward")["b_simple"].dropna()
    return float(at.median()) if len(at) else math.nan


def target_fits(trials: pd.DataFrame, points: pd.DataFrame, chosen: Selection, n_boot: int = 1000,
                count: int = 3) -> list[TargetFit]:
    """A fit per default target (critical.default_targets: ones every batch size reaches), for the
    selection split's accuracy and for the training loss."""
    fits = []
    for metric, higher in ((chosen.metric, True), ("train_loss", False)):
        for target in critical.default_targets(trials, points, metric, higher, count):
            cells = critical.cell_steps(trials, points, metric, target, higher)
            best = critical.best_steps(cells)
            members = cells.merge(best[critical.TUNED], on=critical.TUNED)
            b_simple = {bs: _b_simple_at(points, g["trial_id"], metric, target, higher)
                        for bs, g in members.groupby("batch_size")}
            best = best.assign(examples=best["steps"] * best["batch_size"], b_simple=best["batch_size"].map(b_simple))
            try:
                interval, reason = critical.bootstrap_frontier(cells, n_boot), ""
            except ValueError as exc:
                interval, reason = None, str(exc)
            fits.append(TargetFit(metric, target, higher, best, interval, reason))
    return fits


def best_settings(trials: pd.DataFrame, chosen: Selection) -> pd.DataFrame:
    """Per batch size, the (learning_rate, momentum) with the highest mean final accuracy on the
    selection split among those where no seed diverged (ties to the smaller rate), with the mean
    final test accuracy it reaches: the number to report. NaN where every setting diverged."""
    done = trials[trials["status"].isin(["ok", "diverged"])]
    per = done.groupby(critical.TUNED, dropna=False).agg(
        chosen_on=(chosen.metric, "mean"), test_accuracy=("test_accuracy", "mean"),
        diverged=("status", lambda s: int((s == "diverged").sum()))).reset_index()
    eligible = per[(per["diverged"] == 0) & per["chosen_on"].notna()]
    best = eligible.sort_values(["batch_size", "chosen_on", "learning_rate"], ascending=[True, False, True])
    best = best.drop_duplicates("batch_size")
    sizes = pd.DataFrame({"batch_size": sorted(trials["batch_size"].unique())})
    return sizes.merge(best.drop(columns="diverged"), on="batch_size", how="left")


def b_simple_curve(trials: pd.DataFrame, points: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """B_simple along training for each batch size's best setting: per (batch_size, updates) the
    median and 25/75 % over its ok seeds, with their median training loss."""
    ok = trials[trials["status"] == "ok"].merge(best[critical.TUNED].dropna(), on=critical.TUNED)
    pts = points.merge(ok[["trial_id", "batch_size"]], on="trial_id")
    pts = pts[np.isfinite(pts["b_simple"])]
    grouped = pts.groupby(["batch_size", "updates"])
    return pd.DataFrame({
        "train_loss": grouped["train_loss"].median(), "b_simple_median": grouped["b_simple"].median(),
        "b_simple_low": grouped["b_simple"].quantile(0.25), "b_simple_high": grouped["b_simple"].quantile(0.75),
    }).reset_index()


def plateau_b_simple(curve: pd.DataFrame, tail: float = 0.1) -> float:
    """Median B_simple over the last ``tail`` of each batch size's update clock (where the loss
    has levelled off), then the median over batch sizes."""
    per_bs = []
    for _, g in curve.groupby("batch_size"):
        last = g[g["updates"] >= (1 - tail) * g["updates"].max()]
        per_bs.append(last["b_simple_median"].median())
    return float(np.median(per_bs)) if per_bs else math.nan


def _ci(pair: tuple[float, float]) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]" if all(map(math.isfinite, pair)) else "[no interval]"


def summary_lines(fits: list[TargetFit], plateau: float) -> list[str]:
    """Per fitted target one line: B_crit (CI), B_simple at the same target, their ratio, and
    the regions of steps vs batch size the data covers; then B_simple at the plateau."""
    lines = []
    for fit in fits:
        if fit.interval is None:
            lines.append(f"{fit.label}: no critical batch size ({fit.reason})")
            continue
        frontier = fit.interval.frontier
        b_simple = float(fit.best["b_simple"].median())
        covered = critical.regions_covered(critical.regions(fit.best, frontier))
        absent = [r for r in critical.REGIONS if r not in covered]
        where = " (extrapolated beyond the batch sizes tried)" if frontier.extrapolated else ""
        ratio = f"{b_simple / frontier.b_crit:.2g}" if math.isfinite(b_simple) else "n/a"
        lines.append(f"{fit.label}: B_crit = {frontier.b_crit:.3g} {_ci(fit.interval.b_crit)}{where}, "
                     f"S_min = {frontier.s_min:.3g} updates, E_min = {frontier.e_min:.3g} examples; "
                     f"B_simple there = {b_simple:.3g} (ratio B_simple/B_crit = {ratio}); regions covered: "
                     f"{', '.join(covered) or 'none'}" + (f"; absent: {', '.join(absent)}" if absent else ""))
    lines.append(f"B_simple at the plateau (last 10% of each batch size's clock, best settings): {plateau:.3g}")
    return lines
