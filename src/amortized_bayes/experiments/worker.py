"""Execute one run of a results folder: ``python -m amortized_bayes.experiments.worker RUN_DIR``.

The worker sets its torch threads, marks the run running, trains with periodic checkpoints (resuming
from ``state.pt`` if an earlier attempt was interrupted), writes the run's metrics and model, and marks
it done, or failed with the error. It is the unit every executor (local processes, Ray) runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path


class DriverGone(Exception):
    """The process that launched this worker died; stop rather than run on unsupervised."""


# The exit status of a worker that found its run being trained by another process (EX_TEMPFAIL).
BUSY_EXIT = 75


def execute(run_dir: str | Path, *, threads: int = 1, checkpoint_seconds: float = 120.0,
            tensorboard_dir: str | Path | None = None, data=None, parent_pid: int | None = None) -> str:
    """Train the run in ``run_dir``; return its final state ("done", "failed", or "busy" when another
    process holds the run's lock and is training it). Never raises for a failure of the run itself:
    the error is recorded in its status and log.

    ``parent_pid``: the driver's pid. If the driver dies (killed with the grid), the worker stops at
    the next epoch boundary, so that no orphan keeps writing into the folder; a rerun resumes the run
    from its last checkpoint.
    """
    from .store import acquire_run_lock

    lock = acquire_run_lock(Path(run_dir))
    if lock is None:
        return "busy"
    try:
        return _execute_locked(Path(run_dir), threads=threads, checkpoint_seconds=checkpoint_seconds,
                               tensorboard_dir=tensorboard_dir, data=data, parent_pid=parent_pid)
    finally:
        lock.release()


def _check_training_state(run_dir: Path) -> None:
    """Set a training checkpoint that cannot be read aside, so that the run restarts from scratch
    instead of failing the same way on every retry."""
    import torch

    from .store import set_aside

    from .lifecycle import RunPaths

    path = RunPaths(run_dir).state
    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"config", "model", "family", "history"} <= set(state):
            raise ValueError("not a training state")
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
        set_aside(path, f"unreadable training state ({type(exc).__name__}); the run restarts from scratch")


def _execute_locked(run_dir: Path, *, threads: int, checkpoint_seconds: float, tensorboard_dir, data,
                    parent_pid: int | None) -> str:
    from ..checkpoint import save_fit
    from ..runtime import prepare_process
    from ..config import RunConfig
    from ..training import Checkpointing, NonFiniteLossError, fit
    from .lifecycle import RunPaths, RunState
    from .store import ResultStore, now, read_json, repair_run, write_run_outputs

    store = ResultStore(run_dir.parent.parent)
    files = RunPaths(run_dir)
    prepare_process(threads)
    config = RunConfig.from_dict(read_json(files.config))
    record = repair_run(run_dir, config)  # stale .part files, corrupt status or evals, a lost done status
    if record.done:
        return RunState.DONE.value
    _check_training_state(run_dir)
    previous = record.status
    attempts = int(previous.get("attempts", 0)) + 1
    started = time.time()
    store.update_status(run_dir, state=RunState.RUNNING, pid=os.getpid(), host=socket.gethostname(),
                        started_at=now(), attempts=attempts, threads=threads, epochs_total=config.train.epochs,
                        resumed=files.state.exists(), error=None, epochs_this_attempt=0, elapsed_seconds=0.0)
    writer = _tensorboard(tensorboard_dir, run_dir.name) if tensorboard_dir else None
    logged_steps = [0]
    first_epoch: list[int] = []  # the epoch this attempt resumed at (0 for a fresh run)

    def on_epoch(result) -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            raise DriverGone(f"the driver (pid {parent_pid}) died at epoch {result.epochs_done}")
        if not first_epoch:
            first_epoch.append(result.epochs_done - 1)
        # elapsed_seconds is this attempt's; epochs_this_attempt goes with it, so that `status` can
        # estimate the time left of a resumed run from its present pace, not from epochs it did earlier.
        store.update_status(run_dir, epochs_done=result.epochs_done, steps_done=result.steps_done,
                            train_seconds=result.history.wall_time[-1] if result.history.wall_time else 0.0,
                            elapsed_seconds=time.time() - started,
                            epochs_this_attempt=result.epochs_done - first_epoch[0], updated_at=now())
        if writer is not None:
            h = result.history
            for i in range(logged_steps[0], len(h.step)):
                writer.add_scalar("train/neg_elbo_estimate", h.neg_elbo[i], h.step[i], walltime=None)
            logged_steps[0] = len(h.step)

    def on_eval(record: dict) -> None:
        print(f"[{run_dir.name}] epoch {record['epoch']}: -ELBO {record['neg_elbo']:.6g}, "
              f"train MSE {record['train_mse']:.5f}"
              + (f", test MSE {record['test_mse']:.5f}" if "test_mse" in record else ""), flush=True)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    writer.add_scalar(f"eval/{key}", value, record["step"])

    try:
        result = fit(config, data, on_eval=on_eval, on_epoch=on_epoch,
                     checkpoint=Checkpointing(files.state, every_seconds=checkpoint_seconds))
    except DriverGone as exc:
        store.update_status(run_dir, state=RunState.FAILED, error=f"{exc}; rerun to resume", finished_at=now())
        print(f"[{run_dir.name}] stopped: {exc}", file=sys.stderr, flush=True)
        return RunState.FAILED.value
    except NonFiniteLossError as exc:
        write_run_outputs(run_dir, exc.result, final=False)
        store.update_status(run_dir, state=RunState.FAILED, error=str(exc), finished_at=now())
        print(f"[{run_dir.name}] failed: {exc}", file=sys.stderr, flush=True)
        return RunState.FAILED.value
    except Exception as exc:  # noqa: BLE001 - any error of the run is recorded, the grid goes on
        traceback.print_exc()
        store.update_status(run_dir, state=RunState.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=now())
        return RunState.FAILED.value
    finally:
        if writer is not None:
            writer.close()
    write_run_outputs(run_dir, result, final=True)
    save_fit(result, files.model)
    store.update_status(run_dir, state=RunState.DONE, finished_at=now(), epochs_done=result.epochs_done,
                        steps_done=result.steps_done, elapsed_seconds=time.time() - started,
                        train_seconds=result.history.wall_time[-1] if result.history.wall_time else 0.0)
    files.state.unlink(missing_ok=True)  # model.pt holds the result; the state is no longer needed
    return RunState.DONE.value


def _tensorboard(root, name):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError("TensorBoard logging needs the 'tensorboard' extra: "
                           "pip install 'amortized-bayes[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(Path(root) / name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run one experiment of a results folder.")
    parser.add_argument("run_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-seconds", type=float, default=120.0)
    parser.add_argument("--tensorboard", default=None)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process (the driver) is gone")
    args = parser.parse_args(argv)
    state = execute(args.run_dir, threads=args.threads, checkpoint_seconds=args.checkpoint_seconds,
                    tensorboard_dir=args.tensorboard, parent_pid=args.parent_pid)
    return {"done": 0, "busy": BUSY_EXIT}.get(state, 1)


if __name__ == "__main__":
    raise SystemExit(main())
