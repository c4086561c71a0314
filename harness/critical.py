"""Steps to a target on the update clock, and the critical batch size.

McCandlish et al. (2018): the optimizer steps S and training examples E = S·B needed to reach a
target obey (S/S_min − 1)(E/E_min − 1) = 1, i.e. S = S_min(1 + B_crit/B) and
E = E_min(1 + B/B_crit) with B_crit = E_min/S_min. Following Shallue et al. (2018), a batch
size's steps are those of its best learning rate (re-tuned per batch size), and a diverged trial
never reaches the target.

Inputs are the long ``points`` frame (one row per trial and evaluation point; ``updates`` is the
optimizer-step count, 0 for the untrained model) and the ``trials`` frame. Units: steps are
optimizer updates, batch sizes and B_crit are examples per update, E_min is examples. Pure
pandas/numpy/scipy: nothing here reads files or plots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.special import expit

from harness.schema import FINISHED

# Every axis but the seed is tuned: the seeds of one setting are its replicates.
TUNED = ["batch_size", "learning_rate", "momentum"]
PERFECT, DIMINISHING, PLATEAU = "perfect scaling", "diminishing returns", "plateau"
REGIONS = (PERFECT, DIMINISHING, PLATEAU)
# A region boundary sits where the fitted curve is within 4/3 of an asymptote: at B = B_crit/3
# the steps are 4/3 of perfect scaling's S_min·B_crit/B, at B = 3·B_crit 4/3 of the plateau S_min.
REGION_RATIO = 3.0
# The seed bootstrap holds this many resampled values at a time: each costs an int64 index, its
# float64 value and median's working copy, about 50 MB a chunk. All at once, 1,000 replicates of a
# 100,000-trial grid took 2.4 GB.
CHUNK_VALUES = 2_000_000


@dataclass(frozen=True)
class Frontier:
    """S = s_min·(1 + b_crit/B), fitted in log S over ``n_points`` batch sizes in [b_min, b_max].

    s_min: updates at an infinite batch; e_min: examples at a vanishing batch (= s_min·b_crit);
    b_crit: examples per update; residual_rms: RMS of the natural-log residuals of S."""

    s_min: float
    e_min: float
    b_crit: float
    n_points: int
    residual_rms: float
    b_min: float
    b_max: float

    @property
    def extrapolated(self) -> bool:
        """True when b_crit lies outside the batch sizes tried (the figure says so)."""
        return not self.b_min <= self.b_crit <= self.b_max

    def steps(self, batch_size):
        """Fitted updates to target at ``batch_size``."""
        return self.s_min * (1 + self.b_crit / np.asarray(batch_size, dtype=float))

    def examples(self, batch_size):
        """Fitted examples to target at ``batch_size`` (steps × batch size)."""
        return self.e_min * (1 + np.asarray(batch_size, dtype=float) / self.b_crit)


@dataclass(frozen=True)
class FrontierInterval:
    """The fit on the data plus percentile intervals (at ``level``) from resampling seeds;
    ``n_failed`` of the ``n_boot`` replicates could not be fitted and are left out."""

    frontier: Frontier
    b_crit: tuple[float, float]
    s_min: tuple[float, float]
    e_min: tuple[float, float]
    level: float
    n_boot: int
    n_failed: int


def steps_to_target(points: pd.DataFrame, metric: str, target: float, higher_is_better: bool,
                    trial_ids=None) -> pd.DataFrame:
    """Per trial: ``steps``, the ``updates`` of the first point whose ``metric`` reaches ``target``
    (>= when ``higher_is_better``, else <=), inf when none does. Exact to one schedule point: the
    true crossing lies between that point and the one before. ``trial_ids`` lists the trials to
    report (default: those in ``points``); one without points, or only NaN values, gets inf."""
    values = points[metric]
    hit = points[(values >= target) if higher_is_better else (values <= target)]
    first = hit.groupby("trial_id")["updates"].min().astype(float)
    ids = points["trial_id"].unique() if trial_ids is None else pd.unique(pd.Series(trial_ids))
    steps = pd.Series(ids).map(first).fillna(math.inf).to_numpy(dtype=float)
    return pd.DataFrame({"trial_id": ids, "steps": steps})


def cell_steps(trials: pd.DataFrame, points: pd.DataFrame, metric: str, target: float,
               higher_is_better: bool) -> pd.DataFrame:
    """Per finished trial: trial_id, batch_size, learning_rate, seed, momentum, status and steps
    (updates to target). Failed trials are dropped (their outcome is unknown); a diverged trial
    counts as never reaching, even if it crossed the target before blowing up."""
    done = trials.loc[trials["status"].isin(FINISHED),
                      ["trial_id", "batch_size", "learning_rate", "seed", "momentum", "status"]]
    out = done.merge(steps_to_target(points, metric, target, higher_is_better, done["trial_id"]),
                     on="trial_id", how="left")
    out.loc[out["status"] == "diverged", "steps"] = math.inf
    return out.reset_index(drop=True)


def best_steps(cells: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, the (learning_rate, momentum) with the fewest median updates over seeds;
    a seed that never reaches counts as inf, so the median is inf once half the seeds miss.
    Ties (including all-inf) go to the smaller learning rate, then the smaller momentum.
    Columns: batch_size, learning_rate, momentum, steps (median), seeds, reached."""
    cells = cells.dropna(subset=["steps"]).assign(reached=lambda f: np.isfinite(f["steps"]))
    grouped = cells.groupby(TUNED, sort=True, dropna=False)
    per = grouped.agg(steps=("steps", "median"), seeds=("steps", "size"), reached=("reached", "sum"))
    per = per.reset_index().sort_values(["batch_size", "steps", "learning_rate", "momentum"])
    per = per.drop_duplicates("batch_size").sort_values("batch_size").reset_index(drop=True)
    return per.astype({"seeds": int, "reached": int, "steps": float})


def _start(batch: np.ndarray, steps: np.ndarray) -> np.ndarray:
    # A linear fit S = a + b/B gives S_min = a and B_crit = b/a. When it says a <= 0 (steps still
    # falling as 1/B: B_crit beyond the grid) or b <= 0 (no gain from larger batches), start at
    # that edge of the grid and let the log-space fit move from there.
    a, b = np.linalg.lstsq(np.column_stack([np.ones_like(batch), 1 / batch]), steps, rcond=None)[0]
    if a > 0 and b > 0:
        return np.log([a, b / a])
    if a <= 0:
        return np.log([steps.min() / 2, batch.max()])
    return np.log([steps.min(), batch.min() / 2])


def _fit(batch: np.ndarray, steps: np.ndarray) -> Frontier:
    keep = np.isfinite(steps) & (steps > 0)
    batch, steps = np.asarray(batch, dtype=float)[keep], steps[keep]
    if len(np.unique(batch)) < 3:
        raise ValueError(f"the S = S_min(1 + B_crit/B) fit needs finite, positive steps at >= 3 "
                         f"batch sizes; got {len(np.unique(batch))}")
    log_b, log_s = np.log(batch), np.log(steps)

    def residual(theta):
        return theta[0] + np.logaddexp(0, theta[1] - log_b) - log_s

    def jacobian(theta):
        # d/dθ1 log(1 + e^θ1/B) is the logistic of θ1 − log B (scipy's expit: no overflow when
        # a bootstrap replicate sends B_crit towards 0).
        return np.column_stack([np.ones_like(log_b), expit(theta[1] - log_b)])

    fit = least_squares(residual, _start(batch, steps), jac=jacobian, method="lm",
                        xtol=1e-12, ftol=1e-12, gtol=1e-12)
    s_min, b_crit = np.exp(fit.x)
    if not (np.isfinite(s_min) and np.isfinite(b_crit)):
        raise ValueError("the S = S_min(1 + B_crit/B) fit did not converge")
    return Frontier(s_min=float(s_min), e_min=float(s_min * b_crit), b_crit=float(b_crit),
                    n_points=len(batch), residual_rms=float(np.sqrt(np.mean(fit.fun ** 2))),
                    b_min=float(batch.min()), b_max=float(batch.max()))


def fit_frontier(batch_sizes, steps) -> Frontier:
    """Fit S = S_min(1 + B_crit/B) by least squares in log S (scipy ``least_squares`` on
    log S_min, log B_crit, started from a linear fit of S against 1/B). Only finite, positive
    steps count; fewer than 3 such batch sizes raise ValueError. B_crit may land outside the
    batch sizes tried: it is reported as fitted and ``Frontier.extrapolated`` says so. When the
    steps still fall as 1/B across the grid only E_min is pinned down (B_crit runs off to huge
    values, S_min to tiny ones); when they do not fall at all only S_min is (B_crit -> 0)."""
    batch, steps = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    if batch.shape != steps.shape:
        raise ValueError(f"batch_sizes and steps differ in length ({batch.size} vs {steps.size})")
    return _fit(batch, steps)


def _replicate_chunks(n_boot: int, values_per_replicate: int, max_values: int = CHUNK_VALUES) -> list[slice]:
    """Consecutive slices of the ``n_boot`` replicates, each holding at most ``max_values``
    resampled values (but always at least one replicate)."""
    step = max(1, max_values // max(1, values_per_replicate))
    return [slice(start, min(start + step, n_boot)) for start in range(0, n_boot, step)]


def _resampled_best(cells: pd.DataFrame, n_boot: int, rng,
                    max_values: int = CHUNK_VALUES) -> tuple[np.ndarray, np.ndarray]:
    """(batch sizes, best steps per replicate and batch size): seeds are resampled with
    replacement within each tuned cell, the median taken with numpy, then the min over a batch
    size's cells (the best setting's steps; which setting it is does not matter to the fit).
    Replicates are drawn ``max_values`` resampled values at a time, so memory follows the chunk,
    not replicates × trials; the result does not depend on ``max_values``."""
    groups = [(key[0], g.to_numpy(dtype=float)) for key, g in
              cells.dropna(subset=["steps"]).groupby(TUNED, sort=True, dropna=False)["steps"]]
    batch = np.array([b for b, _ in groups], dtype=float)
    sizes = np.array([len(v) for _, v in groups])
    medians = np.empty((n_boot, len(groups)))
    for n in np.unique(sizes):  # cells with equal seed counts are resampled as one array
        which = np.flatnonzero(sizes == n)
        values = np.stack([groups[i][1] for i in which])
        rows = np.arange(len(which))[None, :, None]
        for part in _replicate_chunks(n_boot, len(which) * n, max_values):
            # Successive draws continue one random stream, so chunk after chunk gives exactly the
            # numbers one (n_boot, cells, n) draw would (a test pins this).
            pick = rng.integers(0, n, size=(part.stop - part.start, len(which), n))
            medians[part, which] = np.median(values[rows, pick], axis=2)
    unique, first = np.unique(batch, return_index=True)  # groupby sorted: each B is one run
    return unique, np.minimum.reduceat(medians, first, axis=1)


def bootstrap_frontier(cells: pd.DataFrame, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> FrontierInterval:
    """The frontier fitted to ``best_steps(cells)`` (``cells`` as ``cell_steps`` returns), with
    percentile intervals over ``n_boot`` replicates that resample seeds with replacement within
    each (batch_size, learning_rate, momentum) cell and re-tune the best setting. Replicates
    whose fit fails (fewer than 3 batch sizes reach in the median) are skipped and counted."""
    best = best_steps(cells)
    frontier = fit_frontier(best["batch_size"], best["steps"])
    batch, replicates = _resampled_best(cells, n_boot, np.random.default_rng(seed))
    fits = []
    for steps in replicates:
        try:
            fits.append(_fit(batch, steps))
        except ValueError:
            pass
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(name: str) -> tuple[float, float]:
        if not fits:
            return math.nan, math.nan
        low, high = np.percentile([getattr(f, name) for f in fits], tails)
        return float(low), float(high)

    return FrontierInterval(frontier=frontier, b_crit=interval("b_crit"), s_min=interval("s_min"),
                            e_min=interval("e_min"), level=level, n_boot=n_boot,
                            n_failed=n_boot - len(fits))


def _median_reached(values: np.ndarray) -> float:
    # The hardest level whose median steps over these seeds is finite: steps' median is finite
    # once floor(n/2) + 1 seeds reach (with an even count both middle seeds must), so it is the
    # (floor(n/2) + 1)-th best value, not the plain median.
    return float(np.sort(values)[::-1][len(values) // 2])


def default_targets(trials: pd.DataFrame, points: pd.DataFrame, metric: str, higher_is_better: bool,
                    count: int = 4) -> list[float]:
    """Up to ``count`` targets that every batch size reaches at its best setting, in the median
    over seeds. Rule: the easy end is the median ``metric`` of the finished trials at updates 0
    (the untrained model, chance-ish). Per trial take its best value ever (a diverged trial
    counts as reaching nothing); per setting, the best value that the median over seeds reaches;
    per batch size, its best setting; the hard end is the worst of those over batch sizes, times
    0.98 for a metric where higher is better (accuracies) or 1.02 for one where lower is better
    (losses), rounded to 3 decimals toward the easy side. Targets are spaced evenly (accuracies)
    or geometrically (losses) from the easy end, which is excluded, to the hard end, which is
    included; each is rounded to 3 decimals toward the easy side, and duplicates dropped.
    Returns [] when the hard end is no harder than the easy end, or the metric is missing."""
    done = trials[trials["status"].isin(FINISHED)]
    pts = points[points["trial_id"].isin(done["trial_id"])]
    start = float(pts.loc[pts["updates"] == 0, metric].median())
    sign = 1.0 if higher_is_better else -1.0  # work in "higher is better" from here on
    best = (sign * pts[metric]).groupby(pts["trial_id"]).max()
    reach = done["trial_id"].map(best).fillna(-math.inf).where(done["status"] == "ok", -math.inf)
    per_cell = done.assign(reach=reach).groupby(TUNED, dropna=False)["reach"].agg(
        lambda v: _median_reached(v.to_numpy(dtype=float)))
    level = sign * float(per_cell.groupby(level="batch_size").max().min()) if len(per_cell) else math.nan
    if count < 1 or not (math.isfinite(start) and math.isfinite(level)):
        return []

    def easy(x: float) -> float:  # round to 3 decimals toward the easy side (1e-9: float fuzz)
        return math.floor(x * 1000 + 1e-9) / 1000 if higher_is_better else math.ceil(x * 1000 - 1e-9) / 1000

    hard = easy(level * (0.98 if higher_is_better else 1.02))
    if sign * hard <= sign * start or hard <= 0:
        return []
    spaced = np.linspace(start, hard, count + 1) if higher_is_better else np.geomspace(start, hard, count + 1)
    targets = [easy(float(t)) for t in spaced[1:]]
    return list(dict.fromkeys(t for t in targets if sign * t > sign * start))


def sgd_noise_scale(learning_rate, n_train, batch_size, momentum):
    """SGD noise scale g = lr·N / (B(1 − m)) (Smith & Le 2018), elementwise; N training examples,
    B examples per update, m the momentum in [0, 1). An array, or a float for scalar inputs."""
    lr, n, b, m = (np.asarray(x, dtype=float) for x in (learning_rate, n_train, batch_size, momentum))
    out = lr * n / (b * (1 - m))
    return float(out) if out.ndim == 0 else out


def largest_stable_lr(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (batch_size, momentum): largest_stable_lr, the largest learning rate at which no seed
    diverged and at least one finished ok (NaN if none), and largest_lr_tried among finished
    trials; when the two are equal the grid never found the stability limit. Failed trials are
    ignored: their outcome is unknown."""
    done = trials[trials["status"].isin(FINISHED)]
    stable = done.groupby([*TUNED], dropna=False)["status"].agg(lambda s: bool((s == "ok").all()))
    stable = stable.reset_index(name="stable")
    keys = ["batch_size", "momentum"]
    out = trials[keys].drop_duplicates().sort_values(keys).reset_index(drop=True)
    largest = stable[stable["stable"]].groupby(keys, dropna=False)["learning_rate"].max()
    tried = stable.groupby(keys, dropna=False)["learning_rate"].max()
    out = out.merge(largest.rename("largest_stable_lr").reset_index(), on=keys, how="left")
    return out.merge(tried.rename("largest_lr_tried").reset_index(), on=keys, how="left")


def regions(best: pd.DataFrame, frontier: Frontier) -> pd.DataFrame:
    """Label each batch size by where it sits on the fitted curve: "perfect scaling" when
    B_crit/B >= 3 (steps within 4/3 of S_min·B_crit/B), "plateau" when B/B_crit >= 3 (within 4/3
    of S_min), "diminishing returns" between. Columns: batch_size, steps, fitted_steps,
    b_over_b_crit, region, measured (steps finite: the data, not only the fit, covers it)."""
    batch = best["batch_size"].to_numpy(dtype=float)
    region = np.select([frontier.b_crit / batch >= REGION_RATIO, batch / frontier.b_crit >= REGION_RATIO],
                       [PERFECT, PLATEAU], DIMINISHING)
    steps = best["steps"].to_numpy(dtype=float)
    return pd.DataFrame({"batch_size": best["batch_size"].to_numpy(), "steps": steps,
                         "fitted_steps": frontier.steps(batch), "b_over_b_crit": batch / frontier.b_crit,
                         "region": region, "measured": np.isfinite(steps)})


def regions_covered(labelled: pd.DataFrame) -> list[str]:
    """The regions (in REGIONS order) holding at least one measured batch size of ``regions``."""
    present = set(labelled.loc[labelled["measured"], "region"])
    return [r for r in REGIONS if r in present]
