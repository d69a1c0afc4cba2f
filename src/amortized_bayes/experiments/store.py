"""The result store (SPEC §6): one folder per run, atomic writes, an aggregate table over all runs.

Layout of a results folder::

    OUT/grid.json                   the grid as last run (name, base, axes, variants, tolerance)
    OUT/summary.csv                 one row per run: state, config essentials, final metrics
    OUT/runs/<run_id>/config.json   the run's canonical RunConfig
    OUT/runs/<run_id>/status.json   state (pending/running/done/failed), progress, times, error
    OUT/runs/<run_id>/steps.csv     per step: step, epoch, neg_elbo, wall_time
    OUT/runs/<run_id>/evals.jsonl   per evaluation: every metric of SPEC §4
    OUT/runs/<run_id>/mse_trace.jsonl  train MSE every train.mse_every epochs (when > 0)
    OUT/runs/<run_id>/summary.json  final metrics, time per step, versions and machine
    OUT/runs/<run_id>/state.pt      training checkpoint (resume); model.pt: the fitted model
    OUT/runs/<run_id>/log.txt       the worker's output
    OUT/runs/<run_id>/.lock         held (flock) by the one process that trains the run
    OUT/.lock                       held while the folder's shared files (summary.csv, grid.json) change

What the store guarantees (docs/store.md says it for users):

* one owner per run: a worker trains a run only while it holds the run's lock, so concurrent ``run``
  commands on one folder train each run once; liveness is the lock, not a pid or a host name;
* a run is done when its outputs say so: a complete summary.json and a readable evals.jsonl, with
  model.pt or a status that says done; a lost or truncated status.json does not retrain a finished
  run, and a done status over incomplete outputs does not make a run done;
* a corrupt status.json, state.pt, config.json or evals.jsonl is moved aside as ``*.corrupt`` with a
  note in the run's log, and the run is redone (from its last good state when there is one);
* every file is written atomically (a reader sees the old or the new file, never a part), and the
  temporary ``.*.part`` files a killed writer leaves are removed at the next start.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.atomic import atomic_write_text
from .grid import canonical, describe_run, run_id
from .lifecycle import RunPaths, RunState, check_transition, parse_state

SUMMARY_COLUMNS = [
    "run_id", "state", "dataset", "family", "width", "depth", "objective", "estimator", "local_terms",
    "seed", "n_train", "epochs_done", "steps", "train_seconds", "seconds_per_step", "neg_elbo",
    "neg_elbo_per_image", "test_neg_elbo_per_image", "train_mse", "test_mse", "kl_z_per_image", "active_units",
    "test_inference_seconds", "error",
]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


LOCK_NAME = ".lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock``: held by the one process that works
    on a run (or, blocking, on a results folder's shared files). The kernel releases it when its
    holder dies, however it dies, so a lock never outlives its process on a local file system."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, blocking: bool = False) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def is_locked(folder: Path) -> bool:
    """Whether some process holds ``folder``'s lock (probed without keeping it)."""
    if not (Path(folder) / LOCK_NAME).exists():
        return False
    probe = RunLock(folder)
    try:
        if probe.acquire():
            probe.release()
            return False
    except OSError:  # a read-only copy of a results folder: nobody can be training in it
        return False
    return True


def acquire_run_lock(folder: Path, patience: float = 2.0) -> RunLock | None:
    """The run's lock, or None when another process holds it. Retries for ``patience`` seconds, since
    a reader probing the lock (:func:`is_locked`) holds it for a moment."""
    lock = RunLock(folder)
    deadline = time.monotonic() + patience
    while not lock.acquire():
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
    return lock


def _readable_jsonl(path: Path) -> bool:
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                json.loads(line)
    except (OSError, ValueError):
        return False
    return True


def outputs_complete(path: Path) -> bool:
    """Whether a run's folder holds the outputs of a finished run: summary.json written at the end
    (``complete``), a readable evals.jsonl, and steps.csv."""
    files = RunPaths(path)
    summary = read_json(files.summary)
    return (isinstance(summary, dict) and summary.get("complete") is True and files.steps.exists()
            and files.evals.exists() and _readable_jsonl(files.evals))


def read_status(path: Path) -> tuple[dict, bool]:
    """A run's status.json and whether it was readable (a missing file is readable: a new run)."""
    target = RunPaths(path).status
    if not target.exists():
        return {}, True
    value = read_json(target)
    return (value, True) if isinstance(value, dict) else ({}, False)


def set_aside(path: Path, reason: str) -> Path:
    """Move a corrupt file to ``<name>.corrupt`` (replacing an older one) and note it in the run's log."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    with open(path.parent / "log.txt", "a") as log:
        log.write(f"--- {now()} {path.name} set aside as {target.name}: {reason}\n")
    return target


def remove_stale_parts(folder: Path) -> list[Path]:
    """Remove the temporary ``.*.part`` files of atomic writes in ``folder`` (not recursive): left by a
    writer that was killed between writing and renaming. Call only while holding the folder's lock."""
    removed = []
    for part in Path(folder).glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            removed.append(part)
    return removed


@dataclass
class RunRecord:
    """What the store knows of one run. ``status`` is status.json as read; ``done`` is decided from
    the outputs (:func:`outputs_complete`), not from the status alone."""

    run_id: str
    path: Path
    config: RunConfig
    status: dict
    done: bool = False

    @property
    def files(self) -> RunPaths:
        return RunPaths(self.path)

    @property
    def state(self) -> RunState:
        if self.done:
            return RunState.DONE
        state = parse_state(self.status.get("state"))
        return RunState.PENDING if state == RunState.DONE else state  # a done status over incomplete outputs

    @property
    def alive(self) -> bool:
        """Whether a process holds the run's lock, i.e. is training it now (on this machine or on any
        machine sharing the folder's file system)."""
        return is_locked(self.path)

    @property
    def display_state(self) -> str:
        if self.done:
            return RunState.DONE.value
        if self.alive:
            return RunState.RUNNING.value
        if self.state == RunState.RUNNING or self.files.state.exists():
            return "interrupted"
        return self.state.value


def inspect_run(path: Path, config: RunConfig) -> RunRecord:
    """A :class:`RunRecord` of the folder, read only."""
    status, _ = read_status(path)
    done = outputs_complete(path) and (status.get("state") == RunState.DONE or RunPaths(path).model.exists())
    return RunRecord(path.name, path, config, status, done)


def repair_run(path: Path, config: RunConfig) -> RunRecord:
    """Inspect a run and repair what is broken: a corrupt status.json or evals.jsonl is set aside, a
    finished run's lost status is rewritten, a done status over incomplete outputs is reset to pending,
    and stale ``.part`` files are removed. Call only while holding the run's lock."""
    files = RunPaths(path)
    remove_stale_parts(path)
    status, readable = read_status(path)
    if not readable:
        set_aside(files.status, "not valid JSON")
    if files.evals.exists() and not _readable_jsonl(files.evals):
        set_aside(files.evals, "not valid JSON lines")
        with contextlib.suppress(FileNotFoundError):
            files.summary.unlink()  # describes the evaluations just set aside
    record = inspect_run(path, config)
    if record.done and status.get("state") != RunState.DONE:
        status = {**status, "state": check_transition(status.get("state"), RunState.DONE).value,
                  "label": describe_run(config), "error": None,
                  "note": "status rewritten from the run's complete outputs"}
        write_json(files.status, status)
    elif not record.done and (status.get("state") == RunState.DONE or not readable):
        status = {**status, "state": RunState.PENDING.value, "label": describe_run(config),
                  "note": "outputs incomplete or status unreadable: the run is redone"}
        write_json(files.status, status)
    elif not files.status.exists():
        status = {"state": RunState.PENDING.value, "label": describe_run(config)}
        write_json(files.status, status)
    return RunRecord(path.name, path, config, status, record.done)


class ResultStore:
    """A results folder. All writes are atomic; a run's folder is created when the run is planned."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def run_dir(self, config: RunConfig) -> Path:
        return self.runs_dir / run_id(config)

    @contextlib.contextmanager
    def folder_lock(self):
        """Hold the folder's lock (blocking) while its shared files change."""
        lock = RunLock(self.root)
        lock.acquire(blocking=True)
        try:
            yield
        finally:
            lock.release()

    def plan(self, config: RunConfig) -> RunRecord:
        """Create the run's folder and config.json (once) and repair what a crash or a bad edit left
        (:func:`repair_run`) unless another process is running it; refuse a folder holding another
        valid config."""
        config = canonical(config)
        rid = run_id(config)
        path = self.runs_dir / rid
        # run_id allows no separator; this keeps any future change from writing outside the folder.
        if path.resolve().parent != self.runs_dir.resolve():
            raise ValueError(f"run id {rid!r} would leave {self.runs_dir}")
        path.mkdir(parents=True, exist_ok=True)
        lock = acquire_run_lock(path, patience=0.5)
        if lock is None:
            return inspect_run(path, config)  # its owner is working on it
        try:
            if (path / "config.json").exists():
                stored = read_json(path / "config.json")
                try:
                    stored_config = RunConfig.from_dict(stored) if isinstance(stored, dict) else None
                except (ValueError, TypeError):
                    stored_config = None
                if stored_config is None:
                    set_aside(path / "config.json", "not a valid config; rewritten from the run id's config")
                elif stored_config != config:
                    raise RuntimeError(f"{path}: holds a different config than its id says; move it away")
            if not (path / "config.json").exists():
                write_json(path / "config.json", config.to_dict())
            return repair_run(path, config)
        finally:
            lock.release()

    def records(self) -> list[RunRecord]:
        """Every run folder with a valid config.json, read only (a folder without one is noted and
        skipped, and the others are unaffected)."""
        out: list[RunRecord] = []
        if not self.runs_dir.is_dir():
            return out
        for path in sorted(p for p in self.runs_dir.iterdir() if p.is_dir()):
            raw = read_json(path / "config.json")
            try:
                if not isinstance(raw, dict):
                    raise ValueError("missing or not valid JSON")
                config = RunConfig.from_dict(raw)
            except (ValueError, TypeError) as exc:
                print(f"note: skipping {path}: its config.json is not a valid config ({exc})", file=sys.stderr)
                continue
            out.append(inspect_run(path, config))
        return out

    def update_status(self, path: Path, **fields) -> dict:
        """Merge ``fields`` into the run's status.json; a new ``state`` must be a transition the
        lifecycle allows (:func:`~amortized_bayes.experiments.lifecycle.check_transition`)."""
        target = RunPaths(path).status
        status = read_json(target, {}) or {}
        if "state" in fields:
            fields["state"] = check_transition(status.get("state"), fields["state"]).value
        status.update(fields)
        write_json(target, status)
        return status

    def save_grid(self, grid_dict: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.folder_lock():
            remove_stale_parts(self.root)
            write_json(self.root / "grid.json", grid_dict)

    def write_summary_table(self) -> Path:
        """Rebuild OUT/summary.csv from every run's folder (under the folder's lock)."""
        with self.folder_lock():
            return self._write_summary_table()

    def _write_summary_table(self) -> Path:
        rows = []
        for rec in self.records():
            c, summ = rec.config, read_json(rec.path / "summary.json", {}) or {}
            final = summ.get("final", {})
            rows.append({
                "run_id": rec.run_id, "state": rec.display_state, "dataset": c.data.label,
                "family": c.family.name,
                "width": getattr(c.family, "width", ""), "depth": getattr(c.family, "depth", ""),
                "objective": c.objective.kind, "estimator": c.objective.estimator,
                "local_terms": c.objective.local_terms, "seed": c.train.seed, "n_train": c.data.n_train,
                "epochs_done": rec.status.get("epochs_done", ""), "steps": summ.get("steps", ""),
                "train_seconds": summ.get("train_seconds", ""), "seconds_per_step": summ.get("seconds_per_step", ""),
                "neg_elbo": final.get("neg_elbo", ""), "neg_elbo_per_image": summ.get("neg_elbo_per_image", ""),
                "test_neg_elbo_per_image": final.get("test_neg_elbo_per_image", ""),
                "train_mse": final.get("train_mse", ""), "test_mse": final.get("test_mse", ""),
                "kl_z_per_image": final.get("kl_z_per_image", ""), "active_units": final.get("active_units", ""),
                "test_inference_seconds": final.get("test_inference_seconds", ""),
                "error": rec.status.get("error", "") if rec.state == "failed" else "",
            })
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        path = self.root / "summary.csv"
        atomic_write_text(path, buffer.getvalue())
        return path


def write_run_outputs(path: Path, result, *, final: bool) -> None:
    """Write steps.csv, evals.jsonl and summary.json of a (possibly partial) FitResult."""
    h = result.history
    buffer = io.StringIO()
    buffer.write("step,epoch,neg_elbo,wall_time\n")
    for row in zip(h.step, h.epoch, h.neg_elbo, h.wall_time):
        buffer.write(f"{row[0]},{row[1]},{row[2]!r},{row[3]!r}\n")
    atomic_write_text(path / "steps.csv", buffer.getvalue())
    atomic_write_text(path / "evals.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in h.evals))
    if h.mse_trace:
        atomic_write_text(path / "mse_trace.jsonl",
                          "".join(json.dumps(e, sort_keys=True) + "\n" for e in h.mse_trace))
    step_times = [b - a for a, b in zip([0.0] + h.wall_time[:-1], h.wall_time)]
    n = result.config.data.n_train or 60_000
    last = h.evals[-1] if h.evals else {}
    write_json(path / "summary.json", {
        "final": last,
        "complete": final,
        "steps": result.steps_done,
        "epochs": result.epochs_done,
        "train_seconds": h.wall_time[-1] if h.wall_time else 0.0,
        "seconds_per_step": statistics.median(step_times) if step_times else None,
        "neg_elbo_per_image": last.get("neg_elbo", float("nan")) / n if last else None,
        "meta": result.meta,
    })


def read_steps(path: Path) -> dict[str, list]:
    """steps.csv as columns."""
    cols: dict[str, list] = {"step": [], "epoch": [], "neg_elbo": [], "wall_time": []}
    with open(path / "steps.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            cols["step"].append(int(row["step"]))
            cols["epoch"].append(int(row["epoch"]))
            cols["neg_elbo"].append(float(row["neg_elbo"]))
            cols["wall_time"].append(float(row["wall_time"]))
    return cols


def read_evals(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (path / "evals.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def read_mse_trace(path: Path) -> list[dict]:
    """mse_trace.jsonl (epoch, step, wall_time, train_mse per traced epoch); [] for a run without one."""
    try:
        return [json.loads(line) for line in (path / "mse_trace.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []
