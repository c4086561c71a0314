"""The harness on a simulated big cluster: eight Ray nodes on this one machine, instant trials.

`ray.cluster_utils.Cluster` starts a head and seven worker nodes, each a process tree of its
own offering CPUS_PER_NODE logical CPUs: 32 slots on a 2-core machine, because what is under
test is scheduling, not training. Trials are `fakes.instant_work`, so the clock measures the
harness and Ray, never Keras. On that cluster:

- a 100,000-trial grid runs with every node up: every node gets a fair share, every trial lands
  once, the folder ends compacted, a rerun on the finished folder plans nothing within seconds,
  and the run's wall time less that of the same tasks run serially is the scheduling overhead;
- then a 10,000-trial grid whose tasks pause SLOW_TASK_S runs while a worker node is removed
  (every process of it SIGKILLed, no drain) as soon as its first results are on disk: every
  trial lands exactly once, none `failed`.

Everything runs in child processes with their own RAY_TMPDIR and HOME: the cluster's address
file, sessions and sockets go to a scratch folder, never /tmp/ray, so other Ray users of this
machine (and this session's in-process `ray_local`) neither see nor touch it. Token
authentication is on, as Ray ships it (RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN in every
child's environment), and the driver joins as a user's would, through `RayBackend(address=...)`.

Run as a script, this file is those children: `scenario ROOT` starts the cluster, runs the
`serial` and `drive` drivers (children of its own), removes the node, and prints a JSON report.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fakes import instant_work

REPO = Path(__file__).resolve().parents[1]

# Eight nodes is the floor and what a shared 2-core machine holds: a node with its four
# workers takes about 0.4 GB, and starting their 32 workers is most of the Ray run's extra wall
# time. Sixteen nodes fit in memory (6.6 GB) but their 64 workers took two minutes to start,
# pushed the load average to 78 and the overhead to about 2 ms per trial.
NODES = 8
CPUS_PER_NODE = 4
OBJECT_STORE_BYTES = 100 * 1024 ** 2  # per node, in /dev/shm; instant results are small
SLOTS = NODES * CPUS_PER_NODE
BIG_SWEEP = {"batch_size": [10, 20, 25, 50, 100, 125, 200, 250, 400, 500],
             "learning_rate": [round(0.001 * (i + 1), 3) for i in range(100)],
             "seed": list(range(100))}  # 10 x 100 x 100 = 100,000 trials, 97 tasks on 32 slots
KILL_SWEEP = {**BIG_SWEEP, "learning_rate": BIG_SWEEP["learning_rate"][:10]}  # 10,000 trials, 97 tasks
SLOW_TASK_S = 2.0    # the node-kill study's tasks pause this long, so some are running when the node dies
SCENARIO_TIMEOUT_S = 600
CHILD_TIMEOUT_S = 400


def scale_grid(name: str, sweep: dict):
    from harness.config import parse_grid

    return parse_grid({"name": name, "train": {"epochs": 1}, "sweep": sweep}, f"{name}.yaml")


# --- the child processes: `python tests/test_cluster_scale.py COMMAND ARGS...` -------------------

def _slow_work(group, marker_dir: str):
    """instant_work after a pause, leaving a marker `<node id>.<first trial id>` as each task
    starts, so the test can tell which tasks were running on the node that was removed."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    (Path(marker_dir) / f"{node_id}.{group[0].trial_id}").touch()
    time.sleep(SLOW_TASK_S)
    return instant_work(group)


def _timed_study(grid, results: Path, backend, **kwargs) -> tuple[float, float, object]:
    """(wall s, CPU s of this thread, summary) of one run_study."""
    from harness.driver import run_study

    wall0, cpu0 = time.perf_counter(), time.thread_time()
    summary = run_study(grid, results, backend, progress=False, **kwargs)
    return time.perf_counter() - wall0, time.thread_time() - cpu0, summary


def _child_serial(results: str) -> dict:
    """The 100,000 trials in this process, packed into the same tasks as on the cluster."""
    from dataclasses import dataclass

    from harness.scheduler import SerialBackend

    @dataclass
    class SerialPackedForCluster(SerialBackend):
        # plan_tasks sizes tasks by slots(): the cluster's count gives the cluster's tasks.
        cluster_slots: int = 1

        def slots(self) -> int:
            return self.cluster_slots

    wall_s, _, summary = _timed_study(scale_grid("scale", BIG_SWEEP), Path(results),
                                      SerialPackedForCluster(work=instant_work, cluster_slots=SLOTS))
    return {"wall_s": wall_s, "ran": summary.ran, "exit_code": summary.exit_code}


def _child_drive(address: str, big_out: str, kill_out: str, marker_dir: str) -> dict:
    """One driver, joined once through the harness's own RayBackend.connect (token, code
    shipping): the 100,000-trial study, the rerun on its finished folder, then the node-kill
    study. The studies' backends find Ray connected, so they share the job and its workers."""
    from ray import cloudpickle

    import fakes
    from harness.scheduler import RayBackend

    cloudpickle.register_pickle_by_value(fakes)  # workers cannot import tests/ by name
    joined = RayBackend(address=address)
    t0 = time.perf_counter()
    joined.connect()
    connect_s = time.perf_counter() - t0
    big = scale_grid("scale", BIG_SWEEP)
    wall_s, _, summary = _timed_study(big, Path(big_out), RayBackend(address=address, work=instant_work))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    resume_s, resume_cpu_s, again = _timed_study(big, Path(big_out), RayBackend(address=address))
    slow = RayBackend(address=address, work=functools.partial(_slow_work, marker_dir=marker_dir))
    kill_s, _, killed = _timed_study(scale_grid("kill", KILL_SWEEP), Path(kill_out), slow, flush_s=0.5)
    joined.close()
    return {"connect_s": connect_s, "wall_s": connect_s + wall_s, "ran": summary.ran,
            "exit_code": summary.exit_code, "peak_rss_mb": peak_rss_mb,
            "resume_s": resume_s, "resume_cpu_s": resume_cpu_s, "resume_ran": again.ran,
            "resume_skipped": again.skipped,
            "kill": {"wall_s": kill_s, "exit_code": killed.exit_code, "statuses": dict(killed.statuses)}}


def _json_tail(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _wait_for_part(results: Path, driver: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((results / "trials").glob("part-*.parquet")):
            return
        if driver.poll() is not None:
            raise RuntimeError(f"the driver ended before the node-kill study wrote anything: "
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"the node-kill study wrote nothing within {timeout} s: {log.read_text()[-3000:]}")


def _scenario(root: str) -> dict:
    from ray.cluster_utils import Cluster

    base = Path(root)
    node_args = dict(num_cpus=CPUS_PER_NODE, object_store_memory=OBJECT_STORE_BYTES, temp_dir=str(base / "ray"),
                     dashboard_agent_listen_port=None)  # None: a free port, not 52365 (another Ray's)
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**node_args) for _ in range(NODES - 1)]
        cluster.wait_for_nodes()
        report = {"cluster_start_s": time.monotonic() - t0,
                  "node_ids": [cluster.head_node.node_id, *(w.node_id for w in workers)]}

        serial = subprocess.run([sys.executable, __file__, "serial", str(base / "serial")], capture_output=True,
                                text=True, timeout=CHILD_TIMEOUT_S)
        if serial.returncode != 0:
            raise RuntimeError(f"the serial driver exited {serial.returncode}: {serial.stderr[-3000:]}")
        report["serial"] = _json_tail(serial.stdout)

        # The driver is joined to the head's raylet; the victim is a worker node.
        victim, log = workers[-1], base / "drive.log"
        (base / "markers").mkdir()
        with open(log, "w") as err:
            driver = subprocess.Popen([sys.executable, __file__, "drive", cluster.address, str(base / "scale"),
                                       str(base / "kill"), str(base / "markers")],
                                      stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            _wait_for_part(base / "kill", driver, log, timeout=CHILD_TIMEOUT_S)
            report["victim_node_id"] = victim.node_id
            cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
            out, _ = driver.communicate(timeout=CHILD_TIMEOUT_S)
        finally:
            if driver.poll() is None:
                driver.kill()
        if driver.returncode != 0:
            raise RuntimeError(f"the Ray driver exited {driver.returncode}: {log.read_text()[-3000:]}")
        report["ray"] = _json_tail(out)
    finally:
        cluster.shutdown()
    report["scenario_s"] = time.monotonic() - t0
    return report


# --- the tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scale(request):
    """The scenario's report, and the folders it left: ROOT/scale (100,000 trials on the
    cluster), ROOT/serial (the same, serially), ROOT/kill and ROOT/markers (the node-kill study)."""
    # Short root: Ray's Unix socket paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="hscale-"))
    (root / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(root), HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), TF_CPP_MIN_LOG_LEVEL="2",
               # this checkout's harness before any installed copy; tests/ for fakes
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, __file__, "scenario", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario's own process group; its Ray reaper stops the nodes
        out, err = proc.communicate()
    if proc.returncode != 0:
        pytest.fail(f"the cluster scenario failed (exit {proc.returncode}): {err[-4000:]}")
    report = _json_tail(out)
    ray, serial = report["ray"], report["serial"]
    report["overhead_ms_per_trial"] = (ray["wall_s"] - serial["wall_s"]) / serial["ran"] * 1e3
    per_node = _trials(root / "scale").node_id.value_counts()
    files = sum(1 for p in (root / "scale").rglob("*") if p.is_file())
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if terminal is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # the numbers are the point: shown even when passing
            terminal.write_line(
                f"\ncluster scale: {NODES} nodes x {CPUS_PER_NODE} CPUs on {os.cpu_count()} cores; cluster up in "
                f"{report['cluster_start_s']:.1f} s; 100,000 trials: Ray {ray['wall_s']:.1f} s (join "
                f"{ray['connect_s']:.1f} s), serial {serial['wall_s']:.1f} s, overhead "
                f"{report['overhead_ms_per_trial']:.3f} ms/trial; trials per node {per_node.min()}-{per_node.max()} "
                f"(max/min {per_node.max() / per_node.min():.2f}); {files} files; driver peak RSS {ray['peak_rss_mb']:.0f} MB; "
                f"rerun {ray['resume_s']:.2f} s ({ray['resume_cpu_s']:.2f} s CPU); node-kill study "
                f"{ray['kill']['wall_s']:.1f} s; scenario {report['scenario_s']:.0f} s")
    yield report, root
    shutil.rmtree(root, ignore_errors=True)


def _trials(folder: Path):
    import pandas as pd

    return pd.read_parquet(folder / "trials", columns=["trial_id", "status", "node_id"])


@pytest.mark.cluster
@pytest.mark.slow
def test_every_one_of_8_nodes_runs_within_1_5x_the_trials_of_any_other(scale):
    report, root = scale
    per_node = _trials(root / "scale").node_id.value_counts()
    assert set(per_node.index) == set(report["node_ids"]), per_node  # every node, and only these
    ratio = per_node.max() / per_node.min()
    assert ratio <= 1.5, f"trials per node {sorted(per_node.tolist())}: max/min {ratio:.2f}"


@pytest.mark.cluster
@pytest.mark.slow
def test_100k_trials_land_exactly_once_in_one_compacted_file_per_table(scale):
    from harness import store

    report, root = scale
    trials, serial = _trials(root / "scale"), _trials(root / "serial")
    assert report["ray"]["ran"] == 100_000 and report["ray"]["exit_code"] == 0
    assert len(trials) == 100_000 and trials.trial_id.is_unique
    assert set(trials.trial_id) == set(serial.trial_id)  # the serial run wrote the grid's 100,000 ids
    assert set(trials.status) == {"ok"}
    files = [p for p in (root / "scale").rglob("*") if p.is_file()]
    assert len(files) <= 1_000, len(files)  # the bound; compaction leaves far fewer:
    parts = {kind: len(list((root / "scale" / kind).glob("*.parquet"))) for kind in (store.TRIALS, *store.CURVES)}
    assert set(parts.values()) == {1}, parts  # some 50 flushes, merged into one part per table


@pytest.mark.cluster
@pytest.mark.slow
def test_scheduling_overhead_is_at_most_1_ms_per_trial(scale):
    # The bound: the cluster run's wall time (join included) less the serial run of the
    # same tasks, over 100,000 trials. Both run minutes apart on a machine other developers load
    # too; 1 ms per trial is 100 s of slack on a run of one to one and a half minutes. Measured
    # here: 0.37-0.66 ms as the load average of other users went from 4 to 30 (most of it is
    # starting 32 Ray workers on 2 cores, then pickling the tasks' specs and results).
    report, _ = scale
    assert report["overhead_ms_per_trial"] <= 1.0, report


@pytest.mark.cluster
@pytest.mark.slow
def test_rerunning_the_finished_100k_grid_runs_nothing_within_5_s_of_cpu(scale):
    # CPU time of the planning thread rather than wall time: the rerun is single-threaded Python,
    # so on an idle machine the two agree (2.0-2.5 s here), but the wall clock of a shared 2-core
    # machine also counts other people's work. The wall time is in the report line.
    ray = scale[0]["ray"]
    assert ray["resume_ran"] == 0 and ray["resume_skipped"] == 100_000, ray
    assert ray["resume_cpu_s"] <= 5.0, ray


@pytest.mark.cluster
@pytest.mark.slow
def test_a_node_killed_mid_run_loses_no_trial_and_fails_none(scale):
    from harness.grid import expand_grid

    report, root = scale
    victim, kill = report["victim_node_id"], report["ray"]["kill"]
    assert kill["exit_code"] == 0 and kill["statuses"] == {"ok": 10_000}, kill
    trials = _trials(root / "kill")
    assert sorted(trials.trial_id) == sorted(s.trial_id for s in expand_grid(scale_grid("kill", KILL_SWEEP)))
    # The kill must have caught work: a task that started on the victim finished elsewhere.
    started_on_victim = [m.name.split(".")[1] for m in (root / "markers").iterdir() if m.name.startswith(victim)]
    node_of = dict(zip(trials.trial_id, trials.node_id))
    rerun = [t for t in started_on_victim if node_of[t] != victim]
    assert rerun, f"no task was running on the removed node ({len(started_on_victim)} had started there)"


def _main(command: str, *args: str) -> None:
    run = {"scenario": _scenario, "serial": _child_serial, "drive": _child_drive}[command]
    print(json.dumps(run(*args)), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
