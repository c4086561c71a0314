"""The private Ray instance a run starts on this machine: what it runs, and what it puts back."""
import pytest

from harness import private_ray

from conftest import REPO


class _Gcs:
    def __init__(self, answers):
        self.answers, self.asked = list(answers), 0

    def get_all_node_info(self, timeout=None):
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Node:
    def __init__(self, gcs):
        self.gcs, self.started = gcs, 0

    def get_gcs_client(self):
        return self.gcs


def _start(node):
    node.started += 1


def test_the_raylet_is_polled_for_until_the_gcs_lists_it():
    node = _Node(_Gcs([{}, {}, {"node": "info"}]))
    private_ray._then_until_registered(_start)(node)
    assert node.started == 1 and node.gcs.asked == 3


def test_a_failing_poll_leaves_the_wait_to_ray():
    node = _Node(_Gcs([{}, ConnectionError("GCS not up")]))
    private_ray._then_until_registered(_start)(node)  # no exception: Ray's own wait comes next
    assert node.started == 1 and node.gcs.asked == 2


def test_ray_is_put_back_as_it_was_even_when_its_start_fails():
    ray_node = pytest.importorskip("ray._private.node")
    import ray._private.utils as utils

    before = (dict(vars(ray_node.Node)), utils.get_dashboard_dependency_error)
    with pytest.raises(RuntimeError):
        with private_ray._lean(private_ray.UNUSED_WHEN_QUIET):
            assert vars(ray_node.Node)["start_api_server"] is private_ray._start_nothing  # swapped inside
            raise RuntimeError("ray.init failed")
    assert (dict(vars(ray_node.Node)), utils.get_dashboard_dependency_error) == before


STOP_CHECK = """
import json, sys
import fakes
import ray
import psutil  # ships with Ray
from ray._private.node import Node
from harness.scheduler import RayBackend

def alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

seen = {}
before = dict(vars(Node))
shutdown = ray.shutdown
def watched_shutdown(*args, **kwargs):
    from ray._private.state import state
    seen["config"] = json.loads(state._connect_and_get_accessor().get_system_config())
    kids = [p for p in psutil.Process().children(recursive=True) if alive(p)]
    seen["kids"] = {p.pid: " ".join(p.cmdline()) for p in kids}
    shutdown(*args, **kwargs)
ray.shutdown = watched_shutdown
list(RayBackend(num_cpus=2, verbose=sys.argv[1] == "verbose").run([("a",)], work=fakes.environment))
left = [pid for pid in seen["kids"] if psutil.pid_exists(pid) and alive(psutil.Process(pid))]
print(json.dumps({"kids": list(seen["kids"].values()), "left": left, "config": seen["config"],
                  "node_class_as_before": dict(vars(Node)) == before}))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_private_ray_starts_only_what_a_run_uses_and_leaves_no_process(verbose):
    """A private instance runs no dashboard head, no autoscaler monitor, no dashboard modules in
    the raylet's agent, no log monitor unless the run is verbose (whose workers' output it
    forwards) and sends no task events; Ray's node class is as it was afterwards, and nothing
    the instance started outlives close(). In a fresh process: this session's tests share a Ray already started."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    proc = subprocess.run([sys.executable, "-c", STOP_CHECK, "verbose" if verbose else "quiet"], capture_output=True,
                          text=True, timeout=180, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    kids = seen["kids"]

    def running(part: str) -> bool:
        return any(part in cmd for cmd in kids)

    assert running("gcs_server") and running("raylet") and running("DashboardAgent")  # the instance was looked at
    raylet = next(cmd for cmd in kids if "/raylet " in cmd)
    assert "--minimal" in raylet.split("--runtime_env_agent_command")[0]  # the agent's command, in the raylet's
    assert not running("dashboard/dashboard.py") and not running("autoscaler/_private/monitor.py")
    assert running("_private/log_monitor.py") is verbose
    assert seen["config"]["task_events_report_interval_ms"] == 0  # no task events: nothing serves them
    assert seen["node_class_as_before"] and seen["left"] == []
