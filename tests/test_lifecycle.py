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
