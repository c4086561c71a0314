"""The command lines (`harness run`, `harness report`): argument parsing and exit codes only;
the work lives in the modules they call. Both report bad input the same way: one line
`harness <command>: error: <message>` on stderr and exit code 2, never a traceback.

Exit codes of `run`: 0 every trial ok or diverged, 1 some trial failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from harness.config import ENGINES, ConfigError, load_grid, with_engine
from harness.grid import LARGE_GRID_TRIALS, count_trials


class UsageError(ValueError):
    """A command-line argument is unusable; one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 through _fail, no usage dump
        raise UsageError(f"{message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {value:g}")
    return value


def _results_path(text: str) -> Path:
    """A folder path, or a file:// URI read through pyarrow's filesystems. The store needs file
    locks and atomic renames, so other schemes (s3://, gs://, hdfs://) must be mounted first."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if not match:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme != "file":
        raise argparse.ArgumentTypeError(
            f"{text}: a results folder needs file locks and atomic renames, which {scheme}:// does not "
            f"offer; mount it (e.g. s3fs, gcsfuse, NFS) and pass the mounted path or a file:// URI")
    from pyarrow import ArrowInvalid
    from pyarrow.fs import FileSystem

    try:
        _, path = FileSystem.from_uri(text)
    except ArrowInvalid as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a usable file:// URI ({exc})") from None
    return Path(path)


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="harness run", description="Run a grid of training trials and write results to Parquet.")
    p.add_argument("grid", help="grid YAML file, e.g. grids/smoke.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="grid keys set from the command line, validated like the file: train.epochs=20 "
                        "'sweep.seed=[0,1]' problem.n_val=250 name=quick")
    p.add_argument("--results", type=_results_path,
                   help="results folder or file:// URI (default: results/<grid name>/)")
    p.add_argument("--address", help="Ray cluster to join (ray://host:10001, host:6379 or 'auto'); "
                                     "default: $RAY_ADDRESS, else a private local Ray")
    p.add_argument("--backend", choices=("auto", "ray", "serial"), default="auto",
                   help="auto (default): Ray, unless a private Ray would cost more to start than it saves "
                        "(a small grid), then this process; ray: always Ray; serial: always this process")
    p.add_argument("--engine", choices=ENGINES, help="override the grid's train.engine")
    p.add_argument("--max-concurrent", type=_positive_int, help="at most N tasks in flight (default: as many as CPUs allow)")
    p.add_argument("--cpus-per-trial", type=_positive_int, default=1, help="CPUs (and TF threads) per task (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--fresh", action="store_true", help="move existing results aside (kept, renamed) and start anew")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--yes", action="store_true", help=f"allow grids of more than {LARGE_GRID_TRIALS:,} trials")
    p.add_argument("--flush-seconds", type=_seconds, default=5.0, metavar="S",
                   help="write finished trials at least every S seconds (default 5; 0 = as each arrives): "
                        "a killed run loses at most that much finished work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show Ray and TensorFlow logs from workers")
    return p


def _print_piped(text: str) -> None:
    """Print a long listing that may be piped into `head`: a reader that stops early is normal,
    not an error (Python's advice: point stdout at devnull so the exit flush stays quiet)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _in_process(args) -> "SerialBackend":
    """The serial backend, with what a Ray worker gets (thread budget, quiet TensorFlow) set in
    this process's environment before TensorFlow is first imported. Values already set win."""
    from harness.scheduler import SerialBackend, worker_env

    for key, value in worker_env(args.cpus_per_trial).items():
        if not (args.verbose and key == "TF_CPP_MIN_LOG_LEVEL"):
            os.environ.setdefault(key, value)
    return SerialBackend()


def run_main(argv: list[str] | None = None) -> int:
    from harness import driver, store
    from harness.initial import DrawError
    from harness.scheduler import RayBackend
    from harness.engines import kernel_choice
    from harness.work import ray_pays_off

    prog = "harness run"
    try:
        args = run_parser().parse_args(argv)
        grid = with_engine(load_grid(args.grid, args.overrides), args.engine)
        n = count_trials(grid)
        if n > LARGE_GRID_TRIALS and not args.yes:
            raise ConfigError(f"{args.grid}: the grid has {n:,} trials (over {LARGE_GRID_TRIALS:,}); "
                              f"pass --yes if that is intended")
        results_dir = args.results or driver.default_results_dir(grid)
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not results_dir.is_absolute():
            # Under `ray job submit` the working directory is Ray's temporary copy of --working-dir.
            print(f"harness run: warning: inside a Ray job, {results_dir} is under the job's temporary "
                  f"working directory ({Path.cwd()}), which Ray may delete; pass an absolute --results "
                  f"on storage you can reach", file=sys.stderr)
        driver.check_results_dir(results_dir)
        if args.backend == "serial" and args.address:
            raise ConfigError("--address needs the ray backend, not --backend serial")
        if not args.verbose:  # the driver itself may import TensorFlow (initial weights, serial trials)
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        ray_backend = RayBackend(address=args.address, cpus_per_trial=args.cpus_per_trial,
                                 max_concurrent=args.max_concurrent, verbose=args.verbose)
        backend = _in_process(args) if args.backend == "serial" else ray_backend
        pick = None
        if args.backend == "auto" and not (args.address or os.environ.get("RAY_ADDRESS")):
            cores = args.max_concurrent or max(1, (os.cpu_count() or 1) // args.cpus_per_trial)

            def pick(todo):
                if ray_pays_off(todo, cores, kernel_choice.task_s):
                    return ray_backend
                print("harness run: a small grid: training in this process, without starting Ray "
                      "(--backend ray to use Ray anyway)", file=sys.stderr)
                return _in_process(args)
        if args.dry_run:  # strictly read-only: what a run would set aside is reported, not moved
            with driver.announced_set_asides():
                on_disk = store.finished_trials(results_dir, move=False) if not args.fresh else {}
            # Without joining a cluster: sized for this machine's cores, or --max-concurrent.
            plan = driver.plan_run(grid, on_disk, args.retry_failed)
            name = backend.name
            if pick is not None and plan.todo and not ray_pays_off(plan.todo, cores, kernel_choice.task_s):
                name = "serial (a small grid: this process, without starting Ray)"
            slots = 1 if name != "ray" else (args.max_concurrent or max(1, (os.cpu_count() or 1) // args.cpus_per_trial))
            _print_piped(driver.describe_plan(grid, plan, name, slots))
            return 0
        if args.fresh:
            with store.locked(results_dir):
                moved = store.move_aside(results_dir)
            if moved:
                print(f"moved earlier results to {moved}", file=sys.stderr)
        # Batch schedulers (Slurm, Kubernetes) stop jobs with SIGTERM: treat it like Ctrl-C, so
        # the run stops cleanly, keeps what finished and says how to resume.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        summary = driver.run_study(grid, results_dir, backend, retry_failed=args.retry_failed,
                                   progress=not args.quiet, flush_s=args.flush_seconds,
                                   meta_extra={"address": args.address or os.environ.get("RAY_ADDRESS"),
                                               "cpus_per_trial": args.cpus_per_trial,
                                               "engine_override": args.engine,
                                               # the grid itself travels with its results, so a
                                               # report can tell what is still missing from anywhere
                                               "grid_yaml": grid.source, "overrides": list(grid.overrides),
                                               "data_file": grid.problem.path or None,
                                               "data_file_sha256": grid.problem.file_sha256 or None},
                                   pick_backend=pick)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ConfigError, store.StoreError, DrawError) as exc:
        return _fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before any trial ran; nothing was written", file=sys.stderr)
        return 130
    print(summary.describe(), file=sys.stderr if summary.interrupted else sys.stdout)
    return summary.exit_code


def _formats(text: str) -> list[str]:
    from harness.reporter import FORMATS

    formats = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--format: unknown format {', '.join(bad) or repr(text)}; "
                         f"valid formats: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="harness report", description="Figures and a summary table for a batch-size study.")
    p.add_argument("results_dir", type=Path, help="results folder written by 'harness run'")
    p.add_argument("--out", type=Path, help="output folder (default: RESULTS_DIR/report/)")
    p.add_argument("--target-accuracy", type=float, default=0.8, metavar="ACC",
                   help="test accuracy the 'to target' clocks measure (default 0.8)")
    p.add_argument("--format", default="png", help="comma-separated, of png, pdf, svg (default png)")
    return p


def report_main(argv: list[str] | None = None) -> int:
    """`harness report`: 0, or 2 with one line on stderr for unusable input."""
    from harness.reporter import ReportError, write_report
    from harness.store import StoreError

    prog = "harness report"
    try:
        args = report_parser().parse_args(argv)
        formats = _formats(args.format)
        if not 0.0 < args.target_accuracy <= 1.0:
            raise UsageError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy:g}")
        path = write_report(args.results_dir, args.out or args.results_dir / "report", args.target_accuracy,
                            formats)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ReportError, StoreError) as exc:
        return _fail(prog, str(exc))
    except OSError as exc:  # e.g. an --out folder we may not write to
        return _fail(prog, f"{exc.filename or ''}: {exc.strerror or exc}")
    print(f"{prog}: wrote {path}")
    return 0


def compact_main(argv: list[str] | None = None) -> int:
    """`harness compact DIR`: merge a results folder's part files, one per table (a run does this
    at its end; this is for folders left by killed runs, or before copying results around)."""
    from harness import store
    from harness.compaction import compact

    prog = "harness compact"
    parser = _Parser(prog=prog, description="Merge a results folder's part files into one per table.")
    parser.add_argument("results_dir", type=_results_path, help="results folder written by 'harness run'")
    try:
        args = parser.parse_args(argv)
        if not store.is_results_dir(args.results_dir):
            raise UsageError(f"{args.results_dir}: not a results folder (no trials/ or runs/ inside)")
        with store.locked(args.results_dir):
            done = compact(args.results_dir)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, store.StoreError) as exc:
        return _fail(prog, str(exc))
    print(f"{prog}: {args.results_dir}: {done.trials} trials, {done.files_before} part files -> {done.files_after}")
    return 0


COMMANDS = {"run": run_main, "report": report_main, "compact": compact_main}


def main(argv: list[str] | None = None) -> int:
    """`harness run ...`, `harness report ...` or `harness compact ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: harness {run,report,compact} ... (see harness <command> --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
