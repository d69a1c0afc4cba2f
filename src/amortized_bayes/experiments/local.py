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
from collections.abc import Callable

from .lifecycle import Outcome, RunState, plan_runs
from .store import ResultStore, RunRecord, now, read_json
from .worker import BUSY_EXIT


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    return max(1, cpu_count() // max(1, workers))


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
    with open(record.files.log, "a") as log:
        log.write(f"--- {now()} worker: {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code == BUSY_EXIT:  # another process holds the run: its status is that process's to write
        return Outcome(record.run_id, "busy", time.time() - start, "another process is running it")
    status = read_json(record.files.status, {}) or {}
    state = status.get("state")
    if code != 0 and state not in (RunState.DONE, RunState.FAILED):
        reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        store.update_status(record.path, state=RunState.FAILED,
                            error=f"worker {reason} (interrupted; rerun to resume)", finished_at=now())
        state = RunState.FAILED.value
        status = read_json(record.files.status, {})
    return Outcome(record.run_id, state or RunState.FAILED.value, time.time() - start, status.get("error"))


def run_local(records: list[RunRecord], store: ResultStore, *, workers: int = 1, threads: int | None = None,
              checkpoint_seconds: float = 120.0, tensorboard_dir: str | None = None,
              on_start: Callable[[RunRecord], None] | None = None,
              on_finish: Callable[[RunRecord, Outcome], None] | None = None) -> list[Outcome]:
    """Run every record not yet done, ``workers`` processes at a time."""
    threads = threads or default_threads(workers)
    plan = plan_runs(records)
    todo, outcomes = plan.todo, plan.settled()
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
