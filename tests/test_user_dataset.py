"""A user's own images as a dataset (``data.dataset = "file:PATH"``): the config records the file's
SHA-256 and image shape, the run id follows the file, a changed file is refused by a stored run, bad
files give one clear error, and the file runs through `run`, `gap`, `report` and `infer`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from amortized_bayes.config import ConfigError, DataConfig, ModelConfig, RunConfig
from amortized_bayes.data import load_split
from amortized_bayes.data.user_dataset import UserDatasetError, read
from amortized_bayes.experiments.grid import run_id


def _write(path, n_train=30, n_test=12, shape=(20, 24), seed=0, **extra):
    rng = np.random.default_rng(seed)
    arrays = {"train": rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
              "test": rng.random((n_test, *shape), dtype=np.float32), **extra}
    np.savez(path, **arrays)
    return arrays


def test_the_config_records_path_hash_and_shape_and_the_model_follows(tmp_path, monkeypatch):
    _write(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)
    data = DataConfig(dataset="file:mine.npz", n_train=20, n_test=5)
    assert data.dataset == f"file:{tmp_path / 'mine.npz'}"  # absolute: workers run elsewhere
    assert data.file_sha256 == hashlib.sha256((tmp_path / "mine.npz").read_bytes()).hexdigest()
    assert data.image_shape == (20, 24) and data.label == "file-mine" and data.is_file
    config = RunConfig(data=data)
    assert config.model.data_dim == 480  # from the file, since data_dim was left at its default
    with pytest.raises(ConfigError, match="model.data_dim: must be 480"):
        RunConfig(data=data, model=ModelConfig(data_dim=100))
    assert run_id(config).startswith("file-mine-avi-k64-s0-")
    # A stored config is rebuilt without reading the file (it may be gone), keeping what it recorded.
    stored = config.to_dict()
    (tmp_path / "mine.npz").unlink()
    assert RunConfig.from_dict(stored) == config


@pytest.mark.parametrize("value, message", [
    ("file:", "needs a path"),
    ("file:absent.npz", "no such file"),
])
def test_a_missing_file_is_a_config_error(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        DataConfig(dataset=value)


def test_file_fields_are_refused_for_built_in_datasets_and_sizes_are_the_files(tmp_path):
    _write(tmp_path / "d.npz", n_train=30, n_test=12)
    with pytest.raises(ConfigError, match="data.file_sha256: only for a file: dataset"):
        DataConfig(dataset="mnist", file_sha256="0" * 64)
    with pytest.raises(ConfigError, match="data.n_train: must be between 1 and 30"):
        DataConfig(dataset=f"file:{tmp_path / 'd.npz'}", n_train=31)
    with pytest.raises(ConfigError, match="data.n_test: must be between 0 and 12"):
        DataConfig(dataset=f"file:{tmp_path / 'd.npz'}", n_train=5, n_test=13)
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        DataConfig(dataset=f"file:{tmp_path / 'd.npz'}", n_train=5, n_test=5, file_sha256="abc",
                   image_height=20, image_width=24)


def test_the_run_id_changes_when_the_file_does(tmp_path):
    path = tmp_path / "d.npz"
    _write(path, seed=0)
    before = run_id(RunConfig(data=DataConfig(dataset=f"file:{path}", n_train=10, n_test=5)))
    assert before == run_id(RunConfig(data=DataConfig(dataset=f"file:{path}", n_train=10, n_test=5)))
    _write(path, seed=1)
    after = run_id(RunConfig(data=DataConfig(dataset=f"file:{path}", n_train=10, n_test=5)))
    assert after != before and after.split("-")[:2] == before.split("-")[:2]


def test_load_split_reads_pixels_as_the_built_in_datasets_do(tmp_path):
    arrays = _write(tmp_path / "d.npz", test_labels=np.arange(12) % 3)
    name = f"file:{tmp_path / 'd.npz'}"
    train = load_split(name, "train", n=10, subset="random", seed=4)
    rows = np.sort(np.random.default_rng(4).choice(30, size=10, replace=False))
    np.testing.assert_array_equal(train.images.numpy(), arrays["train"][rows].reshape(10, -1) / np.float32(255.0))
    np.testing.assert_array_equal(train.indices.numpy(), rows)
    assert (train.labels == 0).all()  # no train labels in the file
    test = load_split(name, "test")
    np.testing.assert_array_equal(test.images.numpy(), arrays["test"].reshape(12, -1))  # floats as stored
    np.testing.assert_array_equal(test.labels.numpy(), np.arange(12) % 3)
    binary = load_split(name, "test", binarize="threshold")
    np.testing.assert_array_equal(binary.images.numpy(), (arrays["test"].reshape(12, -1) > 0.5).astype(np.float32))
    # The hash a run recorded is checked: a changed file is refused, not trained on.
    recorded = DataConfig(dataset=name, n_train=10, n_test=5).file_sha256
    assert load_split(name, "train", sha256=recorded).images.shape == (30, 480)
    _write(tmp_path / "d.npz", seed=9)
    with pytest.raises(UserDatasetError, match="changed since the run was planned"):
        load_split(name, "train", sha256=recorded)


@pytest.mark.parametrize("arrays, message", [
    ({"train": np.zeros((3, 4, 4), np.uint8)}, "needs arrays 'train' and 'test'"),
    ({"train": np.zeros((3, 4), np.uint8), "test": np.zeros((3, 4), np.uint8)}, "4 is a square"),
    ({"train": np.zeros((3, 5), np.uint8), "test": np.zeros((3, 5), np.uint8)}, "5 is not a square"),
    ({"train": np.zeros((3, 4, 4, 2), np.uint8), "test": np.zeros((3, 4, 4), np.uint8)}, "must be (N, H, W)"),
    ({"train": np.full((3, 4, 4), 2.0), "test": np.zeros((3, 4, 4))}, "floats must lie in [0, 1]"),
    ({"train": np.full((3, 4, 4), np.nan), "test": np.zeros((3, 4, 4))}, "NaN or infinite"),
    ({"train": np.zeros((3, 4, 4), np.uint8), "test": np.zeros((3, 5, 4), np.uint8)}, "must be the same size"),
    ({"train": np.zeros((3, 4, 4), np.uint8), "test": np.zeros((2, 4, 4), np.uint8),
      "train_labels": np.zeros(2, np.int64)}, "'train_labels' must be 3 integers"),
    ({"train": np.zeros((3, 4, 4), bool), "test": np.zeros((3, 4, 4), bool)}, "store uint8"),
])
def test_a_malformed_file_is_one_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    if message == "4 is a square":  # flat square images are accepted: (N, 4) is 2x2
        assert read(f"file:{tmp_path / 'bad.npz'}").shape == (2, 2)
        return
    with pytest.raises(UserDatasetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read(f"file:{tmp_path / 'bad.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserDatasetError, match="not a readable .npz"):
        read(f"file:{tmp_path / 'junk.npz'}")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_a_file_dataset_runs_through_run_gap_report_and_infer(tmp_path):
    """The command line end to end on 20x24 images (not square, not 28x28), from a relative path."""
    from amortized_bayes.data import load_arrays

    train, _ = load_arrays("mnist", "train")
    test, labels = load_arrays("mnist", "test")
    np.savez(tmp_path / "crops.npz", train=train[:120, 4:24, 2:26], test=test[:20, 4:24, 2:26], test_labels=labels[:20])
    (tmp_path / "grid.toml").write_text(
        'name = "mine"\n[base.data]\ndataset = "file:crops.npz"\nn_train = 100\nn_test = 20\n'
        '[base.model]\nlatent_dim = 4\nhidden = 16\n[base.train]\nepochs = 2\nbatch_size = 50\neval_every = 2\n'
        '[axes]\n"family.name" = ["amortized", "factorized"]\n')
    info = _cli("data", "info", "file:crops.npz", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    rows = json.loads(info.stdout)
    assert [r["count"] for r in rows] == [120, 20] and rows[0]["shape"] == "20x24"
    assert rows[0]["sha256"] == hashlib.sha256((tmp_path / "crops.npz").read_bytes()).hexdigest()

    proc = _cli("run", "grid.toml", "--out", "out", "--workers", "2", "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert [r.name.rsplit("-", 1)[0] for r in runs] == ["file-crops-avi-k64-s0", "file-crops-fvi-s0"]
    stored = json.loads((runs[0] / "config.json").read_text())
    assert stored["data"]["file_sha256"] == rows[0]["sha256"] and stored["model"]["data_dim"] == 480
    # gap's own code on each run (measure_run_gap, what each `gap` worker calls), with q* in tens of steps.
    from amortized_bayes.gap import GapConfig, LocalOptimConfig, measure_run_gap

    fast = GapConfig(images=30, iwae_samples=20, elbo_samples=8, optim=LocalOptimConfig(window=10, max_steps=40),
                     curve_steps=(0, 10))
    for run in runs:
        measure_run_gap(run, fast)
    gap = json.loads((runs[1] / "gap.json").read_text())
    assert gap["splits"]["test"]["images"] == 20  # the file's 20 test images, not the 30 asked for
    proc = _cli("report", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "report" / "figures" / "file-crops-reconstructions.png").exists()
    assert "file-crops" in (tmp_path / "out" / "report" / "report.md").read_text()
    proc = _cli("infer", runs[0], "crops.npz", "--key", "test", "--out", "new", "--elbo-samples", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with np.load(tmp_path / "new.npz") as npz:
        assert npz["reconstructions"].shape == (20, 20, 24)

    # The file changes: the grid now plans new runs, and the stored ones refuse to be trained on it.
    np.savez(tmp_path / "crops.npz", train=train[120:240, 4:24, 2:26], test=test[:20, 4:24, 2:26])
    proc = _cli("run", "grid.toml", "--out", "out", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.count(" new ") == 2, proc.stdout
    from amortized_bayes.training import load_training_data

    with pytest.raises(UserDatasetError, match="changed since the run was planned"):
        load_training_data(RunConfig.from_dict(stored))


@pytest.mark.parametrize("splits", [("train", "test"), ("test",)])
def test_gap_refuses_a_file_that_changed_since_the_run(tmp_path, splits):
    """`gap` reads the run's own images again: from a file dataset, only if the file is still the one
    the run was trained on (its SHA-256 in the config), for each split it measures."""
    from amortized_bayes.checkpoint import save_fit
    from amortized_bayes.config import TrainConfig, family_config
    from amortized_bayes.gap import GapConfig, LocalOptimConfig, measure_run_gap
    from amortized_bayes.training import fit

    path = tmp_path / "d.npz"
    _write(path, shape=(8, 8))
    config = RunConfig(data=DataConfig(dataset=f"file:{path}", n_train=20, n_test=6),
                       model=ModelConfig(latent_dim=2, hidden=4), family=family_config("amortized", width=4),
                       train=TrainConfig(epochs=1))
    run = tmp_path / "run"
    run.mkdir()
    save_fit(fit(config), run / "model.pt")
    gap_config = GapConfig(images=2, splits=splits, elbo_samples=2, iwae_samples=2,
                           optim=LocalOptimConfig(max_steps=2), curve_steps=(0,))
    assert set(measure_run_gap(run, gap_config)["splits"]) == set(splits)
    _write(path, shape=(8, 8), seed=1)
    with pytest.raises(UserDatasetError, match="changed since the run was planned"):
        measure_run_gap(run, gap_config)
