"""Run a grid on a Ray cluster: each run is one Ray task, the results folder stays on the driver.

A task executes a run with :func:`worker.execute` in a scratch results folder on whichever node Ray
places it, then returns the run's files (metrics, model, log, and its training state when it did not
finish); the driver writes them into the store as runs finish, so the folder looks exactly as after a
local run and ``report``/``gap``/``status`` work unchanged. Nodes need no shared filesystem.

Failures: one retry policy, the driver's. Ray does not retry tasks itself (``max_retries=0``: its
retry would restart from the state the task was submitted with); a task lost with its node or its
worker process, and a run that fails (an error, a NaN), are resubmitted by the driver from the newest
training state in the store, up to ``retries`` more attempts, then recorded as failed while the grid
goes on. A checkpoint is written into the store only if it is at least as far along as the one there,
so a late message from an old attempt cannot move a run backwards.
Finished runs are on the driver's disk as soon as their task returns, so losing a node later loses none;
while a run trains, its checkpoints are forwarded to the driver's store (through a small actor on the
driver's node), so a run resumes from its last checkpoint after its driver is killed, as locally.

Data: by default each task loads its data through the data layer on its node, which fetches and
verifies into that node's cache (or reads a shared folder set with ``AMORTIZED_BAYES_DATA``);
with ``ship_data`` the driver loads each distinct dataset once and ships the arrays through Ray's
object store, for nodes that cannot fetch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable

from ..data.atomic import atomic_write_bytes
from .lifecycle import Outcome, RunPaths, RunState, plan_runs
from .store import ResultStore, RunRecord, acquire_run_lock, now, read_json

# What a task sends back: everything a local worker leaves in a run's folder.
RUN_FILES = ("status.json", "steps.csv", "evals.jsonl", "mse_trace.jsonl", "summary.json", "model.pt", "state.pt",
             "log.txt")


class RayUnavailable(RuntimeError):
    pass


# Ray's local-only mode (its default on macOS and Windows): every server of the instance (GCS, raylet,
# workers, runtime-env agent) binds to 127.0.0.1. Linux's default binds them to all interfaces (seen with
# `ss -ltnp`, Ray 2.60: GCS, raylet and workers on *:port), and `_node_ip_address="127.0.0.1"` does not
# help: Ray replaces a loopback node address by the host's own address. Read once, when ray is imported.
_RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(*, private_instance: bool = False):
    """Import ray, or raise :class:`RayUnavailable`. With ``private_instance`` (no ``--address``: this
    process will start its own Ray), Ray is put in its local-only mode first, so that the instance
    listens on loopback only; a user who set the variable keeps their value."""
    if private_instance and "ray" not in sys.modules:
        os.environ.setdefault(_RAY_LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("--executor ray needs Ray: pip install 'amortized-bayes[ray]'") from exc
    return ray


class _CheckpointForwarder(threading.Thread):
    """Inside a task: sends each new training checkpoint (and the status beside it) of the scratch run
    folder to the driver's :class:`CheckpointSink`, so that a run whose task is lost, or whose driver
    is killed, resumes from its last checkpoint, as a local run does."""

    def __init__(self, run_dir: Path, sink, run_id: str, period: float = 1.0):
        super().__init__(daemon=True)
        self.run_dir, self.sink, self.run_id, self.period = run_dir, sink, run_id, period
        self.done = threading.Event()

    def run(self) -> None:
        seen = None
        while not self.done.wait(self.period):
            files = RunPaths(self.run_dir)
            path = files.state
            try:
                stamp = path.stat().st_mtime_ns
                if stamp == seen:
                    continue
                state, status = path.read_bytes(), files.status.read_bytes()
            except OSError:
                continue  # not written yet, or replaced while reading: next time
            seen = stamp
            try:
                self.sink.put.remote(self.run_id, state, status)
            except Exception:  # noqa: BLE001 - forwarding is best effort; the run goes on
                pass


class CheckpointSink:
    """A Ray actor on the driver's node holding the latest checkpoint of each running run until the
    driver writes it into the store."""

    def __init__(self):
        self.latest: dict[str, tuple[bytes, bytes]] = {}

    def put(self, run_id: str, state: bytes, status: bytes) -> None:
        self.latest[run_id] = (state, status)

    def drain(self) -> dict[str, tuple[bytes, bytes]]:
        out, self.latest = self.latest, {}
        return out


def execute_task(config: dict, status: dict, state: bytes | None, data, threads: int,
                 checkpoint_seconds: float, sink=None) -> dict:
    """The body of one Ray task (also callable directly): run ``config`` in a scratch results folder,
    starting from ``state`` (a training checkpoint) when given, forwarding checkpoints to ``sink``
    (a :class:`CheckpointSink` actor) when given, and return the run's files."""
    from ..config import RunConfig
    from .store import write_json
    from .worker import execute

    with tempfile.TemporaryDirectory(prefix="amortized-bayes-task-") as tmp:
        store = ResultStore(tmp)
        record = store.plan(RunConfig.from_dict(config))
        write_json(record.files.status, {k: v for k, v in status.items() if k != "state"})
        if state is not None:
            atomic_write_bytes(record.files.state, state)
        forwarder = _CheckpointForwarder(record.path, sink, record.run_id) if sink is not None else None
        if forwarder is not None:
            forwarder.start()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                final = execute(record.path, threads=threads, checkpoint_seconds=checkpoint_seconds, data=data)
        finally:
            if forwarder is not None:
                forwarder.done.set()
                forwarder.join()
        (record.path / "log.txt").write_text(log.getvalue())
        files = {name: (record.path / name).read_bytes() for name in RUN_FILES if (record.path / name).exists()}
    return {"state": final, "host": socket.gethostname(), "node": _node_ip(), "pid": os.getpid(), "files": files}


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - only a label for the log
        return None


def _progress(status: bytes | dict | None) -> int:
    """Steps done according to a status (JSON bytes or a dict); 0 when unknown."""
    try:
        value = json.loads(status) if isinstance(status, (bytes, str)) else (status or {})
        return int(value.get("steps_done") or 0)
    except (ValueError, TypeError, AttributeError):
        return 0


def _write_back(record: RunRecord, result: dict, attempt_log: str) -> None:
    """Store a task's files in the driver's run folder; the log is appended, not replaced. An
    unfinished task's checkpoint older than the stored one is not written."""
    files = dict(result["files"])
    log = files.pop("log.txt", b"")
    if "state.pt" not in files:
        record.files.state.unlink(missing_ok=True)
    elif _progress(files.get("status.json")) < _progress(read_json(record.files.status, {})):
        files.pop("state.pt")
        files.pop("status.json", None)
    for name, data in files.items():
        atomic_write_bytes(record.path / name, data)
    with open(record.path / "log.txt", "ab") as f:
        f.write(attempt_log.encode() + log)


def _make_sink(ray):
    """The checkpoint sink, placed on the driver's node when the driver is on one (else anywhere)."""
    actor = ray.remote(num_cpus=0)(CheckpointSink)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True))
    except Exception:  # noqa: BLE001 - placement is an optimisation only
        pass
    return actor.remote()


def _store_checkpoints(ray, sink, records: dict[str, RunRecord], running: set[str]) -> None:
    """Write the checkpoints forwarded since the last call into the store (runs still in flight only)."""
    try:
        latest = ray.get(sink.drain.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a lost sink costs resumability, not results
        return
    for run_id, (state, status) in latest.items():
        if run_id in running and run_id in records:
            path = records[run_id].path
            if _progress(status) < _progress(read_json(RunPaths(path).status, {})):
                continue  # an older attempt's checkpoint arriving late: never move a run backwards
            atomic_write_bytes(RunPaths(path).state, state)
            progress = {k: v for k, v in json.loads(status).items() if k in ("epochs_done", "steps_done",
                                                                               "train_seconds", "updated_at")}
            ResultStore(path.parent.parent).update_status(path, **progress)


def run_ray(records: list[RunRecord], store: ResultStore, *, address: str | None = None, threads: int = 1,
            gpus: float = 0.0, checkpoint_seconds: float = 120.0, retries: int = 2, ship_data: bool = False,
            on_start: Callable[[RunRecord], None] | None = None,
            on_finish: Callable[[RunRecord, Outcome], None] | None = None) -> list[Outcome]:
    """Run every record not yet done as a Ray task with ``threads`` CPUs (and ``gpus`` GPUs) each.

    ``address``: the cluster to join ("auto", "HOST:PORT", "ray://HOST:PORT"); None starts a private
    local Ray instance (or uses the one this process has already initialised)."""
    ray = import_ray(private_instance=address is None)
    from ..config import RunConfig

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 configure_logging=True)
    task = ray.remote(execute_task).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    sink = _make_sink(ray)
    plan = plan_runs(records)
    todo, outcomes = list(plan.todo), plan.settled()
    shipped: dict[str, object] = {}

    def data_for(record: RunRecord):
        if not ship_data:
            return None
        from ..training import load_training_data

        key = repr(record.config.data)
        if key not in shipped:
            shipped[key] = ray.put(load_training_data(record.config))
        return shipped[key]

    pending: dict = {}
    started: dict[str, float] = {}
    attempts: dict[str, int] = {}
    # The driver holds each run's lock while its task is in flight, as a local worker does, so that a
    # concurrent `run` on the same folder leaves the run alone.
    locks = {}
    for record in list(todo):
        lock = acquire_run_lock(record.path, patience=0.5)
        if lock is None:
            todo.remove(record)
            outcomes.append(Outcome(record.run_id, "busy", 0.0, "another process is running it"))
        else:
            locks[record.run_id] = lock

    def submit(record: RunRecord) -> None:
        attempts[record.run_id] = attempts.get(record.run_id, 0) + 1
        status = store.update_status(record.path, state=RunState.RUNNING, executor="ray", host=socket.gethostname(),
                                     pid=os.getpid(), started_at=now(), error=None)
        state_path = record.files.state
        state = state_path.read_bytes() if state_path.exists() else None
        ref = task.remote(RunConfig.to_dict(record.config), status, state, data_for(record), threads,
                          checkpoint_seconds, sink)
        pending[ref] = record
        started.setdefault(record.run_id, time.time())

    for record in todo:
        if on_start:
            on_start(record)
        submit(record)
    by_id = {r.run_id: r for r in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        _store_checkpoints(ray, sink, by_id, {r.run_id for r in pending.values()})
        if not ready:
            continue
        record = pending.pop(ready[0])
        attempt = attempts[record.run_id]
        header = f"--- {now()} ray task, attempt {attempt}"
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            # Lost beyond Ray's own retries, or an error outside the run (the run's own errors are
            # recorded by execute, which does not raise).
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            with open(record.path / "log.txt", "a") as f:
                f.write(f"{header}: {message}\n")
            result = {"state": "failed", "error": message}
        else:
            where = result["host"] + (f" node {result['node']}" if result.get("node") else "")
            _write_back(record, result, f"{header} on {where} (pid {result['pid']})\n")
        if result["state"] != "done" and attempt <= retries:
            submit(record)
            continue
        error = None
        if result["state"] != "done":
            status = read_json(record.path / "status.json", {}) or {}
            error = f"{result.get('error') or status.get('error') or 'the run failed'} (after {attempt} attempts)"
            store.update_status(record.path, state=RunState.FAILED, error=error, finished_at=now())
        outcome = Outcome(record.run_id, result["state"], time.time() - started[record.run_id], error)
        locks.pop(record.run_id).release()
        store.write_summary_table()
        if on_finish:
            on_finish(record, outcome)
        outcomes.append(outcome)
    return outcomes
