"""A run's life, in one place: its states and the transitions between them, the files of its folder,
and the plan of what a ``run`` command skips, leaves to another process, or starts. The local and the
Ray executors share all three; the store writes states only through :func:`check_transition`.

States (``status.json``'s ``state``)::

    pending --> running --> done
       |           |  ^
       |           v  |          a new attempt resumes from the last checkpoint
       +------> failed -+
    done --> pending             only when the outputs turn out incomplete (the run is redone)

A finished run is never started or failed again: done -> running and done -> failed are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import RunRecord


class RunState(str, Enum):
    """A run's state; a ``str``, so that it is written to JSON and compared as its value."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# Every state may be rewritten as itself (progress, a new attempt's details).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.PENDING, RunState.RUNNING, RunState.FAILED, RunState.DONE}),
    RunState.RUNNING: frozenset({RunState.RUNNING, RunState.DONE, RunState.FAILED, RunState.PENDING}),
    RunState.FAILED: frozenset({RunState.FAILED, RunState.RUNNING, RunState.PENDING, RunState.DONE}),
    RunState.DONE: frozenset({RunState.DONE, RunState.PENDING}),
}


class InvalidTransition(RuntimeError):
    """A status write that would move a run along a transition the lifecycle does not have."""


def parse_state(value) -> RunState:
    """A stored state; a missing or unknown one reads as pending (a run not started)."""
    try:
        return RunState(value)
    except ValueError:
        return RunState.PENDING


def check_transition(old, new) -> RunState:
    """``new`` as a :class:`RunState`, or :class:`InvalidTransition` when ``old`` -> ``new`` is not
    allowed (``old`` as stored: a missing state is pending)."""
    source, target = parse_state(old), RunState(new)
    if target not in TRANSITIONS[source]:
        raise InvalidTransition(f"a {source} run cannot become {target}")
    return target


@dataclass(frozen=True)
class RunPaths:
    """Every file of one run's folder (``OUT/runs/<run id>/``), named once."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"  # the run's canonical RunConfig

    @property
    def status(self) -> Path:
        return self.root / "status.json"  # state, progress, times, error

    @property
    def steps(self) -> Path:
        return self.root / "steps.csv"  # per step: step, epoch, neg_elbo, wall_time

    @property
    def evals(self) -> Path:
        return self.root / "evals.jsonl"  # per evaluation: every metric of SPEC §4

    @property
    def mse_trace(self) -> Path:
        return self.root / "mse_trace.jsonl"  # train MSE every train.mse_every epochs

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"  # final metrics, time per step, versions, machine

    @property
    def state(self) -> Path:
        return self.root / "state.pt"  # the training checkpoint a new attempt resumes from

    @property
    def model(self) -> Path:
        return self.root / "model.pt"  # the fitted model (load_fit)

    @property
    def gap(self) -> Path:
        return self.root / "gap.json"  # written by `amortized-bayes gap`

    @property
    def log(self) -> Path:
        return self.root / "log.txt"  # the worker's output and the store's notes


@dataclass
class Outcome:
    """What one executor did with one run: ``state`` done, failed, skipped (already done) or busy
    (another process holds it)."""

    run_id: str
    state: str
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a ``run`` command does with its records: skip the ``done``, leave the ``busy`` (another
    process holds their lock) alone, start the ``todo``."""

    done: list[RunRecord]
    busy: list[RunRecord]
    todo: list[RunRecord]

    def settled(self) -> list[Outcome]:
        """The outcomes of the runs this command will not start."""
        return ([Outcome(r.run_id, "skipped", 0.0) for r in self.done]
                + [Outcome(r.run_id, "busy", 0.0, "a live worker is already running it") for r in self.busy])


def plan_runs(records: list[RunRecord]) -> Plan:
    """Split ``records`` into done, busy and to-do. A run whose lock is held (a worker of another
    ``run``, or one left by a killed driver that has not yet reached its next epoch boundary) is busy;
    if its owner takes the lock after this check, the executor's own attempt finds it busy then."""
    done = [r for r in records if r.state == RunState.DONE]
    rest = [r for r in records if r.state != RunState.DONE]
    busy = [r for r in rest if r.alive]
    held = {r.run_id for r in busy}
    return Plan(done, busy, [r for r in rest if r.run_id not in held])
