"""The Ray backend, on a real in-process Ray, against the serial backend."""
import pytest

from harness.grid import expand_grid
from harness.work import group_specs
from harness.scheduler import RayBackend, SerialBackend

from conftest import REPO, tiny_grid
from fakes import die_on_seed_one, instant_work


def _by_id(batches):
    return {r.trial_id: r for batch in batches for r in batch}


def test_serial_and_ray_give_the_same_numbers(ray_local):
    groups = group_specs(expand_grid(tiny_grid(epochs=3, batch_size=[50, 500], seed=[0, 1])))
    serial = _by_id(SerialBackend().run(groups))
    ray_results = _by_id(RayBackend().run(groups))
    assert serial.keys() == ray_results.keys() and len(serial) == 4
    for trial_id, a in serial.items():
        b = ray_results[trial_id]
        assert a.status == b.status == "ok"
        assert [e.loss for e in a.epochs] == [e.loss for e in b.epochs]
        assert a.test_accuracy == b.test_accuracy
        assert a.node_id == "local" and b.node_id == ray_local.get_runtime_context().get_node_id()


def _most_at_once(marker_dir) -> int:
    spans = [tuple(map(float, p.read_text().split())) for p in marker_dir.iterdir()]
    return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)


@pytest.mark.parametrize("cap, most", [(1, 1), (None, 2)])
def test_concurrency_cap_holds_and_every_group_arrives_once(ray_local, tmp_path, cap, most):
    """With a cap of 1 no two groups overlap on 2 CPUs; without one they do (so the check can fail)."""
    from functools import partial

    from fakes import timed_work

    groups = group_specs(expand_grid(tiny_grid(epochs=1, batch_size=[1, 2, 4, 8], seed=[0])))
    batches = list(RayBackend(max_concurrent=cap, work=partial(timed_work, str(tmp_path))).run(groups))
    assert sorted(len(b) for b in batches) == [1] * 4
    assert {r.trial_id for b in batches for r in b} == {g[0].trial_id for g in groups}
    assert _most_at_once(tmp_path) == most


def test_a_worker_that_keeps_dying_becomes_failed_rows(ray_local):
    groups = group_specs(expand_grid(tiny_grid(epochs=1, batch_size=[100], seed=[0, 1, 2])))
    results = _by_id(RayBackend(max_retries=1, work=die_on_seed_one).run(groups))
    assert len(results) == 3
    statuses = {r.spec.seed: r.status for r in results.values()}
    assert statuses == {0: "ok", 1: "failed", 2: "ok"}
    failed = next(r for r in results.values() if r.status == "failed")
    assert "ray task lost after 1 retries" in failed.error


def test_ray_backend_is_not_started_without_ray_initialised_by_the_test_twice(ray_local):
    backend = RayBackend(work=instant_work)
    backend.connect()
    assert not backend._owns_ray  # joined the running instance instead of starting another
    list(backend.run([]))
    assert ray_local.is_initialized()  # and did not shut down a Ray it does not own
    with pytest.raises(TypeError):
        RayBackend(unknown_option=1)



def test_a_ray_client_connection_aborted_at_start_is_tried_again(monkeypatch):
    import ray

    from harness import scheduler

    calls = []

    def flaky_init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise ConnectionAbortedError("psutil.ZombieProcess: PID still exists but it's a zombie")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: None)
    backend = RayBackend(address="ray://127.0.0.1:1")
    backend.connect()
    assert calls == ["ray://127.0.0.1:1"] * 2 and backend._owns_ray


def test_other_join_failures_are_not_retried(monkeypatch):
    import ray

    from harness import scheduler

    calls = []

    def refusing_init(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionError("no cluster there")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refusing_init)
    with pytest.raises(scheduler.ClusterError, match="cannot join the Ray cluster at 127.0.0.1:1"):
        RayBackend(address="127.0.0.1:1").connect()
    assert calls == ["127.0.0.1:1"]


@pytest.mark.parametrize("unhook", [False, True])
def test_no_stray_colour_reset_line_on_a_terminal(unhook):
    """Ray's import runs colorama.init(), whose exit hook writes ESC[0m to a terminal after our
    summary; the backend unhooks it. `script` gives the child a real pseudo-terminal."""
    import subprocess
    import sys

    code = ("import ray.autoscaler._private.cli_logger; from harness.scheduler import _no_colour_reset_at_exit; "
            + ("_no_colour_reset_at_exit(); " if unhook else "") + "print('summary')")
    proc = subprocess.run(["script", "-qc", f'{sys.executable} -c "{code}"', "/dev/null"], capture_output=True,
                          timeout=120, cwd=str(REPO))
    assert proc.returncode == 0 and b"summary" in proc.stdout, proc.stdout + proc.stderr
    assert (b"\x1b[0m" in proc.stdout) is not unhook  # without the unhook the stray code is there


def test_private_ray_workers_get_the_trial_environment_and_the_driver_keeps_its_own():
    """A private instance's workers inherit the thread budget from the driver while Ray starts
    (so tasks carry no runtime env); the driver's own environment is as it was afterwards. In a
    fresh process: this session's tests share a Ray already started."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, os; import fakes; from harness.scheduler import RayBackend; "
            "os.environ['OMP_NUM_THREADS'] = '7'; os.environ.pop('HARNESS_THREADS_PER_TRIAL', None); "
            "seen = [r for b in RayBackend(num_cpus=2).run([('a',), ('b',)], work=fakes.environment) for r in b]; "
            "print(json.dumps({'workers': seen, 'driver': [os.environ.get('OMP_NUM_THREADS'), "
            "os.environ.get('HARNESS_THREADS_PER_TRIAL')]}))")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=str(REPO),
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["workers"] == [{"OMP_NUM_THREADS": "1", "HARNESS_THREADS_PER_TRIAL": "1",
                                "TF_CPP_MIN_LOG_LEVEL": "2"}] * 2
    assert seen["driver"] == ["7", None]
