"""Backends that run units of work (groups of trial specs) and hand results back to the driver.

Both backends have one method, ``run(groups) -> Iterator[list[TrialResult]]``, yielding each
group's results as it completes. The serial backend runs in this process (tests, debuggers);
the Ray backend fans groups out as Ray tasks. Workers never touch the driver's disk: results
travel back as return values and the driver writes them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from harness.grid import TrialSpec
from harness.trial import TrialResult, failed_result, run_group

Group = Sequence[TrialSpec]
Work = Callable[[Group], list[TrialResult]]  # what runs one group; run_group unless a test swaps it


class Backend(Protocol):
    name: str

    def run(self, groups: Sequence[Group]) -> Iterator[list[TrialResult]]:
        """Yield one list of results per group, in completion order."""


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

    def run(self, groups: Sequence[Group]) -> Iterator[list[TrialResult]]:
        for group in groups:
            yield self.work(group)


def _ray_group(work: Work, group: Group) -> list[TrialResult]:
    import ray

    from harness.trial import with_node

    return with_node(work(group), ray.get_runtime_context().get_node_id())


def _last_line(exc: BaseException) -> str:
    # Ray's messages start with a coloured task banner; the cause is on the last line.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


@dataclass
class RayBackend:
    """Ray core tasks with ``ray.wait``: one task per group, ``cpus_per_trial`` CPUs each.

    ``address`` None starts a private, quiet Ray instance in this process (unless RAY_ADDRESS
    is set, which Ray itself honours); anything else joins that cluster. A task whose worker
    or node dies is retried by Ray up to ``max_retries`` times; after that its trials become
    ``failed`` rows and the run goes on.
    """

    address: str | None = None
    cpus_per_trial: int = 1
    max_concurrent: int | None = None
    max_retries: int = 3
    verbose: bool = False
    num_cpus: int | None = None  # for the local instance only; None = all cores
    work: Work = run_group
    name: str = "ray"
    cluster_cpus: float = field(default=0.0, init=False)

    def connect(self) -> bool:
        """Initialise Ray unless already initialised; returns True if this call did it."""
        import ray

        if ray.is_initialized():
            return False
        kwargs = dict(log_to_driver=self.verbose, logging_level=logging.INFO if self.verbose else logging.ERROR,
                      configure_logging=True)
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            # A private instance: no dashboard, nothing listening beyond loopback.
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, runtime_env=self._code_env(address), **kwargs)
        self.cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
        return True

    def _code_env(self, address: str) -> dict | None:
        # Inside `ray job submit` the job's working_dir already carries the code; a driver that
        # joins from outside ships the harness package so workers need not have it installed.
        if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"):
            return None
        import harness

        return {"py_modules": [os.path.dirname(harness.__file__)]}

    def run(self, groups: Sequence[Group]) -> Iterator[list[TrialResult]]:
        import ray
        from ray.exceptions import RayError

        started_here = self.connect()
        remote = ray.remote(_ray_group).options(
            num_cpus=self.cpus_per_trial, max_retries=self.max_retries, retry_exceptions=False,
            runtime_env={"env_vars": worker_env(self.cpus_per_trial)})
        queue = list(groups)
        limit = self.max_concurrent or len(queue) or 1
        pending: dict = {}
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    group = queue.pop(0)
                    pending[remote.remote(self.work, group)] = group
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
                ray.shutdown()
