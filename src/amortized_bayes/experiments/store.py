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
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.atomic import atomic_write_text
from .grid import canonical, describe_run, run_id

STATES = ("pending", "running", "done", "failed")
SUMMARY_COLUMNS = [
    "run_id", "state", "dataset", "family", "width", "depth", "objective", "estimator", "local_terms",
    "seed", "n_train", "epochs_done", "steps", "train_seconds", "seconds_per_step", "neg_elbo",
    "neg_elbo_per_image", "train_mse", "test_mse", "kl_z_per_image", "active_units",
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


@dataclass
class RunRecord:
    """What the store knows of one run."""

    run_id: str
    path: Path
    config: RunConfig
    status: dict

    @property
    def state(self) -> str:
        return self.status.get("state", "pending")

    @property
    def alive(self) -> bool:
        """A 'running' run whose worker is still alive on this host (else it was interrupted)."""
        if self.state != "running":
            return False
        if self.status.get("host") != socket.gethostname():
            return True  # another machine's worker: trust its word
        pid = self.status.get("pid")
        if not pid:
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def display_state(self) -> str:
        if self.state == "running" and not self.alive:
            return "interrupted"
        if self.state == "pending" and (self.path / "state.pt").exists():
            return "interrupted"
        return self.state


class ResultStore:
    """A results folder. All writes are atomic; a run's folder is created when the run is planned."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def run_dir(self, config: RunConfig) -> Path:
        return self.runs_dir / run_id(config)

    def plan(self, config: RunConfig) -> RunRecord:
        """Create the run's folder and config.json (once); refuse a folder holding another config."""
        config = canonical(config)
        rid = run_id(config)
        path = self.runs_dir / rid
        # run_id allows no separator; this keeps any future change from writing outside the folder.
        if path.resolve().parent != self.runs_dir.resolve():
            raise ValueError(f"run id {rid!r} would leave {self.runs_dir}")
        stored = read_json(path / "config.json")
        if stored is None:
            path.mkdir(parents=True, exist_ok=True)
            write_json(path / "config.json", config.to_dict())
        elif RunConfig.from_dict(stored) != config:
            raise RuntimeError(f"{path}: holds a different config than its id says; move it away")
        status = read_json(path / "status.json") or {"state": "pending", "label": describe_run(config)}
        if not (path / "status.json").exists():
            write_json(path / "status.json", status)
        return RunRecord(rid, path, config, status)

    def records(self) -> list[RunRecord]:
        out = []
        if not self.runs_dir.is_dir():
            return out
        for path in sorted(self.runs_dir.iterdir()):
            raw = read_json(path / "config.json")
            if raw is None:
                continue
            try:
                config = RunConfig.from_dict(raw)
            except (ValueError, TypeError) as exc:
                print(f"note: skipping {path}: its config.json is not a valid config ({exc})", file=sys.stderr)
                continue
            out.append(RunRecord(path.name, path, config, read_json(path / "status.json", {})))
        return out

    def update_status(self, path: Path, **fields) -> dict:
        status = read_json(path / "status.json", {}) or {}
        status.update(fields)
        write_json(path / "status.json", status)
        return status

    def save_grid(self, grid_dict: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / "grid.json", grid_dict)

    def write_summary_table(self) -> Path:
        """Rebuild OUT/summary.csv from every run's folder."""
        rows = []
        for rec in self.records():
            c, summ = rec.config, read_json(rec.path / "summary.json", {}) or {}
            final = summ.get("final", {})
            rows.append({
                "run_id": rec.run_id, "state": rec.display_state, "dataset": c.data.dataset,
                "family": c.family.name,
                "width": c.family.width if c.family.name in ("amortized", "semi-amortized") else "",
                "depth": c.family.depth if c.family.name in ("amortized", "semi-amortized") else "",
                "objective": c.objective.kind, "estimator": c.objective.estimator,
                "local_terms": c.objective.local_terms, "seed": c.train.seed, "n_train": c.data.n_train,
                "epochs_done": rec.status.get("epochs_done", ""), "steps": summ.get("steps", ""),
                "train_seconds": summ.get("train_seconds", ""), "seconds_per_step": summ.get("seconds_per_step", ""),
                "neg_elbo": final.get("neg_elbo", ""), "neg_elbo_per_image": summ.get("neg_elbo_per_image", ""),
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
