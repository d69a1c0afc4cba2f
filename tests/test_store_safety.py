"""What the results store guarantees (issue 19): concurrent `run` commands train each run once, kills
leave nothing half-written behind, and a corrupt file in one run is set aside and redone without
touching the others."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from amortized_bayes.experiments.grid import load_grid_file
from amortized_bayes.experiments.store import ResultStore, is_locked, read_evals, read_json, read_steps

GRID = """
name = "safety"
[base.data]
n_train = 120
n_test = 30
[base.model]
latent_dim = 6
hidden = 24
[base.train]
epochs = {epochs}
batch_size = 40
eval_every = 2
[[variants]]
family = {{name = "amortized", width = 1}}
[[variants]]
family = {{name = "amortized", width = 8}}
[[variants]]
family = {{name = "factorized"}}
[[variants]]
family = {{name = "constant"}}
"""


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run once, uninterrupted, by a single command."""
    root = tmp_path_factory.mktemp("safety")
    grid = root / "grid.toml"
    grid.write_text(GRID.format(epochs=6))
    out = root / "whole"
    cli("run", grid, "--out", out, "--workers", "1", "--threads", "1")
    return grid, {r.run_id: r for r in ResultStore(out).records()}


def numbers(path):
    return read_steps(path)["neg_elbo"], [e["neg_elbo"] for e in read_evals(path)]


def trained_once(record) -> bool:
    """One training attempt, and each evaluation printed once in its log."""
    log = (record.path / "log.txt").read_text()
    evals = [line for line in log.splitlines() if "] epoch " in line]
    return record.status.get("attempts") == 1 and len(evals) == len(set(evals)) == len(read_evals(record.path))


@pytest.mark.processes
@pytest.mark.parametrize("commands", [2, 4])
def test_concurrent_runs_on_one_folder_train_every_run_once(reference, tmp_path, commands):
    grid, whole = reference
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "amortized_bayes", "run", str(grid), "--out", str(out),
                               "--workers", "2", "--threads", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(commands)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    records = ResultStore(out).records()
    assert sorted(r.run_id for r in records) == sorted(whole)
    for record in records:
        assert record.state == "done", outputs
        assert trained_once(record), (record.run_id, record.status, outputs)
        assert numbers(record.path) == numbers(whole[record.run_id].path)
        assert not is_locked(record.path)
    # Every run was trained by exactly one of the commands; the others skipped it or found it busy.
    assert sum(o.count(" done ") for o in outputs) >= len(whole)
    assert list(out.rglob(".*.part")) == []


@pytest.mark.processes
def test_corrupt_files_are_set_aside_and_only_their_run_redone(reference, tmp_path):
    grid, whole = reference
    out = tmp_path / "corrupt"
    cli("run", grid, "--out", out, "--workers", "1", "--threads", "1")
    runs = {r.config.family.name + str(getattr(r.config.family, "width", 64)): r for r in ResultStore(out).records()}
    a, b, c, d = runs["amortized1"], runs["amortized8"], runs["factorized64"], runs["constant64"]
    model_time = {r.run_id: (r.path / "model.pt").stat().st_mtime_ns for r in (a, d)}
    # a: status.json truncated in a finished run. b: an interrupted run with a garbage checkpoint.
    # c: evals.jsonl corrupt in a finished run. d: config.json corrupt. Plus stale .part files.
    (a.path / "status.json").write_text('{"state": "do')
    for name in ("summary.json", "evals.jsonl", "steps.csv", "model.pt"):
        (b.path / name).unlink()
    (b.path / "status.json").write_text(json.dumps({"state": "failed", "attempts": 1, "error": "killed"}))
    (b.path / "state.pt").write_bytes(b"\x80not a checkpoint")
    (c.path / "evals.jsonl").write_text('{"epoch": 0, "neg_elbo": 1\n{broken\n')
    (d.path / "config.json").write_text("{not json")
    (out / ".summary.csv.123.part").write_bytes(b"x" * 100)
    (c.path / ".state.pt.456.part").write_bytes(b"x" * 100)

    status = cli("status", out)  # the folder is still readable; the bad run is noted, not fatal
    assert a.run_id in status.stdout and d.run_id not in status.stdout
    assert "config.json is not a valid config" in status.stderr

    cli("run", grid, "--out", out, "--workers", "1", "--threads", "1")
    after = {r.run_id: r for r in ResultStore(out).records()}
    assert sorted(after) == sorted(whole)
    for record in after.values():
        assert record.state == "done"
        assert numbers(record.path) == numbers(whole[record.run_id].path)
    # a and d were finished: not retrained, their models untouched; the broken files kept aside.
    for r in (a, d):
        assert (r.path / "model.pt").stat().st_mtime_ns == model_time[r.run_id]
        assert after[r.run_id].status.get("attempts", 1) == 1  # a: rewritten from its outputs
    assert (a.path / "status.json.corrupt").read_text() == '{"state": "do'
    assert (d.path / "config.json.corrupt").read_text() == "{not json"
    assert read_json(d.path / "config.json") == whole[d.run_id].config.to_dict()
    # b restarted from scratch (its checkpoint set aside), c was redone.
    assert (b.path / "state.pt.corrupt").exists() and not (b.path / "state.pt").exists()
    assert after[b.run_id].status["attempts"] == 2 and not after[b.run_id].status["resumed"]
    assert (c.path / "evals.jsonl.corrupt").exists() and after[c.run_id].status["attempts"] == 2
    for r in (a, b, c, d):
        assert "set aside" in (r.path / "log.txt").read_text()
    assert list(out.rglob(".*.part")) == []


@pytest.mark.processes
def test_a_done_status_over_missing_outputs_is_redone(reference, tmp_path):
    grid, whole = reference
    out = tmp_path / "lost"
    cli("run", grid, "--out", out, "--set", "family.name=factorized", "--threads", "1")
    (record,) = ResultStore(out).records()
    (record.path / "summary.json").unlink()
    assert ResultStore(out).records()[0].state == "pending"
    cli("run", grid, "--out", out, "--set", "family.name=factorized", "--threads", "1")
    (record,) = ResultStore(out).records()
    assert record.state == "done" and numbers(record.path) == numbers(whole[record.run_id].path)


def test_an_unreadable_checkpoint_cannot_fail_a_run_twice(tmp_path):
    """Worker-level: a garbage state.pt is set aside and the run trains from scratch."""
    from amortized_bayes.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from amortized_bayes.experiments.worker import execute

    store = ResultStore(tmp_path / "out")
    config = RunConfig(data=DataConfig(n_train=40, n_test=0), model=ModelConfig(latent_dim=2, hidden=4),
                       train=TrainConfig(epochs=1, batch_size=20))
    record = store.plan(config)
    torch.save({"something": "else"}, record.path / "state.pt")
    assert execute(record.path) == "done"
    assert (record.path / "state.pt.corrupt").exists()


def test_diverging_test_time_inference_fails_the_run_loudly():
    from amortized_bayes.config import (DataConfig, family_config, LocalInferenceConfig, ModelConfig, RunConfig,
                                        TrainConfig)
    from amortized_bayes.training import NonFiniteEvaluationError, TrainingData, fit

    g = torch.Generator().manual_seed(0)
    data = TrainingData(torch.rand(20, 784, generator=g), torch.rand(10, 784, generator=g))
    config = RunConfig(data=DataConfig(n_train=20, n_test=10), model=ModelConfig(latent_dim=2, hidden=4),
                       family=family_config(name="factorized"),
                       train=TrainConfig(epochs=1, test_inference=LocalInferenceConfig(lr=1e30, max_steps=60)))
    with pytest.raises(NonFiniteEvaluationError, match="test-time inference diverged"):
        fit(config, data)


def test_gap_flags_non_finite_images_instead_of_averaging_them():
    from amortized_bayes.gap import _finite_list, _stats

    stats = _stats(torch.tensor([1.0, 3.0, float("nan"), float("-inf")]))
    assert stats["mean"] == 2.0 and stats["non_finite"] == 2 and stats["min"] == 1.0
    assert _finite_list(torch.tensor([1.0, float("inf")])) == [1.0, None]
    assert math.isnan(_stats(torch.tensor([float("nan")]))["mean"])


def test_gap_clamps_an_extreme_log_sigma(tmp_path):
    from types import SimpleNamespace

    from amortized_bayes.config import RunConfig
    from amortized_bayes.families import FactorizedFamily
    from amortized_bayes.gap import GapConfig, LocalOptimConfig, measure_gap

    from . import linear_gaussian as lg

    model = lg.make(D=6, d=3, obs_var=0.5, seed=4)
    x = model.sample(4, torch.Generator().manual_seed(2))
    family = FactorizedFamily(4, 3)
    with torch.no_grad():
        family.log_sigma.weight.fill_(60.0)  # exp(2 * 60) overflows float32
    s = measure_gap(SimpleNamespace(model=model.decoder().requires_grad_(False), family=family, config=RunConfig()),
                    {"train": x}, GapConfig(images=4, splits=("train",), elbo_samples=64, iwae_samples=64,
                                            curve_steps=(0,), optim=LocalOptimConfig(max_steps=200)))["splits"]["train"]
    assert s["log_sigma_clamped_images"] == 4
    assert math.isfinite(s["amortization_gap"]["mean"]) and s["amortization_gap"]["non_finite"] == 0


@pytest.mark.processes
def test_a_held_lock_makes_a_run_busy_and_force_unlock_clears_it(reference, tmp_path):
    from amortized_bayes.experiments.store import RunLock

    grid, whole = reference
    out = tmp_path / "locked"
    args = ["run", grid, "--out", out, "--set", "family.name=constant", "--threads", "1"]
    (config,) = load_grid_file(grid).with_overrides({"family.name": "constant"}).expand()
    record = ResultStore(out).plan(config)
    held = RunLock(record.path)
    assert held.acquire()  # a lock left by a machine that is gone, as a shared file system may keep it
    try:
        busy = cli(*args, check=False)
        assert busy.returncode == 1 and "running" in cli("status", out).stdout
        assert ResultStore(out).records()[0].state != "done"
        cli(*args, "--force-unlock")
        (record,) = ResultStore(out).records()
        assert record.state == "done" and numbers(record.path) == numbers(whole[record.run_id].path)
    finally:
        held.release()


def test_ray_write_back_never_moves_a_run_backwards(tmp_path):
    """A task's returned checkpoint older than the one in the store (a late message from an earlier
    attempt) is not written; a newer one is."""
    from amortized_bayes.config import RunConfig
    from amortized_bayes.experiments.ray_executor import _write_back

    store = ResultStore(tmp_path / "out")
    record = store.plan(RunConfig())
    store.update_status(record.path, steps_done=100)
    (record.path / "state.pt").write_bytes(b"newer")
    old = {"files": {"status.json": json.dumps({"steps_done": 50}).encode(), "state.pt": b"older"}}
    _write_back(record, old, "attempt\n")
    assert (record.path / "state.pt").read_bytes() == b"newer"
    assert read_json(record.path / "status.json")["steps_done"] == 100
    new = {"files": {"status.json": json.dumps({"steps_done": 150}).encode(), "state.pt": b"newest"}}
    _write_back(record, new, "attempt\n")
    assert (record.path / "state.pt").read_bytes() == b"newest"
