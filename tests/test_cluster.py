"""The harness on a real multi-node Ray cluster on this machine, as a user meets one.

The cluster is `ray start --head` plus two `ray start --address=...` worker nodes, each a
process tree this module starts and stops itself (never `ray stop`, which would take down every
Ray on the machine). Token authentication stays on, as Ray ships it: every process gets
RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN, and HOME points at a scratch folder so the
user's ~/.ray/auth_token is neither read nor written. Dashboards listen on 127.0.0.1.

Run as a script, this file is the driver of the node-failure test (see `_drive_sleepy_run`).
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
import psutil  # noqa: E402 - ships with Ray (ray/thirdparty_files), on the path once ray is imported

from fakes import instant_work  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")
STARTED = "Ray runtime started"
NODE_START_S = 120      # a loaded 2-core machine has taken 30 s to bring a head up
SLEEP_S = 3.0           # per trial in the node-failure test: long enough to be caught in flight

TINY = """\
name: tiny
train: {{epochs: {epochs}}}
sweep:
  batch_size: {batch_sizes}
  learning_rate: [0.05]
  seed: [0]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Node:
    """One `ray start --block` process and everything it spawns (raylet, agents, workers)."""

    name: str
    proc: subprocess.Popen
    log: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def tree(self) -> list[psutil.Process]:
        """Live processes of this node; remembered, so a worker orphaned later is still ours."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        return [p for p in self.seen.values() if _alive(p)]

    def kill(self) -> None:
        """The node dies at once, as a machine losing power would: SIGKILL to every process."""
        for p in self.tree():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(lines[-3:]) or f"no output (exit code {self.proc.poll()})"


@dataclass
class LocalCluster:
    root: Path
    env: dict[str, str]
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    client_port: int = field(default_factory=_free_port)
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def launch(self, name: str, head: bool = False) -> Node:
        # Ports a second Ray on this machine would otherwise share (the agent's 52365 above all).
        args = [str(RAY_CLI), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                f"--temp-dir={self.root / name}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        if head:
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}"]
        else:
            args += [f"--address={self.address}"]
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        node = self.nodes[name] = Node(name, proc, log)
        return node

    def wait_gcs(self, head: Node, t0: float) -> None:
        while time.monotonic() - t0 < NODE_START_S and head.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"Ray could not start a head node here: {head.tail()}")

    def wait_started(self, node: Node, t0: float) -> None:
        while time.monotonic() - t0 < NODE_START_S:
            if STARTED in node.log.read_text(errors="replace"):
                node.tree()
                return
            if node.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"Ray could not start node '{node.name}' here: {node.tail()}")

    def shutdown(self) -> None:
        """A clean stop of every node at once: SIGTERM to each `ray start --block` (it stops its
        own processes), then SIGKILL whatever of ours is left. Nobody else's Ray is touched."""
        nodes = list(self.nodes.values())
        procs = [p for node in nodes for p in node.tree()]
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        psutil.wait_procs(procs, timeout=15)
        for node in nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, one CPU each. The node-failure test kills 'victim'."""
    # Short root: Ray's Unix socket paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="harness-ray-"))
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), HOME=str(home),
               PATH=f"{RAY_CLI.parent}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               RAY_USAGE_STATS_ENABLED="0")
    c = LocalCluster(root=root, env=env)
    try:
        t0 = time.monotonic()
        head = c.launch("head", head=True)
        c.wait_gcs(head, t0)  # workers can join as soon as the GCS answers; the rest overlaps
        nodes = [head, c.launch("worker"), c.launch("victim")]
        for node in nodes:
            c.wait_started(node, t0)
    except (RuntimeError, OSError) as exc:  # a cluster that will not start is a failure, never a skip
        c.shutdown()
        pytest.fail(f"the local Ray cluster did not start: {exc}")
    except BaseException:
        c.shutdown()
        raise
    yield c
    c.shutdown()


def _grid(folder: Path, epochs: int, batch_sizes: list[int]) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(epochs=epochs, batch_sizes=batch_sizes))
    return path


def _trial_ids(grid_path: Path) -> list[str]:
    from harness.config import load_grid
    from harness.grid import expand_grid

    return sorted(s.trial_id for s in expand_grid(load_grid(grid_path)))


def harness_run(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.run", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.mark.cluster
def test_a_grid_through_a_ray_client_address_trains_on_several_nodes(cluster, tmp_path):
    grid = _grid(tmp_path, epochs=2, batch_sizes=[50, 250, 500])
    out = tmp_path / "shared" / "tiny"
    # A laptop-style driver: Ray Client, the code shipped as py_modules, results to a file:// URI.
    proc = harness_run(cluster.env, grid, "--address", cluster.client_address, "--results", out.as_uri(),
                       "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 trials run (3 ok, 0 diverged, 0 failed)" in proc.stdout
    trials = pd.read_parquet(out / "trials")
    assert sorted(trials.trial_id) == _trial_ids(grid)  # every trial, exactly once
    assert set(trials.status) == {"ok"} and trials.test_accuracy.notna().all()
    assert trials.node_id.str.len().min() > 10 and trials.node_id.nunique() >= 2, trials.node_id
    assert len(pd.read_parquet(out / "epochs")) == 3 * 2


@pytest.mark.cluster
def test_ray_job_submit_ships_the_code_and_writes_where_the_driver_runs(cluster, tmp_path):
    # The working dir holds the code and the grid: the job finds both only if Ray shipped them.
    workdir = tmp_path / "job"
    shutil.copytree(REPO / "harness", workdir / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    grid = _grid(workdir, epochs=1, batch_sizes=[100, 500])
    out = tmp_path / "on-the-head" / "tiny"  # the job's driver runs on the head node: this machine
    proc = subprocess.run(
        [str(RAY_CLI), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(workdir),
         "--", sys.executable, "-m", "harness.run", grid.name, "--results", str(out), "--quiet"],
        capture_output=True, text=True, env=cluster.env, timeout=300)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 trials run (2 ok, 0 diverged, 0 failed)" in proc.stdout
    trials = pd.read_parquet(out / "trials")
    assert sorted(trials.trial_id) == _trial_ids(grid) and set(trials.status) == {"ok"}
    assert trials.node_id.str.len().min() > 10


@pytest.mark.cluster
def test_a_driver_without_the_token_is_told_what_to_set(cluster, tmp_path):
    env = {**cluster.env, "RAY_gcs_server_port_wait_time_s": "2"}  # Ray retries for 20 s by default
    env.pop("RAY_AUTH_MODE")
    proc = harness_run(env, _grid(tmp_path, 1, [500]), "--address", cluster.address,
                       "--results", tmp_path / "out", "--quiet", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "wants token authentication" in last and "RAY_AUTH_MODE=token" in last, proc.stderr[-2000:]
    assert "disabled" not in last  # the way out is the token, never switching it off


@pytest.mark.cluster
def test_a_node_killed_mid_run_has_its_trials_retried_elsewhere(cluster, tmp_path):
    victim = cluster.nodes["victim"]
    markers, out = tmp_path / "started", tmp_path / "out"
    markers.mkdir()
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen([sys.executable, __file__, cluster.address, str(out), str(markers)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=cluster.env)
    try:
        hit = _wait_for_trial_on(victim, markers, driver, log)
        victim.kill()
        assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    trial_id, victim_node = hit
    trials = pd.read_parquet(out / "trials")
    assert len(trials) == 6 and trials.trial_id.nunique() == 6  # every trial, exactly once
    assert set(trials.status) == {"ok"}, trials[["status", "error"]]
    rerun = trials.set_index("trial_id").loc[trial_id]
    assert rerun.node_id != victim_node  # the trial in flight on the dead node ran elsewhere
    assert victim_node not in set(trials.node_id)
    assert len(pd.read_parquet(out / "epochs")) == 6


def _wait_for_trial_on(node: Node, markers: Path, driver: subprocess.Popen, log: Path) -> tuple[str, str]:
    """(trial id, node id) of the first trial that starts in a worker of ``node``."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pids = {p.pid for p in node.tree()}
        for marker in markers.iterdir():
            trial_id, pid, node_id = marker.name.split(".")
            if int(pid) in pids:
                return trial_id, node_id
        if driver.poll() is not None:
            pytest.fail(f"the driver ended before a trial ran on {node.name}: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no trial started on node '{node.name}' within 180 s: {log.read_text()[-3000:]}")


def test_results_uri_other_than_a_local_file_is_refused_in_one_line(tmp_path):
    grid = _grid(tmp_path, 1, [500])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = harness_run(env, grid, "--results", "s3://bucket/results", "--dry-run", timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mount it" in lines[0], proc.stderr


# --- the node-failure test's driver, run as `python tests/test_cluster.py ADDRESS RESULTS MARKERS` ---

def sleepy_work(group, marker_dir: str):
    """instant_work after a pause, leaving a marker as each group starts (trial id, worker pid,
    node id) so the test can tell which trials are in flight where. Markers go to a folder of
    this machine: test instrumentation only; the harness itself never shares a disk."""
    node_id = ray.get_runtime_context().get_node_id()
    for spec in group:
        (Path(marker_dir) / f"{spec.trial_id}.{os.getpid()}.{node_id}").touch()
    time.sleep(SLEEP_S)
    return instant_work(group)


def _drive_sleepy_run(address: str, results: str, marker_dir: str) -> int:
    import fakes
    from ray import cloudpickle

    from harness.config import parse_grid
    from harness.driver import run_study
    from harness.scheduler import RayBackend

    cloudpickle.register_pickle_by_value(fakes)  # workers cannot import tests/ by name
    grid = parse_grid({"name": "sleepy", "train": {"epochs": 1},
                       "sweep": {"batch_size": [10, 20, 50, 100, 250, 500], "learning_rate": [0.05],
                                 "seed": [0]}}, "sleepy.yaml")
    backend = RayBackend(address=address, work=functools.partial(sleepy_work, marker_dir=marker_dir))
    summary = run_study(grid, Path(results), backend, progress=False)
    print(summary.describe(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(_drive_sleepy_run(*sys.argv[1:]))
