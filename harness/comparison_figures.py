"""Studies side by side: when a results folder holds several studies (grids/optimizers.yaml's
SGD, Adam and RMSprop; grids/scaling_rule.yaml's scaled and fixed rates), the question is how
they compare over batch size, which each study's own figures cannot show. Pure: frames in,
Figure out.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from harness import analysis, critical, scaling
from harness.figures import add_caption, add_title, bs_axis, new_figure, plot_style


def best_per_study(studies: Sequence[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Per study and batch size: the setting chosen on the selection split (scaling.best_settings)
    and the mean final test accuracy of its seeds with a 95 % interval. Columns: study,
    batch_size, learning_rate, edge (the rate is the study's smallest or largest), seeds,
    test_mean, test_low, test_high."""
    rows = []
    for label, trials in studies:
        best = scaling.best_settings(trials, scaling.selection(trials)).dropna(subset=["learning_rate"])
        chosen = trials.merge(best[critical.TUNED], on=critical.TUNED)
        rates = sorted(trials["learning_rate"].unique())
        edges = {rates[0], rates[-1]} if len(rates) > 1 else set()
        for size, cell in chosen.groupby("batch_size"):
            mean, low, high = analysis.mean_ci(cell["test_accuracy"])
            rate = cell["learning_rate"].iloc[0]
            rows.append(dict(study=label, batch_size=size, learning_rate=rate, edge=rate in edges,
                             seeds=int(cell["test_accuracy"].notna().sum()), test_mean=mean, test_low=low,
                             test_high=high))
    return pd.DataFrame(rows, columns=["study", "batch_size", "learning_rate", "edge", "seeds", "test_mean",
                                       "test_low", "test_high"])


def plot_study_comparison(studies: Sequence[tuple[str, pd.DataFrame]], note: str = "") -> Figure:
    """Left: final test accuracy at each batch size's best setting, a line per study, with its
    95 % interval over seeds. Right: the learning rate that won (the grid's learning_rate, before
    any batch-size scaling or schedule)."""
    table = best_per_study(studies)
    splits = {scaling.selection(trials).split for _, trials in studies}
    with plot_style():
        fig = new_figure(11, 4.6)
        acc_ax, lr_ax = fig.subplots(1, 2)
        for k, (label, group) in enumerate(table.groupby("study", sort=False)):
            color = f"C{k}"
            low = (group["test_mean"] - group["test_low"]).fillna(0.0)
            high = (group["test_high"] - group["test_mean"]).fillna(0.0)
            acc_ax.errorbar(group["batch_size"], group["test_mean"], yerr=[low, high], color=color, marker="o",
                            capsize=3, label=label)
            lr_ax.plot(group["batch_size"], group["learning_rate"], color=color, marker="o", label=label)
            edge = group[group["edge"]]
            lr_ax.scatter(edge["batch_size"], edge["learning_rate"], s=90, facecolors="white", edgecolors=color,
                          linewidths=1.5, zorder=3)
        for ax in (acc_ax, lr_ax):
            bs_axis(ax, table["batch_size"])
        acc_ax.set_ylabel("final test accuracy at the best setting\n(mean over seeds, 95 % CI)")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("best learning rate (log; as the grid gives it)")
        acc_ax.legend(fontsize="small")
        add_title(fig, "Studies compared over batch size", note)
        chosen_on = ("the validation split" if splits == {"validation"} else
                     "the test set (no validation split), so the accuracies are optimistic" if splits == {"test"}
                     else "the validation split where a study has one, else the test set")
        low, high = (int(table["seeds"].min()), int(table["seeds"].max())) if len(table) else (0, 0)
        differ = ", ".join(analysis.study_columns(pd.concat([t for _, t in studies])))
        add_caption(fig, f"One line per study (studies differ in {differ}). At each batch size the learning rate "
                         f"(and momentum) with the best mean final accuracy on {chosen_on} among settings where no "
                         f"seed diverged; {low if low == high else f'{low}-{high}'} seeds a point; final accuracy "
                         f"after each trial's last epoch. Open circle: the best rate is the study's smallest or "
                         f"largest, so the optimum may lie outside the grid.")
    return fig


def has_comparison(studies: Sequence[tuple[str, pd.DataFrame]]) -> bool:
    """A comparison needs two studies with a finished trial at two batch sizes or more."""
    usable = [t for _, t in studies if (t["status"] == "ok").any() and t["batch_size"].nunique() > 1]
    return len(usable) > 1
