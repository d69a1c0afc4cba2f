"""A run's lifecycle (issue 18): the states and the transitions the store lets a status take, the
run-paths type naming every file a finished run has, and the one planner both executors use."""

from __future__ import annotations

import json

import pytest

from amortized_bayes.config import DataConfig, ModelConfig, RunConfig, TrainConfig, family_config
from amortized_bayes.experiments.lifecycle import (InvalidTransition, RunPaths, RunState, check_transition,
                                                   parse_state, plan_runs)
from amortized_bayes.experiments.store import ResultStore, acquire_run_lock
from amortized_bayes.experiments.worker import execute

# Written out by hand from the diagram in lifecycle.py: the transitions that must be refused.
REFUSED = {("done", "running"), ("done", "failed")}
STATES = ("pending", "running", "done", "failed")


@pytest.mark.parametrize("old", STATES + (None, "garbage"))
@pytest.mark.parametrize("new", STATES)
def test_every_transition_but_restarting_or_failing_a_finished_run_is_allowed(old, new):
    if (old, new) in REFUSED:
        with pytest.raises(InvalidTransition, match=f"a done run cannot become {new}"):
            check_transition(old, new)
    else:
        assert check_transition(old, new) is RunState(new)
    assert parse_state(old) is (RunState(old) if old in STATES else RunState.PENDING)


def _config(seed: int) -> RunConfig:
    return RunConfig(data=DataConfig(n_train=40, n_test=10), model=ModelConfig(latent_dim=3, hidden=8),
                     family=family_config("factorized"), train=TrainConfig(epochs=2, seed=seed))


def test_the_store_refuses_to_restart_a_finished_run_and_names_every_file(tmp_path):
    store = ResultStore(tmp_path)
    record = store.plan(_config(0))
    assert record.state is RunState.PENDING and record.files == RunPaths(record.path)
    assert execute(record.path) == "done"
    files = RunPaths(record.path)
    for name in ("config", "status", "steps", "evals", "summary", "model"):  # log.txt: the executor's
        assert getattr(files, name).is_file(), name
    assert not files.state.exists()  # the checkpoint is removed once model.pt holds the result
    with pytest.raises(InvalidTransition):
        store.update_status(record.path, state="running")
    assert json.loads(files.status.read_text())["state"] == "done"  # nothing was written
    store.update_status(record.path, note="a progress field")  # fields without a state are free
    assert json.loads(files.status.read_text())["state"] == "done"


def test_one_planner_splits_done_busy_and_to_do(tmp_path):
    store = ResultStore(tmp_path)
    done, busy, todo = (store.plan(_config(seed)) for seed in (0, 1, 2))
    assert execute(done.path) == "done"
    lock = acquire_run_lock(busy.path)
    try:
        plan = plan_runs(store.records())
        assert [r.run_id for r in plan.done] == [done.run_id]
        assert [r.run_id for r in plan.busy] == [busy.run_id]
        assert [r.run_id for r in plan.todo] == [todo.run_id]
        assert [(o.run_id, o.state) for o in plan.settled()] == [(done.run_id, "skipped"), (busy.run_id, "busy")]
    finally:
        lock.release()
    assert [r.run_id for r in plan_runs(store.records()).todo] == sorted([busy.run_id, todo.run_id])


def test_a_resumed_run_records_the_pace_of_its_own_attempt(tmp_path):
    """`status` estimates the time left of a resumed run from the epochs of its present attempt: the
    worker records how many epochs that attempt trained beside its elapsed seconds."""
    store = ResultStore(tmp_path)
    config = RunConfig(data=DataConfig(n_train=40, n_test=10), model=ModelConfig(latent_dim=3, hidden=8),
                       family=family_config("factorized"), train=TrainConfig(epochs=4, seed=0))
    record = store.plan(config)
    # A driver pid that is never this process's parent: the worker stops after epoch 1, checkpointed.
    assert execute(record.path, checkpoint_seconds=0.0, parent_pid=-1) == "failed"
    assert (record.path / "state.pt").exists()
    assert execute(record.path) == "done"
    status = json.loads((record.path / "status.json").read_text())
    assert status["epochs_done"] == 4 and status["epochs_this_attempt"] == 3 and status["attempts"] == 2


@pytest.mark.parametrize("status, left", [
    # This attempt: 100 epochs in 50 s, so 0.5 s each for the 400 left (earlier attempts do not count).
    ({"epochs_done": 600, "epochs_this_attempt": 100, "elapsed_seconds": 50.0, "train_seconds": 900.0}, 200.0),
    # No pace of this attempt yet (or a status from before the field): training time over all epochs.
    ({"epochs_done": 600, "epochs_this_attempt": 0, "elapsed_seconds": 3.0, "train_seconds": 900.0}, 600.0),
    ({"epochs_done": 600, "elapsed_seconds": 50.0, "train_seconds": 900.0}, 600.0),
    ({"epochs_done": 1000, "epochs_this_attempt": 10, "elapsed_seconds": 5.0}, 0.0),
    ({"epochs_done": 0}, None),
    ({}, None),
])
def test_time_left_uses_the_present_attempts_pace(status, left):
    from amortized_bayes.cli.run import time_left

    assert time_left(status, 1000) == left
