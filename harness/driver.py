"""A run from grid to Parquet: plan what is left, hand it to a backend, write each result as it lands."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from harness import initial, probe, store
from harness.compaction import compact
from harness.engines import kernel_choice
from harness.config import GridConfig
from harness.grid import TrialSpec
from harness.plan import Plan, plan_run
from harness.scheduler import Backend
from harness.schema import new_run_id, run_metadata, utc_now
from harness.work import modelled_wall_s, plan_tasks


@dataclass
class RunSummary:
    run_id: str
    results_dir: Path
    total: int
    skipped: int
    statuses: Counter = field(default_factory=Counter)  # statuses of the trials this run trained
    grid_failed: int = 0        # failed trials of the whole grid, on disk after the run
    elapsed_s: float = 0.0
    interrupted: bool = False
    set_aside: list[str] = field(default_factory=list)  # what was moved to set-aside/, and why

    @property
    def ran(self) -> int:
        return sum(self.statuses.values())

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.grid_failed else 0

    def describe(self) -> str:
        counts = ", ".join(f"{self.statuses.get(s, 0)} {s}" for s in ("ok", "diverged", "failed"))
        head = "interrupted" if self.interrupted else "done"
        line = (f"{head}: {self.ran} trials run ({counts}), {self.skipped} already finished, "
                f"{self.total} in the grid, {self.elapsed_s:.1f} s; results in {self.results_dir}")
        if self.interrupted:
            line += "; run the same command again to resume"
        elif self.grid_failed:
            line += f"; {self.grid_failed} failed (see the 'error' column; --retry-failed runs them again)"
        if self.set_aside:
            line += f"; {len(self.set_aside)} file(s) set aside (named above)"
        return line


class BufferedWriter:
    """Finished trials buffered and written as one part per table: when ``max_trials`` are
    waiting or their curves hold ``max_rows`` epoch and point rows, and by a timer thread once
    the oldest has waited ``max_age_s``. So a 100,000-trial grid leaves hundreds of files rather
    than hundreds of thousands, the driver's memory follows the buffer whatever the number of
    trials or epochs, and a killed run loses at most the last few seconds of results (plus the
    trials in flight). Each batch of results becomes Arrow tables as it arrives, while the
    driver would otherwise wait: the write after the last group then only writes them
    (full.yaml's: 0.6 -> 0.1 s; pyarrow's first import of pandas, 0.2 s, was part of it), and
    the buffer holds columns, not a Python object per record (peak memory 313 -> 245 MiB)."""

    def __init__(self, results_dir: Path, run_id: str, max_trials: int = 2000, max_age_s: float = 5.0,
                 max_rows: int = 200_000):
        self.results_dir, self.run_id, self.max_trials, self.max_age_s = results_dir, run_id, max_trials, max_age_s
        self.max_rows = max_rows
        self.pending: list[dict] = []  # store.result_tables of each batch added
        self.trials = 0  # trials in pending
        self.rows = 0  # epoch and point records in pending
        self.oldest = 0.0
        self.seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="harness-flush", daemon=True)
        self._timer.start()

    def add(self, results) -> None:
        if not results:
            return
        tables = store.result_tables(results, self.run_id)
        with self._lock:
            if not self.pending:
                self.oldest = time.monotonic()
            self.pending.append(tables)
            self.trials += len(results)
            self.rows += sum(tables[kind].num_rows for kind in store.CURVES)
            if self.trials >= self.max_trials or self.rows >= self.max_rows or self.max_age_s <= 0:
                self._flush()

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, max(self.max_age_s, 0.1))):
            with self._lock:
                if self.pending and time.monotonic() - self.oldest >= self.max_age_s:
                    self._flush()

    def _flush(self) -> None:
        store.write_tables(self.results_dir, self.pending, self.run_id, self.seq)
        self.pending, self.trials, self.rows, self.seq = [], 0, 0, self.seq + 1

    def close(self) -> None:
        """Write what is still buffered and stop the timer."""
        self._stop.set()
        self._timer.join()
        with self._lock:
            if self.pending:
                self._flush()


@contextlib.contextmanager
def announced_set_asides() -> Iterator[list[str]]:
    """Every file the store moves (or would move) to set-aside/ inside the block, named on
    stderr as it happens and collected for the run summary; other warnings pass on as usual."""
    moved: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", store.SetAsideWarning)
        try:
            yield moved
        finally:
            for warning in caught:
                if issubclass(warning.category, store.SetAsideWarning):
                    moved.append(str(warning.message))
                    print(f"harness: set aside: {warning.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # Counted in model-updates, the work itself: a fused group of 35 trials advances the bar by
    # its share of the grid's compute, not by a jump of 35 tasks, so the ETA means something.
    return tqdm(total=total, desc=desc, unit=" updates", unit_scale=True, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def _measure_probes(todo: list, results_dir: Path, backend: Backend, run_id: str) -> None:
    """Timing probes (harness.probe) of the specs ``todo``, each alone in its task; written as one part."""
    print(f"timing probe: seconds per update of one Keras model for {len(todo)} batch size(s)", file=sys.stderr)
    rows = []
    for out in backend.run([[spec] for spec in todo], work=probe.run_probes):
        for row in out:
            if isinstance(row, dict):
                rows.append(row)
            else:  # a lost task comes back as a failed trial row: the probe is simply missing
                print(f"timing probe: batch size {row.spec.batch_size} not measured ({row.error})", file=sys.stderr)
    store.write_probes(results_dir, rows, run_id)


def run_study(grid: GridConfig, results_dir: Path, backend: Backend, *, retry_failed: bool = False,
              progress: bool = True, meta_extra: dict | None = None, flush_s: float = 5.0,
              pick_backend: Callable[[Sequence[TrialSpec]], Backend] | None = None) -> RunSummary:
    """Train every unfinished trial of ``grid`` into ``results_dir``; resumable at any point.

    Holds the folder's lock for the whole run. Results are written within seconds of
    arriving (BufferedWriter), so an interrupted run keeps all that finished, and the parts are
    compacted at the end. KeyboardInterrupt stops the run, writes what arrived and returns with
    ``interrupted`` set. ``pick_backend``, if given, chooses the backend once the trials left to
    run are known (``--backend auto``: a small grid runs in this process instead of starting Ray).
    """
    started = utc_now()
    t0 = time.perf_counter()
    run_id = new_run_id(started)
    with store.locked(results_dir):
        store.drop_orphan_epochs(results_dir)
        with announced_set_asides() as moved:
            plan = plan_run(grid, store.finished_trials(results_dir), retry_failed)
            if plan.retry:
                store.remove_trials(results_dir, set(plan.retry))
        if pick_backend is not None and plan.todo:
            backend = pick_backend(plan.todo)
        summary = RunSummary(run_id=run_id, results_dir=results_dir, total=len(plan.specs),
                             skipped=len(plan.specs) - len(plan.todo), set_aside=moved)
        probes = probe.probes_for(plan.specs, set(store.read_probes(results_dir)["probe_id"])) \
            if grid.timing_probe else []
        # Drawn (TensorFlow imported on a cold cache) while Ray starts, sent with the fused tasks.
        weights = initial.Preparing(plan.todo) if plan.todo else None
        # On a cold numba cache, one compile for the machine while Ray starts, not one per worker.
        compiling = kernel_choice.compile_ahead(plan.todo, backend.local_slots()) if plan.todo else None
        if compiling is not None and progress:
            print(f"harness run: compiling the numba kernels once for this machine (about "
                  f"{kernel_choice.COLD_START_S:.0f} s, while Ray starts)", file=sys.stderr)
        if plan.todo or probes:
            backend.connect()  # a cluster that cannot be joined fails here, before anything is written
            store.write_run_metadata(results_dir, run_metadata(
                run_id, started, grid.path, grid.sha256,
                {"grid_name": grid.name, "backend": backend.name, "trials_in_grid": len(plan.specs),
                 "trials_to_run": len(plan.todo), "argv": sys.argv, **(meta_extra or {})}))
        bar = _progress(sum(s.planned_updates for s in plan.todo), grid.name, progress and bool(plan.todo))
        results_iter = iter([])
        finished = False
        writer = BufferedWriter(results_dir, run_id, max_age_s=flush_s)
        try:
            if probes:
                _measure_probes(probes, results_dir, backend, run_id)
            # No work, no backend: a finished grid reruns in a blink, without starting Ray.
            if plan.todo:
                slots = backend.slots()
                tasks = initial.attach(plan_tasks(plan.todo, slots), weights.result())
                if compiling is not None:
                    compiling.wait()  # a failed compile leaves the cache cold: the plan then says NumPy
                kernel_choice.attach(tasks, slots)  # numba or NumPy, chosen for the run as a whole
                results_iter = backend.run(tasks)
            for results in results_iter:
                writer.add(results)
                summary.statuses.update(r.status for r in results)
                bar.update(sum(r.spec.planned_updates for r in results))
                bar.set_postfix(trials=f"{summary.ran}/{len(plan.todo)}", failed=summary.statuses["failed"],
                                diverged=summary.statuses["diverged"], refresh=False)
            finished = bool(plan.todo)
        except KeyboardInterrupt:
            summary.interrupted, finished = True, False
        finally:
            if compiling is not None and compiling.poll() is None:  # interrupted while it compiled
                compiling.kill()
                compiling.wait()
            if hasattr(results_iter, "close"):
                results_iter.close()  # cancels tasks in flight
            # Shutting down a Ray it started (~0.4 s, waiting for Ray's processes to exit)
            # overlaps writing the last results and compacting them.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-close") as pool:
                closing = pool.submit(backend.close) if plan.todo or probes else None
                try:
                    writer.close()
                    bar.close()
                    if finished:  # not after Ctrl-C, which wants out now: the next run compacts
                        compact(results_dir)
                finally:
                    if closing is not None:
                        closing.result()
        summary.grid_failed = plan.kept_failed + summary.statuses["failed"]
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def describe_plan(grid: GridConfig, plan: Plan, backend_name: str, slots: int = 1) -> str:
    """What --dry-run prints: counts, work units and the trials that would run."""
    groups = plan_tasks(plan.todo, slots)
    engines = Counter(s.train.engine for s in plan.todo)
    updates = sum(s.planned_updates for s in plan.todo)
    lines = [
        f"grid '{grid.name}' ({grid.path}): {len(plan.specs)} trials; {len(plan.specs) - len(plan.todo)} "
        f"already finished; {len(plan.todo)} would run as {len(groups)} tasks on the {backend_name} backend "
        f"({', '.join(f'{n} {e}' for e, n in sorted(engines.items())) or 'nothing'}; {updates:,} updates)",
        f"sized for {slots} slot(s): about {modelled_wall_s(groups, slots):,.0f} s of training by the cost model "
        f"(harness.work), start-up not included",
    ]
    if grid.overrides:
        lines.insert(1, f"overrides applied to the file: {' '.join(grid.overrides)}")
    if plan.kept_failed:
        lines.append(f"{plan.kept_failed} failed trials are kept as they are (--retry-failed runs them again)")
    for spec in plan.todo:
        extra = "" if spec.trial_id not in plan.retry else "  (retry)"
        lines.append(f"  {spec.trial_id}  batch_size={spec.batch_size} learning_rate={spec.learning_rate:g} "
                     f"seed={spec.seed} momentum={spec.train.momentum:g} epochs={spec.train.epochs} "
                     f"engine={spec.train.engine}{extra}")
    return "\n".join(lines)


def default_results_dir(grid: GridConfig, root: Path = Path("results")) -> Path:
    return root / grid.name


def check_results_dir(path: Path) -> None:
    """Refuse a --results path that exists but is not a folder we can use."""
    if path.exists() and not path.is_dir():
        raise store.StoreError(f"{path}: exists and is not a folder; pass another --results")
    if path.is_dir() and any(path.iterdir()) and not store.is_results_dir(path) \
            and not (path / ".lock").exists():
        raise store.StoreError(f"{path}: is a folder with other files, not a results folder; "
                               f"pass an empty or new --results folder")
