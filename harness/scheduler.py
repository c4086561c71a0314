"""Backends that run units of work (groups of trial specs) and hand results back to the driver.

Both backends have one method, ``run(groups) -> Iterator[list[TrialResult]]``, yielding each
group's results as it completes. The serial backend runs in this process (tests, debuggers);
the Ray backend fans groups out as Ray tasks, over this machine's cores or any Ray cluster.
Workers share neither the driver's disk nor its process: the code ships through Ray's runtime
environment, results travel back as return values, and only the driver writes them.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from harness import private_ray
from harness.config import ConfigError
from harness.engines import run_group
from harness.grid import TrialSpec
from harness.results import TrialResult, failed_result

Group = Sequence[TrialSpec]
Work = Callable[[Group], list[TrialResult]]  # what runs one group; run_group unless a test swaps it


class ClusterError(ConfigError):
    """The Ray cluster named by --address or RAY_ADDRESS cannot be joined; one line for the user."""


class Backend(Protocol):
    name: str

    def connect(self) -> None:
        """Get ready to run (join or start a cluster); raise a one-line error if that fails."""

    def close(self) -> None:
        """Release what connect() started."""

    def slots(self) -> int:
        """How many units of work run at once (after connect): what the work is sized to."""

    def local_slots(self) -> int:
        """Before connect: how many of the run's workers start on this machine, sharing its
        caches (0 for a cluster joined, whose nodes keep their own)."""

    def run(self, groups: Sequence[Group], work: Work | None = None) -> Iterator[list[TrialResult]]:
        """Yield one list of results per group, in completion order; ``work`` (default: the
        backend's own, run_group) is what runs one group."""


def worker_env(threads: int) -> dict[str, str]:
    """Environment for a trial's process: one thread budget for TF and BLAS, and quiet TF."""
    n = str(threads)
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": "1",
            "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "HARNESS_THREADS_PER_TRIAL": n, "PYTHONWARNINGS": "ignore"}


@dataclass
class SerialBackend:
    """Runs every group in the calling process, in order: the debugger's friend and the test fake."""

    work: Work = run_group
    name: str = "serial"

    def connect(self) -> None:
        """Nothing to join: trials run in this process."""

    def close(self) -> None:
        """Nothing to shut down."""

    def slots(self) -> int:
        return 1

    def local_slots(self) -> int:
        return 1

    def run(self, groups: Sequence[Group], work: Work | None = None) -> Iterator[list[TrialResult]]:
        with _stop_between_groups() as stop:
            for group in groups:
                if stop.is_set():
                    raise KeyboardInterrupt
                yield (work or self.work)(group)


@contextlib.contextmanager
def _stop_between_groups() -> Iterator[threading.Event]:
    """Ctrl-C (or SIGTERM) during an in-process run stops it before the next group; a second one
    stops it at once. Raising at the first, wherever the signal lands, is not reliable: inside
    TensorFlow's or the garbage collector's callbacks the KeyboardInterrupt is printed as
    "Exception ignored" and the run goes on. Off the main thread (no signals there) nothing changes."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ray_group(work: Work, group: Group) -> list[TrialResult]:
    import ray

    from harness.results import with_node

    return with_node(work(group), ray.get_runtime_context().get_node_id())


def _node_rotation(cpus_per_trial: int) -> Iterator:
    """Scheduling strategies cycling over the alive nodes, each node once per trial slot it
    offers (CPUs // cpus_per_trial), interleaved so consecutive tasks go to different nodes."""
    import itertools

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import ray

    slots = [(n["NodeID"], int(n["Resources"].get("CPU", 0) // cpus_per_trial)) for n in ray.nodes() if n["Alive"]]
    order = [node for rank in range(max((k for _, k in slots), default=0))
             for node, k in slots if rank < k]
    if not order:
        return iter(())
    return (NodeAffinitySchedulingStrategy(node, soft=True) for node in itertools.cycle(order))


def _last_line(exc: BaseException) -> str:
    # Ray's messages start with a coloured task banner; the cause is on the last line.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _code_env() -> dict | None:
    """What a driver joining from outside ships to the workers: the harness package itself, so
    the nodes need its dependencies installed but not this checkout."""
    # Inside `ray job submit` the job supervisor hands its driver the job's runtime env
    # (working_dir included) in this variable and ray.init merges it in: nothing to add.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    import harness

    return {"py_modules": [os.path.dirname(harness.__file__)]}


def _auth_refused(exc: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _join_error(address: str, exc: BaseException) -> str:
    if _auth_refused(exc):
        # Never suggest RAY_AUTH_MODE=disabled: that opens the cluster to anyone who can reach it.
        return (f"cannot join the Ray cluster at {address}: it wants token authentication "
                f"(RAY_AUTH_MODE here is {os.environ.get('RAY_AUTH_MODE', 'unset')}); export "
                f"RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN or in ~/.ray/auth_token "
                f"(`ray get-auth-token` on the head node prints it)")
    return f"cannot join the Ray cluster at {address}: {_last_line(exc)}; check --address and RAY_ADDRESS"


# Ray Client starts a fresh server process on the head for every connection, and Ray 2.60's
# proxy aborts the connection if that process exits while it is being inspected (seen here as
# "ConnectionAbortedError: psutil.ZombieProcess" on a loaded machine). A new connection gets a
# new server, so such a refusal is worth two more tries; an auth refusal never is.
JOIN_ATTEMPTS = 3


def _transient_client_failure(address: str, exc: BaseException) -> bool:
    return address.startswith("ray://") and isinstance(exc, ConnectionAbortedError) and not _auth_refused(exc)


def _no_colour_reset_at_exit() -> None:
    """Ray's CLI logger calls colorama.init() when Ray is imported, and colorama's exit hook then
    writes a colour-reset code to a terminal after everything else: a stray line under the
    run's summary. Unhook it; the colours Ray itself prints are unaffected."""
    colorama = sys.modules.get("colorama.initialise")
    if colorama is not None:
        atexit.unregister(colorama.reset_all)


def _check_address(address: str) -> None:
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{address} is a dashboard (job API) address, not one a driver can join; submit with "
            f"`ray job submit --address {address} -- python -m harness.run ...`, or pass "
            f"--address ray://HEAD:10001 or HEAD:6379 (check RAY_ADDRESS too)")


@dataclass
class RayBackend:
    """Ray core tasks with ``ray.wait``: one task per group, ``cpus_per_trial`` CPUs each.

    ``address`` None starts a private, quiet Ray instance in this process (unless RAY_ADDRESS
    is set); anything else (``ray://host:10001``, ``host:6379``, ``auto``) joins that cluster
    with the token authentication it asks for (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN or
    ~/.ray/auth_token). Tasks are spread over the nodes, so even a small grid uses every node.
    A task whose worker or node dies is retried by Ray, elsewhere if its node is gone, up to
    ``max_retries`` times; after that its trials become ``failed`` rows and the run goes on.
    """

    address: str | None = None
    cpus_per_trial: int = 1
    max_concurrent: int | None = None
    max_retries: int = 3
    verbose: bool = False
    num_cpus: int | None = None  # for the local instance only; None = all cores
    work: Work = run_group
    name: str = "ray"
    _owns_ray: bool = field(default=False, init=False)  # close() shuts Ray down only if we started it
    _env_inherited: bool = field(default=False, init=False)  # a private instance's workers have worker_env

    def connect(self) -> None:
        """Initialise Ray unless already initialised (the driver calls this before writing
        anything, so a cluster that cannot be joined leaves no trace). Raises ClusterError
        (one line) when the cluster cannot be joined."""
        import ray

        _no_colour_reset_at_exit()
        if ray.is_initialized():
            return
        kwargs = dict(logging_level=logging.INFO if self.verbose else logging.ERROR, configure_logging=True)
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            private_ray.start(worker_env(self.cpus_per_trial), num_cpus=self.num_cpus, verbose=self.verbose, **kwargs)
            self._env_inherited = True
        else:
            _check_address(address)
            for attempt in range(1, JOIN_ATTEMPTS + 1):
                try:
                    ray.init(address=address, runtime_env=_code_env(), log_to_driver=self.verbose, **kwargs)
                    break
                except Exception as exc:  # noqa: BLE001 - Ray raises several types for one cause
                    if attempt == JOIN_ATTEMPTS or not _transient_client_failure(address, exc):
                        raise ClusterError(_join_error(address, exc)) from exc
                    time.sleep(attempt)
        self._owns_ray = True

    def run(self, groups: Sequence[Group], work: Work | None = None) -> Iterator[list[TrialResult]]:
        import ray
        from ray.exceptions import RayError

        work = work or self.work
        started_here = not ray.is_initialized()  # then this call also shuts down what it started
        self.connect()
        base = ray.remote(_ray_group)
        options = dict(num_cpus=self.cpus_per_trial, max_retries=self.max_retries, retry_exceptions=False)
        if not self._env_inherited:
            # Merged with the job's runtime env (working_dir, py_modules), not replacing it.
            options["runtime_env"] = {"env_vars": worker_env(self.cpus_per_trial)}
        placement = _node_rotation(self.cpus_per_trial)
        queue = list(groups)
        limit = self.max_concurrent or len(queue) or 1
        pending: dict = {}
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    group = queue.pop(0)
                    # Round-robin over the nodes' slots: SPREAD alone spreads only the first task
                    # of each worker, after which the nodes whose workers started first take the
                    # queue (measured: 1.2-1.7x max/min trials per node on 8 nodes; this: 1.005).
                    # soft: if that node is gone, Ray runs the task elsewhere.
                    strategy = next(placement, "SPREAD")
                    pending[base.options(scheduling_strategy=strategy, **options).remote(work, group)] = group
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    group = pending.pop(ref)
                    try:
                        results = ray.get(ref)
                    except RayError as exc:  # worker or node lost beyond retries, or task cancelled
                        reason = _last_line(exc)
                        results = [failed_result(spec, f"ray task lost after {self.max_retries} retries: "
                                                       f"{reason}") for spec in group]
                    yield results
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started_here:
                self.close()

    def local_slots(self) -> int:
        """A private instance's slots as they will be (its CPUs over cpus_per_trial, at most
        max_concurrent); 0 when joining a cluster or one already started."""
        import ray

        if self.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
            return 0
        cpus = (self.num_cpus or os.cpu_count() or 1) // self.cpus_per_trial
        return max(1, min(cpus, self.max_concurrent or cpus))

    def slots(self) -> int:
        """Trials the cluster runs at once: its CPUs over cpus_per_trial, at most max_concurrent."""
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 0) // self.cpus_per_trial)
        return max(1, min(cpus, self.max_concurrent or cpus))

    def close(self) -> None:
        """Shut down the Ray this backend started (a joined cluster is left as it is)."""
        import ray

        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = self._env_inherited = False
