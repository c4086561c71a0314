"""A private Ray instance on this machine, started lean: without the head-node processes a run
never uses, and with the workers' environment inherited from the driver.

``ray.init()`` without an address spent 2.6-3.6 s here (Ray 2.60, 2 cores, 4.4 CPU-seconds in
all), most of it on things a private run has no use for. ``start`` leaves them out, and ray.init
takes 1.3-1.5 s (2.3 CPU-s):

- The API server (the dashboard's head; 0.76 CPU-s at start). ray.init waited 0.9-1.0 s for it
  before starting the raylet; with ``include_dashboard=False`` it serves only usage statistics.
- The autoscaler's monitor (0.46 CPU-s): a fixed set of local CPUs has nothing to scale. It also
  held ray.shutdown for a second (the GCS stops first and the monitor waits on it).
- The log monitor (0.37 CPU-s): it forwards the workers' output to the driver, which a quiet run
  discards (a verbose one keeps it).
- The dashboard's modules in the raylet's agent and in the driver (0.2-0.3 CPU-s in the driver
  alone): Ray is told they are missing, as in its minimal install.
- The raylet's registration, polled once a second: ray.init asks the GCS 0.1 s after starting
  the raylet, which registers 0.7-0.8 s later, so it waited one second or two. ``start`` polls
  every 20 ms before Ray asks.

Ray has no options for these, so ``start`` swaps the methods of Ray's node class that do them
(and its check for the dashboard's modules) while ray.init runs, and puts them back after. They
live in Ray's private modules: if Ray moves or renames one, it is simply not swapped and Ray
does what it did before (a slower start, nothing else); the tests check what the instance runs.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

UNUSED = ("start_api_server", "start_monitor")
UNUSED_WHEN_QUIET = UNUSED + ("start_log_monitor",)
# Task events feed Ray's state API and dashboard, which a private instance does not serve; sent
# once a second, they held the driver's ray.shutdown 0.1-0.3 s (0.08 s without them).
SYSTEM_CONFIG = {"task_events_report_interval_ms": 0}
REGISTRATION_POLL_S = 0.02
REGISTRATION_WAIT_S = 30.0  # then Ray's own wait takes over, and reports what went wrong


def _start_nothing(self, *args, **kwargs) -> None:
    return None


def _as_if_minimal() -> ImportError:
    return ImportError("a private instance starts Ray's agents without the dashboard's modules")


def _then_until_registered(start_ray_processes: Callable) -> Callable:
    def started(node) -> None:
        start_ray_processes(node)
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        try:
            gcs = node.get_gcs_client()
            while not gcs.get_all_node_info(timeout=1) and time.monotonic() < deadline:
                time.sleep(REGISTRATION_POLL_S)
        except Exception:  # noqa: BLE001 - whatever it is, Ray's own wait (next) reports it
            return

    return started


@contextlib.contextmanager
def _lean(unused: tuple[str, ...]) -> Iterator[None]:
    """Ray's node class with the methods ``unused`` doing nothing, its raylet waited for here,
    and Ray told that its dashboard's modules are missing; then all as it was."""
    try:
        import ray._private.utils as utils
        from ray._private.node import Node
    except ImportError:
        yield
        return
    swaps = [(Node, name, _start_nothing) for name in unused]
    swaps += [(Node, "start_ray_processes", _then_until_registered(getattr(Node, "start_ray_processes", None))),
              (utils, "get_dashboard_dependency_error", _as_if_minimal)]
    saved = [(owner, name, vars(owner)[name], new) for owner, name, new in swaps if name in vars(owner)]
    for owner, name, _, new in saved:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, original, _ in saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with ``values`` set, for the processes started within; then
    as it was."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start(worker_env: dict[str, str], *, num_cpus: int | None, verbose: bool, **init_kwargs) -> None:
    """Start a private Ray instance whose processes, workers included, inherit ``worker_env``:
    tasks then need no runtime env and run on the workers Ray starts with it, 1.7 s sooner than
    on workers started for a task's env (measured before the lean start: ray.init 2.6 s against
    3.7 s, the first tasks 0.3 s against 1.1 s). Nothing listens beyond loopback."""
    import ray

    with _environment(worker_env), _lean(UNUSED if verbose else UNUSED_WHEN_QUIET):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose, _system_config=SYSTEM_CONFIG,
                 **init_kwargs)
