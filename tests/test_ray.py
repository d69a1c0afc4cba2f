"""The Ray executor on a real two-node cluster on loopback (a head on 127.0.0.2 and a second node on
127.0.0.3, each with one CPU, started and stopped by the test): the same stored numbers as a local
run, skip/resume as locally, and a node SIGKILLed mid-grid loses nothing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

if os.environ.get("AB_REQUIRE_RAY") != "1":
    pytest.importorskip("ray")

# One pytest-xdist worker runs all of these, so that they share one cluster (see `cluster`).
pytestmark = pytest.mark.xdist_group("ray")

GRID = """name = "raytiny"
[base.data]
n_train = 120
n_test = 30
[base.model]
latent_dim = 4
hidden = 16
[base.train]
epochs = {epochs}
batch_size = 40
eval_every = 2
[axes]
"family.name" = ["amortized", "factorized", "constant"]
"family.width" = [2, 8]
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            if marker in _cmdline(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _with_descendants(roots: list[int]) -> list[int]:
    family, frontier = set(roots), list(roots)
    parents = _parents()
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in family:
                family.add(child)
                frontier.append(child)
    return sorted(family)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LoopbackCluster:
    """Two Ray nodes on this machine, told apart by their IP addresses; stopped by killing every process
    that carries this cluster's private temp folder in its command line (never anyone else's Ray)."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="abray", dir="/tmp")  # short: Ray's socket paths are length-capped
        self.port = _free_port("127.0.0.2")
        self.address = f"127.0.0.2:{self.port}"
        ray_bin = Path(sys.executable).parent / "ray"
        self.ray = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
        # Ray >= 2.60 insists on token auth off a single node; older versions ignore these variables.
        self.driver_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        # The nodes have an empty cache of their own, no network, and MNIST in a "shared folder" (a link
        # to the driver's verified copy) that a test can take away.
        from amortized_bayes.paths import data_cache_dir

        self.shared = Path(self.temp) / "shared"
        self.shared.mkdir()
        (self.shared / "mnist").symlink_to(data_cache_dir("mnist"), target_is_directory=True)
        # RAY_worker_niceness: Ray runs its workers at nice 15, so beside the other pytest-xdist worker
        # (nice 0) on CI's two cores a task got a few % of a core and a 150-epoch run made no
        # checkpoint in 240 s (seen here: 6% CPU beside two busy processes). The nodes' workers run
        # at the tests' priority instead.
        self.env = {**self.driver_env, "AMORTIZED_BAYES_CACHE": str(Path(self.temp) / "nodecache"),
                    "AMORTIZED_BAYES_OFFLINE": "1", "AMORTIZED_BAYES_DATA": str(self.shared),
                    "RAY_worker_niceness": "0"}

    def _start(self, *args):
        proc = subprocess.run([self.ray, "start", *args, "--num-cpus=1", "--disable-usage-stats"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start(self):
        self._start("--head", "--node-ip-address=127.0.0.2", f"--port={self.port}", f"--temp-dir={self.temp}",
                    "--include-dashboard=false", f"--ray-client-server-port={_free_port('127.0.0.2')}")
        self._start(f"--address={self.address}", "--node-ip-address=127.0.0.3")
        return self

    def second_node_pids(self) -> list[int]:
        """The second node's processes (raylet, its helpers) and their descendants: the raylet's workers
        retitle themselves ("ray::execute_task"), so they are found through their parent."""
        return _with_descendants([p for p in _pids_with(self.temp) if "127.0.0.3" in _cmdline(p)])

    def stop(self):
        # With their descendants: the agents (ray::DashboardAgent, ray::RuntimeEnvAgent) retitle
        # themselves, and were left running, four per cluster, when only the temp folder was matched.
        _kill(_with_descendants(_pids_with(self.temp)))
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the tests that leave it as they found it (starting one costs ~15 s of CI's 2 cores)."""
    c = LoopbackCluster().start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for a test that kills one of its nodes."""
    c = LoopbackCluster().start()
    try:
        yield c
    finally:
        c.stop()


def _cli(*args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc


def _numbers(run_dir: Path) -> tuple:
    """Everything a run stores that is not a wall time: eval records and per-step -ELBO estimates."""
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in e.items() if "seconds" not in k and "time" not in k} for e in evals]
    steps = [line.split(",")[:3] for line in (run_dir / "steps.csv").read_text().splitlines()]
    return evals, steps


def test_ray_grid_equals_local_and_skips_finished_runs(cluster, tmp_path):
    grid = tmp_path / "grid.toml"
    # Convolutional encoder and decoder here (the other tests run the MLP through Ray): the conv
    # runs' numbers are the same on the Ray nodes as locally.
    grid.write_text(GRID.format(epochs=4).replace("hidden = 16", 'hidden = 16\narchitecture = "conv"\nchannels = 4')
                    .replace("[axes]", '[base.family]\narchitecture = "conv"\n[axes]'))
    env = cluster.driver_env
    local, remote = tmp_path / "local", tmp_path / "ray"
    proc = _cli("run", grid, "--out", local, "--workers", "1", "--threads", "1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _cli("run", grid, "--out", remote, "--executor", "ray", "--address", cluster.address, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 to run as Ray tasks" in proc.stdout
    ids = sorted(p.name for p in (local / "runs").iterdir())
    assert ids == sorted(p.name for p in (remote / "runs").iterdir()) and len(ids) == 4
    assert all("convdec" in rid for rid in ids)
    for rid in ids:
        assert _numbers(local / "runs" / rid) == _numbers(remote / "runs" / rid), rid
        status = json.loads((remote / "runs" / rid / "status.json").read_text())
        assert status["state"] == "done" and (remote / "runs" / rid / "model.pt").exists()
        assert "ray task, attempt 1" in (remote / "runs" / rid / "log.txt").read_text()
    # Both nodes did work.
    logs = " ".join((remote / "runs" / rid / "log.txt").read_text() for rid in ids)
    assert "127.0.0.2" in logs and "127.0.0.3" in logs
    # A second invocation finds everything done and touches nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (remote / "runs").rglob("*") if p.is_file()}
    proc = _cli("run", grid, "--out", remote, "--executor", "ray", "--address", cluster.address, env=env)
    assert proc.returncode == 0 and "4 already done, 0 to run" in proc.stdout, proc.stdout + proc.stderr
    assert mtimes == {p: p.stat().st_mtime_ns for p in (remote / "runs").rglob("*") if p.is_file()}
    # The report works on the Ray-filled folder as on a local one.
    assert _cli("report", remote, env=env).returncode == 0
    # A run that keeps failing (its loss overflows) is retried, then recorded as failed; the others go on.
    bad = tmp_path / "bad"
    proc = _cli("run", grid, "--out", bad, "--executor", "ray", "--address", cluster.address, "--retries", "1",
                "--set", "train.lr=1e30", "--set", "family.name=amortized,constant", "--set", "family.width=2",
                env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    states = {p.name: json.loads((p / "status.json").read_text()) for p in (bad / "runs").iterdir()}
    failed = [s for s in states.values() if s["state"] == "failed"]
    assert failed and all("after 2 attempts" in s["error"] and "nan" in s["error"].lower() for s in failed), states
    for name, status in states.items():
        log = (bad / "runs" / name / "log.txt").read_text()
        assert ("attempt 2" in log) == (status["state"] == "failed"), (name, log)


def test_nodes_without_data_fail_clearly_unless_the_driver_ships_it(cluster, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(epochs=2))
    args = ["run", grid, "--out", tmp_path / "out", "--executor", "ray", "--address", cluster.address,
            "--retries", "0", "--set", "family.name=factorized"]
    (cluster.shared / "mnist").rename(cluster.shared / "gone")  # the nodes can no longer find MNIST
    try:
        proc = _cli(*args, env=cluster.driver_env)
    finally:  # the shared cluster is given back as it was
        (cluster.shared / "gone").rename(cluster.shared / "mnist")
    assert proc.returncode == 1
    (run,) = (tmp_path / "out" / "runs").iterdir()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "mnist" in status["error"].lower(), status
    proc = _cli(*args, "--ship-data", env=cluster.driver_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "done"


def test_killing_a_worker_node_mid_grid_loses_no_run(own_cluster, tmp_path):
    cluster = own_cluster
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(epochs=60))
    out = tmp_path / "ray"
    driver = subprocess.Popen([sys.executable, "-m", "amortized_bayes", "run", str(grid), "--out", str(out),
                               "--executor", "ray", "--address", cluster.address],
                              env=cluster.driver_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait until the second node is executing a run, then kill that node outright.
        deadline = time.time() + 180
        while time.time() < deadline:
            if any("ray::execute_task" in _cmdline(p) for p in cluster.second_node_pids()):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the second node never ran a task")
        _kill(cluster.second_node_pids())
        stdout, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stdout
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4
    for run in runs:
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "done", (run.name, status)
        evals = (run / "evals.jsonl").read_text().splitlines()
        epochs = [json.loads(e)["epoch"] for e in evals]
        assert len(epochs) == len(set(epochs))  # each eval stored once
        # Complete: every run trained all 60 epochs, whichever node it finished on.
        assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] == 60
        assert status["epochs_done"] == 60
        assert len((run / "steps.csv").read_text().splitlines()) == 1 + status["steps_done"]
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4 and all(",done," in line for line in summary[1:])


def test_a_killed_driver_resumes_from_the_checkpoints_its_tasks_streamed_back(cluster, tmp_path):
    """Checkpoints reach the driver's store while a task runs; after the driver is SIGKILLed, a new
    driver resumes the run from there and ends with the numbers of an uninterrupted local run."""
    grid = tmp_path / "grid.toml"
    # The run must outlast the way of its first checkpoint to the driver's store (saved after 0.5 s,
    # forwarded within 1 s, drained within 2 s): at 150 epochs it trained for 0.5 s, and CI once saw
    # it finish before any checkpoint had arrived. 2,000 epochs train for ~6 s here (the test takes
    # 35 s, 18 s before); an evaluation every 250 keeps F-VI's test-time inference from dominating.
    grid.write_text(GRID.format(epochs=2000))
    args = ["run", str(grid), "--set", "family.name=factorized", "--set", "train.eval_every=250",
            "--checkpoint-every", "0.5"]
    out = tmp_path / "ray"
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "amortized_bayes", *args, "--out", str(out),
                                   "--executor", "ray", "--address", cluster.address], env=cluster.driver_env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            states = list(out.glob("runs/*/state.pt"))
            if states and json.loads((states[0].parent / "status.json").read_text()).get("epochs_done", 0) >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no checkpoint reached the driver's store (driver exit code {driver.poll()}):\n"
                        + driver_log.read_text())
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    (run,) = (out / "runs").iterdir()
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # as the killed driver left it
    proc = _cli(*args, "--out", out, "--executor", "ray", "--address", cluster.address, env=cluster.driver_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["resumed"] is True, status
    assert not (run / "state.pt").exists()
    local = tmp_path / "local"
    assert _cli(*args, "--out", local, "--threads", "1", env=cluster.driver_env).returncode == 0
    assert _numbers(run) == _numbers(local / "runs" / run.name)


def _listening_addresses(pids: set[int]) -> dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The local addresses of the TCP sockets on which each of ``pids`` listens, read from /proc."""
    inode_owner = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inode_owner[link[8:-1]] = pid
    out: dict[int, list] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inode_owner:  # 0A: LISTEN
                continue
            hexaddr = local.split(":")[0]
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, width, 8))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            out.setdefault(inode_owner[inode], []).append(address)
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux's /proc")
def test_a_private_ray_instance_listens_on_loopback_only(tmp_path):
    """Without --address the driver starts its own Ray; none of its servers (GCS, raylet, workers) may
    listen beyond loopback. Ray's Linux default listens on every interface."""
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(epochs=40))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    driver = subprocess.Popen([sys.executable, "-m", "amortized_bayes", "run", str(grid), "--out",
                               str(tmp_path / "out"), "--set", "family.name=factorized", "--executor", "ray"],
                              env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, set] = {}
    names: dict[int, str] = {}
    family: set[int] = {driver.pid}
    try:
        while driver.poll() is None:
            parents = _parents()
            grown = True
            while grown:
                new = {child for child, parent in parents.items() if parent in family} - family
                family |= new
                grown = bool(new)
            for pid, addresses in _listening_addresses(family).items():
                seen.setdefault(pid, set()).update(addresses)
                names.setdefault(pid, _cmdline(pid).split("\0")[0].rsplit("/", 1)[-1])
            time.sleep(0.05)
        output = driver.stdout.read()
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill(sorted(family - {os.getpid()}))
    assert driver.returncode == 0, output
    servers = set(names.values())
    assert any("gcs_server" in s for s in servers) and any("raylet" in s for s in servers), (servers, output)
    beyond = {names[pid]: sorted(map(str, a)) for pid, a in seen.items() if not all(x.is_loopback for x in a)}
    assert not beyond, beyond
    (run,) = (tmp_path / "out" / "runs").iterdir()
    assert json.loads((run / "status.json").read_text())["state"] == "done"
