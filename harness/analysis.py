"""Pure pandas computations behind the report: per-cell summaries with confidence intervals,
the three clocks of learning speed, best learning rates and seed-to-seed stability.

Inputs are the frames ``store.read_trials`` and ``store.read_epochs`` return; nothing here
reads or writes files except ``load_reference`` (package data). A *cell* is one
(batch_size, learning_rate) pair; its seeds are the replicates.

The speed of learning has three clocks, kept apart everywhere: epochs to target (passes over
the data), updates to target (optimizer steps) and seconds to target. All three are read off
the update clock's points (harness.clock) on the selection split (validation when the study has
one, else test), so they are as fine as one clock point; results written before the clock
existed fall back to the per-epoch test accuracy (one epoch). Seconds are updates times the
timing probe's seconds per update (harness.probe); without a probe, an isolated (Keras) trial's
own elapsed time, and nothing for fused trials, whose amortized times never enter a clock.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import SimpleNamespace

import numpy as np
import pandas as pd

from harness import readers
from harness.schema import CONFIG_COLUMNS, FINISHED

CELL = ["batch_size", "learning_rate"]
CONFIG_NAMES = [name for name, _, _ in CONFIG_COLUMNS]
# The axes inside one study's figures. Any other config column that varies (a second grid with
# another problem, a swept momentum) splits the frame into studies that are reported apart.
# The engine is not an axis: trials of two engines are not more seeds of one setting, so each
# engine's trials form a study of their own (statistics pool only trials that differ in the seed).
STUDY_AXES = ("batch_size", "learning_rate", "seed")
CLOCKS = {"epochs": "epochs_to_target", "updates": "updates_to_target", "seconds": "seconds_to_target"}
ISOLATED, AMORTIZED = "isolated", "amortized (fused group)"

# The reference file describes its setting in prose ("Dense(50, relu, he_uniform) -> ..."); this
# is that setting in our column names. A cell is compared with a reference run only when every
# one of its trials has exactly these values (the engine may differ: engines are equivalent).
REFERENCE_CONFIG = {
    "dataset": "blobs", "n_samples": 1000, "centers": 3, "n_features": 2, "cluster_std": 2.0,
    "random_state": 2, "n_train": 500, "standardize": "none", "hidden_units": 50, "activation": "relu",
    "kernel_initializer": "he_uniform", "optimizer": "sgd", "momentum": 0.9, "epochs": 200,
}


@lru_cache(maxsize=256)
def _t_quantile(dof: int, level: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over the finite values; no interval below two."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half = _t_quantile(len(x) - 1, level) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def mean_ci_frame(grouped) -> pd.DataFrame:
    """``mean_ci`` for every group of a grouped Series at once: columns mean, low, high, n."""
    stats = grouped.agg(["mean", "std", "count"])
    quantile = np.array([_t_quantile(int(d), 0.95) for d in (stats["count"] - 1).clip(lower=1)])
    half = quantile * stats["std"].to_numpy() / np.sqrt(stats["count"].to_numpy())
    half = np.where(stats["count"].to_numpy() > 1, half, np.nan)
    return pd.DataFrame({"mean": stats["mean"], "low": stats["mean"] - half, "high": stats["mean"] + half,
                         "n": stats["count"]})


def curve_bands(curve: pd.DataFrame) -> pd.DataFrame:
    """Per (batch_size, learning_rate, split, epoch): mean and 95% interval over the ok seeds of
    the train (running, as Keras reports it) and test accuracy; the learning-curve figure."""
    ok = curve[curve["status"] == "ok"]
    long = pd.concat([ok.assign(split=split, acc=ok[col]) for split, col in (("train", "accuracy"),
                                                                            ("test", "val_accuracy"))])
    return mean_ci_frame(long.groupby([*CELL, "split", "epoch"])["acc"]).reset_index()


def ci_band(values) -> tuple[float, float]:
    """The 95% interval as seaborn's ``errorbar=`` callable wants it; a lone seed gives no band."""
    mean, low, high = mean_ci(values)
    return (mean, mean) if math.isnan(low) else (low, high)


def timing_kind(trials: pd.DataFrame) -> pd.Series:
    """'isolated' for a trial timed alone, 'amortized' when its time is a fused group's share."""
    return pd.Series(np.where(trials["group_size"].fillna(1) > 1, AMORTIZED, ISOLATED), index=trials.index)


def at_peak_rate(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with learning_rate as the rate actually reached: the grid's rate times the
    batch-size scaling (learning_rate_scaling linear or sqrt; harness.schedule.scale), for
    figures whose x axis is a physical quantity of the step size."""
    ratio = trials["batch_size"] / trials["base_batch_size"]
    power = trials["learning_rate_scaling"].map({"none": 0.0, "linear": 1.0, "sqrt": 0.5})
    if (power == 0).all():
        return trials
    return trials.assign(learning_rate=trials["learning_rate"] * ratio ** power)


def study_columns(trials: pd.DataFrame) -> list[str]:
    """Config columns other than the study axes that take more than one value."""
    return [c for c in CONFIG_NAMES if c not in STUDY_AXES and trials[c].nunique(dropna=False) > 1]


def split_studies(trials: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """[(label, trials)] per study; the label is '' when the frame holds one study."""
    columns = study_columns(trials)
    if not columns:
        return [("", trials)]
    out = []
    for key, g in trials.groupby(columns, sort=True):
        first = g.iloc[0]
        # A key the study's optimizer, schedule and scaling do not read sits at its default: not a label
        settings = SimpleNamespace(**{k: first.get(k, v) for k, v in
                                      {"optimizer": "sgd", "schedule": "constant", "learning_rate_scaling": "none"}.items()})
        known = settings.optimizer in readers.OPTIMIZER_KEYS and settings.schedule in readers.SCHEDULE_KEYS
        unread = readers.unread_keys(settings) if known else set()
        out.append((", ".join(f"{c}={v:g}" if isinstance(v, float) else f"{c}={v}"
                              for c, v in zip(columns, key) if c not in unread), g))
    return out


def seconds_per_update(trials: pd.DataFrame, probes: pd.DataFrame | None) -> pd.Series:
    """Per trial (index aligned with ``trials``): the probed seconds per update of its batch size
    (median over the probes of that batch size), NaN without a probe."""
    if probes is None or probes.empty:
        return pd.Series(math.nan, index=trials.index)
    cost = probes.groupby("batch_size")["seconds_per_update"].median()
    return trials["batch_size"].map(cost).astype(float)


def curves(trials: pd.DataFrame, epochs: pd.DataFrame, probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-epoch rows of ``trials`` with the trial's batch size, learning rate, seed and status,
    plus ``seconds``, a clock a user could see: updates times the probed seconds per update
    when there is a probe, else an isolated trial's own elapsed_s, else (a fused trial, whose
    elapsed time is its whole group's) NaN."""
    keep = ["trial_id", "batch_size", "learning_rate", "seed", "status", "group_size"]
    out = epochs.merge(trials[keep], on="trial_id", how="inner").sort_values(["trial_id", "epoch"])
    cost = seconds_per_update(out, probes)
    own = out["elapsed_s"].where(out["group_size"].fillna(1) <= 1)
    return out.assign(seconds=(out["updates"] * cost).fillna(own))


def selection_metric(trials: pd.DataFrame) -> str:
    """The points column settings are chosen on: validation accuracy when every trial has a
    validation split, else test accuracy (and figures then say the test set chose)."""
    has_val = "n_val" in trials and len(trials) and bool((trials["n_val"] > 0).all())
    return "val_accuracy" if has_val else "test_accuracy"


def clock_resolution(trials: pd.DataFrame, points: pd.DataFrame | None) -> str:
    """What one step of the clocks to target is, for figure titles."""
    if points is None or not points["trial_id"].isin(trials["trial_id"]).any():
        return "one epoch"
    per_octave = trials.loc[trials["eval_schedule"] == "geometric", "eval_points_per_octave"]
    if len(per_octave) == len(trials):
        k = int(per_octave.min())
        return f"one update-clock point, {k} per octave (at most {2 ** (1 / k) - 1:.0%} of the updates)"
    return "one update-clock point (epoch ends)"


def to_target(curve: pd.DataFrame, target: float, metric: str = "val_accuracy") -> pd.DataFrame:
    """Per trial: first epoch, update count and seconds at which ``metric`` reaches ``target``;
    inf when it never does. ``curve`` has trial_id, epoch, updates, seconds and ``metric``: the
    per-epoch frame ``curves`` returns (its val_accuracy is the test set's) or ``point_curves``."""
    cols = list(CLOCKS.values())
    curve = curve.sort_values(["trial_id", "updates"])
    first = curve[curve[metric] >= target].drop_duplicates("trial_id")
    first = first[["trial_id", "epoch", "updates", "seconds"]].set_axis(["trial_id", *cols], axis=1)
    out = pd.DataFrame({"trial_id": curve["trial_id"].unique()}).merge(first, on="trial_id", how="left")
    out[cols] = out[cols].astype(float)
    out.loc[~out["trial_id"].isin(first["trial_id"]), cols] = math.inf
    return out


def point_curves(trials: pd.DataFrame, points: pd.DataFrame, probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The update clock's points of ``trials`` with ``epoch`` (fractional: examples_seen / n_train)
    and ``seconds`` as ``curves`` defines them."""
    keep = ["trial_id", "batch_size", "n_train", "group_size"]
    out = points.merge(trials[keep], on="trial_id", how="inner")
    own = out["elapsed_s"].where(out["group_size"].fillna(1) <= 1)
    return out.assign(epoch=out["examples_seen"] / out["n_train"],
                      seconds=(out["updates"] * seconds_per_update(out, probes)).fillna(own))


def curve_noise(curve: pd.DataFrame, tail: float = 0.1) -> pd.Series:
    """Per trial: standard deviation of the test accuracy over its last ``tail`` share of epochs
    (at least two), a measure of how much the curve still jumps once training has settled."""
    curve = curve.sort_values(["trial_id", "epoch"])
    by_trial = curve.groupby("trial_id")
    keep = np.maximum(2, np.ceil(tail * by_trial["epoch"].transform("size")))
    last = curve[by_trial.cumcount(ascending=False) < keep]
    return last.groupby("trial_id")["val_accuracy"].std(ddof=1).rename("curve_noise")


def enrich(trials: pd.DataFrame, epochs: pd.DataFrame, target: float, points: pd.DataFrame | None = None,
           probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Trials plus per-trial derived columns: the three clocks to ``target`` on the selection
    split (inf = never reached), curve noise, seconds per epoch and the timing kind. Trials
    with points are clocked on them; others (results from before the update clock) on the
    per-epoch test accuracy. Failed trials get NaN clocks: they tell nothing about the rate."""
    curve = curves(trials, epochs, probes)
    clocked = points[points["trial_id"].isin(trials["trial_id"])] if points is not None else None
    if clocked is not None and len(clocked):
        by_point = to_target(point_curves(trials, clocked, probes), target, selection_metric(trials))
        legacy = to_target(curve[~curve["trial_id"].isin(clocked["trial_id"])], target)
        reached = pd.concat([by_point, legacy], ignore_index=True)
    else:
        reached = to_target(curve, target)
    out = trials.merge(reached, on="trial_id", how="left")
    out = out.merge(curve_noise(curve[curve["status"] == "ok"]).reset_index(), on="trial_id", how="left")
    # A diverged trial never counts as reaching the target, even if it crossed it before blowing
    # up: it did not end as a trained model, and a rate that blows up is no one's best rate.
    out.loc[out["status"] == "diverged", list(CLOCKS.values())] = math.inf
    out.loc[~out["status"].isin(FINISHED), list(CLOCKS.values())] = math.nan
    return with_derived(out)


def with_derived(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with every derived column present: seconds per epoch and timing kind are
    computed; clocks and curve noise, which need the epochs frame, are NaN if not yet there."""
    out = trials.copy()
    for col in (*CLOCKS.values(), "curve_noise"):
        if col not in out:
            out[col] = math.nan
    out["timing"] = timing_kind(out)
    # A fused group's time is shared equally among its members, so a member that diverged in its
    # first epochs carries a whole share over a few epochs: as seconds per epoch that would read
    # tens of times the group's. Such rows are left out (NaN); a trial timed alone keeps its own.
    per_epoch = out["wall_clock_s"] / out["epochs_run"].where(out["epochs_run"] > 0)
    out["epoch_s"] = per_epoch.where((out["timing"] != AMORTIZED) | (out["status"] == "ok"))
    return out


def _median(values: pd.Series) -> float:
    # A seed that never reaches the target counts as infinitely slow, so the median says
    # "not reached" once half the seeds miss; NaN (failed) seeds are left out.
    v = values.dropna()
    return float(np.median(v)) if len(v) else math.nan


def summarize_cells(trials: pd.DataFrame, reference: list[dict] | None = None) -> pd.DataFrame:
    """One row per (batch_size, learning_rate); accuracies over ok trials only. Pass the frame
    ``enrich`` returns for the clocks and curve noise (plain trials leave those NaN)."""
    enriched = with_derived(trials)
    rows = []
    for (bs, lr), g in enriched.groupby(CELL, sort=True):
        ok = g[g["status"] == "ok"]
        n_div, n_fail = int((g["status"] == "diverged").sum()), int((g["status"] == "failed").sum())
        row = {"batch_size": int(bs), "learning_rate": float(lr), "trials": len(g),
               "seeds": int(g["seed"].nunique()), "ok": len(ok), "diverged": n_div, "failed": n_fail,
               # Of the trials that finished: a failed trial's outcome is unknown, not stable.
               "share_diverged": n_div / (len(ok) + n_div) if len(ok) + n_div else math.nan}
        for split in ("train", "val", "test"):
            # Accuracies live in [0, 1]; a t-interval over two or three seeds does not know that.
            mean, low, high = mean_ci(ok[f"{split}_accuracy"])
            row.update({f"{split}_acc_mean": mean, f"{split}_acc_ci_low": max(low, 0.0) if low == low else low,
                        f"{split}_acc_ci_high": min(high, 1.0) if high == high else high})
        row["test_acc_std"] = float(ok["test_accuracy"].std(ddof=1)) if len(ok) > 1 else math.nan
        row["curve_noise"] = float(ok["curve_noise"].mean()) if len(ok) else math.nan
        row["wall_clock_s_mean"] = float(ok["wall_clock_s"].mean()) if len(ok) else math.nan
        row["epoch_s_mean"] = float(g["epoch_s"].mean())
        kinds = sorted(g["timing"].unique())
        row["timing"] = kinds[0] if len(kinds) == 1 else "mixed"
        row["updates_mean"] = float(g.loc[g["status"].isin(FINISHED), "updates"].mean())
        for col in CLOCKS.values():
            row[col] = _median(g[col])
        row["reached"] = int(np.isfinite(g["updates_to_target"]).sum())
        row["ref_train_accuracy"], row["ref_test_accuracy"] = _reference_for(g, bs, lr, reference or [])
        rows.append(row)
    return pd.DataFrame(rows)


def best_lr_by_accuracy(cells: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per batch size, the learning rate with the highest mean final accuracy on ``split``
    ('val' or 'test') among those where no seed diverged (a rate that sometimes blows up is not
    'best'); ties go to the smaller rate. Its test accuracy is what to report. NaN where every
    rate had a diverged seed."""
    rows = []
    chosen = f"{split}_acc_mean"
    for bs, g in cells.groupby("batch_size", sort=True):
        eligible = g[(g["diverged"] == 0) & g[chosen].notna()]
        if eligible.empty:
            rows.append({"batch_size": bs, "learning_rate": math.nan, "test_acc_mean": math.nan})
            continue
        best = eligible.sort_values([chosen, "learning_rate"], ascending=[False, True]).iloc[0]
        rows.append({"batch_size": bs, "learning_rate": best["learning_rate"], "test_acc_mean": best["test_acc_mean"]})
    return pd.DataFrame(rows, columns=["batch_size", "learning_rate", "test_acc_mean"])


def at_edge(best: pd.DataFrame, rates) -> pd.DataFrame:
    """The rows of ``best`` whose rate is the smallest or largest tried: the optimum may lie
    outside the grid, which should then be widened."""
    rates = sorted(set(rates))
    if len(rates) < 2:
        return best.iloc[:0]
    return best[best["learning_rate"].isin([rates[0], rates[-1]])]


def best_lr_by_clock(cells: pd.DataFrame, clock: str = "updates") -> pd.DataFrame:
    """Per batch size, the learning rate with the smallest median ``clock`` to target (ties to
    the smaller rate); learning_rate is NaN and the value inf when no rate reaches the target."""
    col = CLOCKS[clock]
    rows = []
    for bs, g in cells.groupby("batch_size", sort=True):
        reached = g[np.isfinite(g[col])]
        if reached.empty:
            rows.append({"batch_size": bs, "learning_rate": math.nan, col: math.inf})
            continue
        best = reached.sort_values([col, "learning_rate"]).iloc[0]
        rows.append({"batch_size": bs, "learning_rate": best["learning_rate"], col: best[col]})
    return pd.DataFrame(rows, columns=["batch_size", "learning_rate", col])


def best_lr_for_time(cells: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, the rate with the fewest median seconds to target; where no rate reaches
    it, the best by final accuracy (the time-to-accuracy curves show one rate per batch size)."""
    by_time = best_lr_by_clock(cells, "seconds").set_index("batch_size")["learning_rate"]
    by_acc = best_lr_by_accuracy(cells).set_index("batch_size")["learning_rate"]
    return by_time.fillna(by_acc).dropna().reset_index()


def perfect_scaling(best: pd.DataFrame) -> pd.DataFrame:
    """The perfect-scaling reference for updates to target: anchored at the smallest batch size
    that reaches the target, doubling the batch halves the updates. Empty when none reaches."""
    reached = best[np.isfinite(best["updates_to_target"])]
    if reached.empty:
        return pd.DataFrame(columns=["batch_size", "updates_to_target"])
    b0, u0 = reached.iloc[0]["batch_size"], reached.iloc[0]["updates_to_target"]
    sizes = best["batch_size"][best["batch_size"] >= b0]
    return pd.DataFrame({"batch_size": sizes.to_numpy(), "updates_to_target": (u0 * b0 / sizes).to_numpy()})


def load_reference() -> list[dict]:
    """The four reference runs shipped as package data (harness/data/reference.json)."""
    text = resources.files("harness").joinpath("data/reference.json").read_text()
    return json.loads(text)["runs"]


def _reference_for(cell: pd.DataFrame, bs: float, lr: float, reference: list[dict]) -> tuple[float, float]:
    for name, value in REFERENCE_CONFIG.items():
        if name not in cell or not (cell[name] == value).all():
            return math.nan, math.nan
    for run in reference:
        if run["batch_size"] == bs and math.isclose(run["learning_rate"], lr):
            return float(run["train_accuracy"]), float(run["test_accuracy"])
    return math.nan, math.nan


@dataclass(frozen=True)
class Completeness:
    """How much of the planned work is on disk. ``expected`` maps each cell to the trials it
    should have; ``planned`` is None when the plan is unknown (then it is inferred)."""

    done: int
    planned: int | None
    expected: dict[tuple[int, float], int]
    note: str  # one line for figure titles; '' when nothing is missing

    def missing_in(self, cells: pd.DataFrame) -> dict[tuple[int, float], tuple[int, int]]:
        """cell -> (trials on disk, trials expected) for cells short of their plan."""
        have = {(int(r.batch_size), float(r.learning_rate)): int(r.trials) for r in cells.itertuples()}
        return {c: (have.get(c, 0), want) for c, want in self.expected.items() if have.get(c, 0) < want}


def completeness(trials: pd.DataFrame, planned: pd.DataFrame | None = None) -> Completeness:
    """Compare ``trials`` with the planned trials (config columns, one row per trial), or, with no
    plan, with the busiest cell: a cell with fewer trials than that is reported short. Trials are
    matched on their config without the engine, since a run may override the grid's engine."""
    have = trials.groupby(CELL).size()
    if planned is not None and len(planned):
        key = [c for c in CONFIG_NAMES if c != "engine" and c in planned and c in trials]
        on_disk = planned[key].merge(trials[key].drop_duplicates(), on=key, how="left", indicator=True)
        done = int((on_disk["_merge"] == "both").sum())
        expected = {(int(b), float(lr)): int(n) for (b, lr), n in planned.groupby(CELL).size().items()}
        missing = len(planned) - done
        note = f"partial: {done} of {len(planned)} planned trials on disk, {missing} missing" if missing else ""
        return Completeness(done, len(planned), expected, note)
    most = int(have.max()) if len(have) else 0
    expected = {(int(b), float(lr)): most for (b, lr) in have.index}
    short = sum(1 for n in have if n < most)
    note = f"partial: {short} of {len(have)} cells have fewer trials than the others ({most})" if short else ""
    return Completeness(len(trials), None, expected, note)
