"""Grids, run ids, the result store, resume after SIGKILL, parallel = sequential, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from amortized_bayes.config import ConfigError, DataConfig, family_config, RunConfig, TrainConfig
from amortized_bayes.experiments.grid import load_grid_file, parse_overrides, run_hash, run_id
from amortized_bayes.experiments.presets import PRESETS
from amortized_bayes.experiments.store import ResultStore, read_evals, read_json, read_steps

TINY = """
name = "tiny"
[base.data]
n_train = 200
n_test = 50
[base.model]
latent_dim = 8
hidden = 32
[base.train]
epochs = {epochs}
batch_size = 50
eval_every = 2
[axes]
"family.name" = ["amortized", "factorized"]
"family.width" = [1, 16]
"""


@pytest.fixture
def tiny_grid(tmp_path):
    def make(epochs=3):
        path = tmp_path / f"tiny{epochs}.toml"
        path.write_text(TINY.format(epochs=epochs))
        return path
    return make


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_run_id_is_stable_and_ignores_fields_the_family_does_not_use():
    base = RunConfig(family=family_config(name="factorized"))
    same = RunConfig(family=family_config(name="factorized", width=256, depth=5, refine_steps=9))
    assert run_id(base) == run_id(same)
    # Pinned values: ids must not drift between versions (results folders are keyed by them). Only
    # fields that differ from their defaults are hashed, so adding a field keeps these ids.
    assert run_id(RunConfig()) == "mnist-avi-k64-s0-44136fa355"
    assert run_id(RunConfig(family=family_config(name="factorized"), data=DataConfig(dataset="fashion-mnist"),
                            train=TrainConfig(seed=3))) == "fashion-mnist-fvi-s3-5436523d2d"
    assert run_hash(RunConfig()) == run_hash(RunConfig.from_dict(json.loads(json.dumps(RunConfig().to_dict()))))
    assert run_id(RunConfig(family=family_config(width=128))) != run_id(RunConfig())
    assert run_id(RunConfig(train=TrainConfig(seed=1))) != run_id(RunConfig())


@pytest.mark.processes
def test_run_hash_is_the_same_in_a_fresh_interpreter():
    code = ("from amortized_bayes.config import RunConfig, TrainConfig; from amortized_bayes.experiments.grid "
            "import run_hash; print(run_hash(RunConfig(train=TrainConfig(lr=0.01))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    # Against the hash computed by hand (sha256 of the non-default fields as compact sorted JSON), not
    # against run_hash in this process, which would compare the function with itself.
    import hashlib

    assert out == hashlib.sha256(b'{"train":{"lr":0.01}}').hexdigest()[:10]


def test_grid_expands_crosses_and_dedupes(tiny_grid):
    grid = load_grid_file(tiny_grid())
    runs = grid.expand()
    # amortized x {1, 16} + factorized (width irrelevant: one run, not two)
    assert sorted(run_id(r).split("-s0-")[0] for r in runs) == ["mnist-avi-k1", "mnist-avi-k16", "mnist-fvi"]
    g2 = grid.with_overrides(parse_overrides(["train.seed=0,1", "train.epochs=7"]))
    runs2 = g2.expand()
    assert len(runs2) == 6 and {r.train.epochs for r in runs2} == {7}


@pytest.mark.processes
@pytest.mark.parametrize("overrides, field", [
    (["family.width=0"], "family.width"),
    (["train.epochz=3"], "train.epochz"),
    (["data.n_train=70000"], "data.n_train"),
    (["data.dataset=cifar10"], "data.dataset"),
    (["family.name=amortised"], "family.name"),
    (["train.batch_size=500"], "train.batch_size"),
    (["noequals"], "KEY=VALUE"),
])
def test_invalid_configs_refused_before_anything_runs(tiny_grid, tmp_path, overrides, field):
    grid = load_grid_file(tiny_grid())
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        grid.with_overrides(parse_overrides(overrides)).expand()
    out = tmp_path / "out"
    args = ["run", str(tiny_grid()), "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    proc = cli(*args, check=False)
    assert proc.returncode == 2 and field in proc.stderr
    assert not out.exists()  # nothing ran, nothing written


def test_every_preset_expands_to_valid_runs():
    for grid in PRESETS.values():
        runs = grid.expand()
        assert runs and len({run_id(r) for r in runs}) == len(runs)
    paper = PRESETS["paper"].expand()
    assert len(paper) == 2 * 7 * 10  # the paper's six families and SA-VI, two datasets, ten seeds
    assert sum(r.family.name == "semi-amortized" for r in paper) == 2 * 10
    c = paper[0]
    assert (c.data.n_train, c.train.batch_size, c.train.batches, c.objective.local_terms, c.train.epochs) == \
        (10_000, 1000, "fixed", "all", 5000)
    replicate = PRESETS["replicate-2024"].expand()
    assert {r.objective.kind for r in replicate} == {"legacy-2024"} and len(replicate) == 2 * 6 * 10


def test_when_and_why_is_the_issue_17_grid_and_one_dataset_seed_keeps_its_ids():
    grid = PRESETS["when-and-why"]
    runs = grid.expand()
    # Fashion-MNIST: A-VI k = 1, 64, 256, F-VI, constant-VI, SA-VI; MNIST the same without SA-VI; 2 seeds.
    assert len(runs) == (6 + 5) * 2
    assert {r.data.dataset for r in runs if r.family.name == "semi-amortized"} == {"fashion-mnist"}
    assert {(r.objective.kind, r.objective.local_terms, r.train.batches, r.train.batch_size, r.train.epochs,
             r.data.n_train, r.data.n_test) for r in runs} == {
        ("elbo", "batch", "shuffled", 1000, 5000, 10_000, 10_000)}
    # Each batch to run (a dataset's seed) selected with --only keeps the full grid's run ids.
    from amortized_bayes.experiments.grid import select_runs

    for dataset, n in (("fashion-mnist", 6), ("mnist", 5)):
        ids = {run_id(r) for r in select_runs(runs, {"data.dataset": dataset, "train.seed": 0})}
        assert len(ids) == n and ids <= {run_id(r) for r in runs}
    small = PRESETS["when-and-why-small"].expand()
    assert small and max(r.train.epochs for r in small) < 5000


@pytest.mark.processes
def test_cli_end_to_end_on_real_mnist_then_skip_of_finished_runs(tiny_grid, tmp_path):
    out = tmp_path / "out"
    proc = cli("run", tiny_grid(), "--out", out, "--workers", "1")
    assert "3 to run" in proc.stdout and "mnist-fvi" in proc.stdout
    store = ResultStore(out)
    records = store.records()
    assert len(records) == 3 and all(r.state == "done" for r in records)
    for r in records:
        steps = read_steps(r.path)
        assert steps["step"] == list(range(1, 13))  # 3 epochs x 4 batches
        evals = read_evals(r.path)
        assert [e["epoch"] for e in evals] == [0, 2, 3] and all("test_mse" in e for e in evals)
        assert (r.path / "model.pt").exists() and not (r.path / "state.pt").exists()
        summary = read_json(r.path / "summary.json")
        assert summary["final"]["neg_elbo"] == evals[-1]["neg_elbo"] and summary["meta"]["torch"]
    table = (out / "summary.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("run_id,state")
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")
              if p.is_file() and p.name not in ("summary.csv", "grid.json")}
    again = cli("run", tiny_grid(), "--out", out)
    assert "3 already done, 0 to run" in again.stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    status = cli("status", out)
    assert "3 done" in status.stdout


@pytest.mark.processes
def test_parallel_workers_give_the_same_numbers_as_sequential(tiny_grid, tmp_path):
    grid = tiny_grid()
    cli("run", grid, "--out", tmp_path / "seq", "--workers", "1", "--threads", "1")
    cli("run", grid, "--out", tmp_path / "par", "--workers", "2", "--threads", "1")
    seq, par = ResultStore(tmp_path / "seq").records(), ResultStore(tmp_path / "par").records()
    assert [r.run_id for r in seq] == [r.run_id for r in par]
    for a, b in zip(seq, par):
        assert read_steps(a.path)["neg_elbo"] == read_steps(b.path)["neg_elbo"]
        assert [e["neg_elbo"] for e in read_evals(a.path)] == [e["neg_elbo"] for e in read_evals(b.path)]


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def _session_alive(sid: int) -> bool:
    """Whether any live (not zombie) process is in session ``sid`` (Linux /proc; elsewhere: False)."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session.
        if fields[0] != "Z" and int(fields[3]) == sid:
            return True
    return False


@pytest.mark.processes
def test_worker_killed_mid_run_resumes_to_the_uninterrupted_numbers(tiny_grid, tmp_path):
    grid = tiny_grid(epochs=12)
    single = ["--set", "family.name=factorized", "--set", "family.width=1"]
    cli("run", grid, "--out", tmp_path / "whole", *single)
    out = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "amortized_bayes", "run", str(grid), "--out", str(out),
                               "--checkpoint-every", "0", *single],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running_worker():
        for status in out.glob("runs/*/status.json"):
            s = read_json(status, {}) or {}
            if (s.get("state") == "running" and (s.get("epochs_done") or 0) >= 3
                    and (status.parent / "state.pt").exists()):
                return s
        return None

    status = _wait_for(running_worker)
    os.kill(status["pid"], signal.SIGKILL)
    stdout, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1 and "killed by signal 9" in stdout
    rec = ResultStore(out).records()[0]
    assert rec.state == "failed" and (rec.path / "state.pt").exists()
    assert "interrupted" in cli("status", out).stdout or "failed" in cli("status", out).stdout
    cli("run", grid, "--out", out, *single)  # resumes from the checkpoint
    rec = ResultStore(out).records()[0]
    assert rec.state == "done" and rec.status["attempts"] == 2 and rec.status["resumed"]
    whole = ResultStore(tmp_path / "whole").records()[0]
    assert read_steps(rec.path)["neg_elbo"] == read_steps(whole.path)["neg_elbo"]
    assert read_evals(rec.path)[-1]["neg_elbo"] == read_evals(whole.path)[-1]["neg_elbo"]
    assert read_evals(rec.path)[-1]["test_mse"] == read_evals(whole.path)[-1]["test_mse"]


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tiny_grid, tmp_path, monkeypatch):
    out = tmp_path / "out"
    grid = load_grid_file(tiny_grid())
    store = ResultStore(out)
    records = [store.plan(c) for c in grid.expand()]
    # Make one run fail at run time (a GPU this machine lacks): the worker fails, the others finish.
    bad = records[0]
    raw = read_json(bad.path / "config.json")
    raw["train"]["device"] = "cuda:7"
    (bad.path / "config.json").write_text(json.dumps(raw))
    from amortized_bayes.experiments.local import run_local

    outcomes = run_local(records, store, workers=1, threads=1)
    states = {o.run_id: o.state for o in outcomes}
    assert states[bad.run_id] == "failed" and sum(s == "done" for s in states.values()) == 2
    assert "Error" in read_json(bad.path / "status.json")["error"]
    assert "Traceback" in (bad.path / "log.txt").read_text()
    assert "failed" in (out / "summary.csv").read_text()


@pytest.mark.processes
def test_tensorboard_logging(tiny_grid, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    cli("run", tiny_grid(), "--out", out, "--tensorboard", "--set", "family.name=amortized",
        "--set", "family.width=1")
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/neg_elbo_estimate", "eval/neg_elbo", "eval/train_mse", "eval/test_mse"} <= tags
    assert len(acc.Scalars("train/neg_elbo_estimate")) == 12


@pytest.mark.processes
def test_dry_run_lists_without_running(tiny_grid, tmp_path):
    proc = cli("run", tiny_grid(), "--out", tmp_path / "out", "--dry-run")
    assert proc.stdout.count(" new ") == 3 and not (tmp_path / "out").exists()


@pytest.mark.processes
def test_only_runs_a_selection_whose_runs_the_whole_grid_then_finds_done(tiny_grid, tmp_path):
    """`--only family.name=factorized` trains F-VI alone (the tiny grid's two widths are one F-VI run);
    the whole grid run afterwards counts it as done under the same id and trains the two A-VI runs."""
    grid, out = tiny_grid(), tmp_path / "out"
    proc = cli("run", grid, "--out", out, "--only", "family.name=factorized", "--workers", "1", "--threads", "1")
    assert "3 runs" not in proc.stdout and "1 runs (those with family.name=factorized), 0 already done" in proc.stdout
    assert [p.name.rsplit("-", 1)[0] for p in (out / "runs").iterdir()] == ["mnist-fvi-s0"]
    listing = cli("run", grid, "--out", out, "--dry-run").stdout
    assert listing.count(" new ") == 2 and listing.count(" done ") == 1
    assert [line.split()[1] for line in listing.splitlines() if " done " in line] == [
        p.name for p in (out / "runs").iterdir()]
    bad = cli("run", grid, "--out", out, "--only", "family.name=fvi", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --only family.name='fvi': no run has it; the runs have 'amortized', 'factorized'")


@pytest.mark.processes
def test_a_worker_then_the_driver_killed_at_random_moments_loses_nothing(tiny_grid, tmp_path):
    """SIGKILL a worker mid-run (its driver goes on and finishes the other run), then SIGKILL a second
    driver mid-resume (its orphaned workers stop by themselves); a last `run` ends with the numbers of an
    uninterrupted grid, the run that finished in between untouched and no half-written file left."""
    import random

    # Each kill is aimed at a run in progress, not at a timer: CI's idle cores finished all three 30-epoch
    # runs inside a 1.27 s sleep once, so no kill interrupted anything and the test proved nothing. The
    # poll (every 20 ms) waits for a run that is training with epochs left (an epoch here takes ~30-300
    # ms), then kills at once or after up to 0.2 s.
    epochs = 30
    grid = tiny_grid(epochs=epochs)
    two = ("--set", "family.width=16")  # two runs (one per worker): every process start costs ~3 s here
    cli("run", grid, "--out", tmp_path / "whole", "--workers", "2", "--threads", "1", *two)
    out = tmp_path / "killed"
    rng = random.Random(0)
    command = [sys.executable, "-m", "amortized_bayes", "run", str(grid), "--out", str(out), "--workers", "2",
               "--threads", "1", "--checkpoint-every", "0", *two]

    def training_now(first: int = 1) -> list[tuple[str, dict]]:
        return [(p.parent.name, s) for p in out.glob("runs/*/status.json")
                if (s := read_json(p, {}) or {}).get("state") == "running"
                and first <= (s.get("epochs_done") or 0) < epochs - 5]

    # 1. A worker killed; its driver records the run as failed and finishes the other one.
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, status = _wait_for(training_now)[0]
    time.sleep(rng.uniform(0.0, 0.2))
    os.kill(status["pid"], signal.SIGKILL)
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1 and "killed by signal 9" in output, output
    assert read_json(out / "runs" / victim / "status.json")["state"] == "failed"
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for r in ResultStore(out).records()
                if r.state == "done" for p in r.path.rglob("*") if p.is_file()}
    assert finished and not any(victim in str(p) for p in finished)

    # 2. The driver of the resume killed while the victim trains on from its checkpoint.
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    resumed_from = (read_json(out / "runs" / victim / "status.json") or {}).get("epochs_done") or 0
    _wait_for(lambda: [name for name, _ in training_now(resumed_from + 1) if name == victim])
    time.sleep(rng.uniform(0.0, 0.2))
    driver.kill()
    driver.wait(30)
    # Orphaned workers notice at their next epoch boundary and stop. Wait for the processes themselves
    # (the driver's session): a worker it had just started may not have registered yet.
    _wait_for(lambda: not _session_alive(driver.pid), timeout=60)
    _wait_for(lambda: not any(r.alive for r in ResultStore(out).records()), timeout=60)
    assert read_json(out / "runs" / victim / "status.json")["state"] != "done"

    # 3. A last run: the victim resumes again; the finished run is not touched.
    cli("run", grid, "--out", out, "--workers", "2", "--threads", "1", *two)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished} == finished
    killed, whole = ResultStore(out).records(), ResultStore(tmp_path / "whole").records()
    assert [r.run_id for r in killed] == [r.run_id for r in whole]
    assert {r.run_id: r.status["attempts"] for r in killed}[victim] == 3
    for a, b in zip(killed, whole):
        assert a.state == "done"
        assert read_steps(a.path)["neg_elbo"] == read_steps(b.path)["neg_elbo"]
        assert [e["neg_elbo"] for e in read_evals(a.path)] == [e["neg_elbo"] for e in read_evals(b.path)]
    assert list(out.rglob(".*.part")) == []  # no half-written file survives the kills and the rerun
