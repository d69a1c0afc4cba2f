"""Run a grid on this machine: each run in its own worker process, ``workers`` at a time.

A process per run keeps runs independent: a run that crashes or is killed affects nothing else, is
recorded as failed (its checkpoint stays), and the grid goes on. Each worker gets ``threads`` torch
threads, chosen so that workers x threads does not exceed the cores (oversubscription is the main speed
hazard on small machines).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from collections.abc import Callable

from .store import ResultStore, RunRecord, now, read_json
from .worker import BUSY_EXIT


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    return max(1, cpu_count() // max(1, workers))


@dataclass
class Outcome:
    run_id: str
    state: str  # done, failed, skipped
    seconds: float
    error: str | None = None


def run_worker_process(record: RunRecord, store: ResultStore, *, threads: int, checkpoint_seconds: float,
                       tensorboard_dir: str | None) -> Outcome:
    """Run one record in a fresh Python process; its output goes to the run's log.txt."""
    cmd = [sys.executable, "-m", "amortized_bayes.experiments.worker", str(record.path),
           "--threads", str(threads), "--checkpoint-seconds", str(checkpoint_seconds),
           "--parent-pid", str(os.getpid())]
    if tensorboard_dir:
        cmd += ["--tensorboard", str(tensorboard_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    start = time.time()
    with open(record.path / "log.txt", "a") as log:
        log.write(f"--- {now()} worker: {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code == BUSY_EXIT:  # another process holds the run: its status is that process's to write
        return Outcome(record.run_id, "busy", time.time() - start, "another process is running it")
    status = read_json(record.path / "status.json", {}) or {}
    state = status.get("state")
    if code != 0 and state not in ("done", "failed"):
        reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        store.update_status(record.path, state="failed", error=f"worker {reason} (interrupted; rerun to resume)",
                            finished_at=now())
        state = "failed"
        status = read_json(record.path / "status.json", {})
    return Outcome(record.run_id, state or "failed", time.time() - start, status.get("error"))


def run_local(records: list[RunRecord], store: ResultStore, *, workers: int = 1, threads: int | None = None,
              checkpoint_seconds: float = 120.0, tensorboard_dir: str | None = None,
              on_start: Callable[[RunRecord], None] | None = None,
              on_finish: Callable[[RunRecord, Outcome], None] | None = None) -> list[Outcome]:
    """Run every record not yet done, ``workers`` processes at a time."""
    threads = threads or default_threads(workers)
    # A run whose lock is held (a worker of another `run`, or one left by a driver that was killed and
    # has not yet reached its next epoch boundary) is not started here; if its owner takes the lock
    # between this check and our worker's start, our worker exits as busy.
    busy = {r.run_id for r in records if r.alive}
    todo = [r for r in records if r.state != "done" and r.run_id not in busy]
    outcomes = [Outcome(r.run_id, "skipped", 0.0) for r in records if r.state == "done"]
    outcomes += [Outcome(r.run_id, "busy", 0.0, "a live worker is already running it") for r in records
                 if r.run_id in busy]
    lock = threading.Lock()

    def one(record: RunRecord) -> Outcome:
        if on_start:
            with lock:
                on_start(record)
        outcome = run_worker_process(record, store, threads=threads, checkpoint_seconds=checkpoint_seconds,
                                     tensorboard_dir=tensorboard_dir)
        with lock:
            store.write_summary_table()
            if on_finish:
                on_finish(record, outcome)
        return outcome

    if workers <= 1:
        for record in todo:
            outcomes.append(one(record))
        return outcomes
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, record) for record in todo]
        for future in as_completed(futures):
            outcomes.append(future.result())
    return outcomes
