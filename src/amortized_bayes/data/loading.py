"""The data API the rest of the tool uses: a split as float pixels in [0, 1], subsets, binarisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import user_dataset
from .registry import SPLITS, get_dataset
from .store import load_arrays

Subset = Literal["first", "random"]
Binarize = Literal["none", "threshold", "stochastic"]


@dataclass(frozen=True)
class Split:
    """One split of a dataset, ready for training.

    ``images``: float32 ``(N, H*W)`` (784 for the built-in datasets) in [0, 1] (or {0, 1} when
    binarised); ``labels``: int64 ``(N,)``;
    ``indices``: int64 ``(N,)``, each row's position in the full split, so results can be traced back.
    """

    dataset: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def select_indices(total: int, n: int | None, subset: Subset = "first", seed: int = 0) -> np.ndarray:
    """Row indices of a subset of size ``n`` (all rows when ``n`` is None): the first ``n``, or ``n``
    drawn without replacement by a generator seeded with ``seed`` (returned in increasing order)."""
    if n is None:
        return np.arange(total)
    if not 1 <= n <= total:
        raise ValueError(f"subset size n={n} must be between 1 and the split's size {total}")
    if subset == "first":
        return np.arange(n)
    if subset == "random":
        return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    raise ValueError(f"subset must be 'first' or 'random', got {subset!r}")


def binarize_pixels(
    images: torch.Tensor, mode: Binarize = "threshold", threshold: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Binarise pixels in [0, 1]: ``threshold`` sets x > threshold to 1; ``stochastic`` draws
    Bernoulli(x) with a generator seeded by ``seed`` (so the same seed gives the same images)."""
    if mode == "none":
        return images
    if mode == "threshold":
        return (images > threshold).to(images.dtype)
    if mode == "stochastic":
        generator = torch.Generator().manual_seed(seed)
        return torch.bernoulli(images, generator=generator)
    raise ValueError(f"binarize must be 'none', 'threshold' or 'stochastic', got {mode!r}")


def load_split(
    dataset: str,
    split: str = "train",
    *,
    n: int | None = None,
    subset: Subset = "first",
    seed: int = 0,
    binarize: Binarize = "none",
    threshold: float = 0.5,
    binarize_seed: int = 0,
    data_dir: str | Path | None = None,
    sha256: str | None = None,
) -> Split:
    """Load a verified split of ``mnist`` or ``fashion-mnist`` (fetching it if needed), or of a user's
    ``file:PATH`` dataset (refused if its SHA-256 is not ``sha256``, when given).

    ``n`` and ``subset``/``seed`` choose the rows (see :func:`select_indices`); ``binarize`` optionally
    binarises the pixels (see :func:`binarize_pixels`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if user_dataset.is_file_dataset(dataset):
        name = user_dataset.normalise(dataset)
        arrays = user_dataset.read(name, sha256)
        images, labels = arrays.images[split], arrays.labels[split]
    else:
        name = get_dataset(dataset).name
        images, labels = load_arrays(name, split, data_dir=Path(data_dir) if data_dir else None)
    rows = select_indices(images.shape[0], n, subset, seed)
    pixels = torch.from_numpy(np.ascontiguousarray(images[rows].reshape(len(rows), -1))).to(torch.float32)
    if images.dtype == np.uint8:
        pixels = pixels.div_(255.0)
    pixels = binarize_pixels(pixels, binarize, threshold, binarize_seed)
    return Split(
        dataset=name,
        split=split,
        images=pixels,
        labels=torch.from_numpy(labels[rows].astype(np.int64)),
        indices=torch.from_numpy(rows.astype(np.int64)),
    )


def load_run_split(data, split: str, n: int | None = None) -> Split:
    """The images a run with data config ``data`` (a :class:`~amortized_bayes.config.DataConfig`)
    trains or is tested on: ``"train"``, its training subset (``n_train`` rows chosen by ``subset`` and
    ``subset_seed``); ``"test"``, the first ``n_test`` test images, binarised with ``binarize_seed`` + 1
    so that train and test draw different pixels. ``n`` replaces ``n_test`` for the test split (the
    training subset is always the run's). A ``file:`` dataset must still have the SHA-256 the run
    recorded. Training, ``gap`` and the report's reconstructions all read a run's images here."""
    if split == "train":
        return load_split(data.dataset, "train", n=data.n_train, subset=data.subset, seed=data.subset_seed,
                          binarize=data.binarize, binarize_seed=data.binarize_seed, sha256=data.file_sha256)
    if split == "test":
        return load_split(data.dataset, "test", n=data.n_test if n is None else n, binarize=data.binarize,
                          binarize_seed=data.binarize_seed + 1, sha256=data.file_sha256)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
