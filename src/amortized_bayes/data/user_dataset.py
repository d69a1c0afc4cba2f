"""A user's own images as a dataset: ``data.dataset = "file:PATH"`` names an ``.npz`` with a ``train``
and a ``test`` array of images (uint8 0-255, or floats in [0, 1]; any H x W, as (N, H, W), or
(N, H*W) when the images are square) and optionally ``train_labels`` and ``test_labels``.

The run's config records the file's SHA-256 and image shape, so that the run id changes when the file
does and a stored run refuses to resume or be measured on a file that changed under it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

PREFIX = "file:"
LABEL_LIMIT = 40


class UserDatasetError(DataError):
    """A ``file:`` dataset that cannot be used: missing, unreadable, malformed, or changed since the run."""


def is_file_dataset(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def normalise(name: str) -> str:
    """``file:PATH`` with PATH absolute (relative to the working directory) and ``~`` expanded, so that
    worker processes and later commands find the same file."""
    path = name[len(PREFIX):].strip()
    if not path:
        raise UserDatasetError("a file dataset needs a path: file:PATH.npz")
    return PREFIX + str(Path(path).expanduser().resolve())


def path_of(name: str) -> Path:
    return Path(name[len(PREFIX):])


def label(name: str) -> str:
    """A short name for run ids, folders and figure titles: ``file-`` and the file's stem, with anything
    outside letters, digits, '.', '_' and '-' replaced by '-'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path_of(name).stem).strip("-.") or "data"
    return "file-" + stem[:LABEL_LIMIT]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserDatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()


@dataclass(frozen=True)
class UserArrays:
    """The validated contents: images (N, H, W) as stored (uint8 or float32) and labels (N,) int64
    (zeros where the file has none), per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    shape: tuple[int, int]
    sha256: str


def _images(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    if array.ndim == 2:
        side = math.isqrt(array.shape[1])
        if side * side != array.shape[1]:
            raise UserDatasetError(f"{path}: '{key}' is flat ({array.shape}) and {array.shape[1]} is not a square; "
                                   "store it as (N, H, W)")
        array = array.reshape(array.shape[0], side, side)
    if array.ndim != 3 or min(array.shape) < 1:
        raise UserDatasetError(f"{path}: '{key}' must be (N, H, W) images, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise UserDatasetError(f"{path}: '{key}' holds {array.dtype}; store uint8 (0-255) or floats in [0, 1]")
    out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise UserDatasetError(f"{path}: '{key}' holds NaN or infinite values")
    low, high = float(out.min()), float(out.max())
    if low < 0 or high > 1:
        raise UserDatasetError(f"{path}: '{key}' holds values in [{low:.4g}, {high:.4g}]; floats must lie in [0, 1] "
                               "(or store uint8 0-255)")
    return out


def read(name: str, expected_sha256: str | None = None) -> UserArrays:
    """Read and check the ``.npz`` of ``name`` (``file:PATH``). With ``expected_sha256``, a file whose
    contents changed since the run was planned is refused."""
    path = path_of(name)
    if not path.is_file():
        raise UserDatasetError(f"{path}: no such file (data.dataset = {name!r})")
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserDatasetError(f"{path} changed since the run was planned (SHA-256 {digest[:12]}..., the run "
                               f"recorded {expected_sha256[:12]}...); restore the file or start a new run")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserDatasetError(f"{path}: not a readable .npz ({exc})") from None
    missing = [k for k in ("train", "test") if k not in arrays]
    if missing:
        raise UserDatasetError(f"{path}: needs arrays 'train' and 'test' (it holds {', '.join(arrays) or 'none'})")
    images = {split: _images(arrays[split], split, path) for split in ("train", "test")}
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise UserDatasetError(f"{path}: train images are {images['train'].shape[1:]} and test images "
                               f"{images['test'].shape[1:]}; they must be the same size")
    labels = {}
    for split in ("train", "test"):
        given = arrays.get(f"{split}_labels")
        if given is None:
            labels[split] = np.zeros(images[split].shape[0], np.int64)
            continue
        if given.shape != (images[split].shape[0],) or given.dtype.kind not in "iu":
            raise UserDatasetError(f"{path}: '{split}_labels' must be {images[split].shape[0]} integers, got "
                                   f"{given.dtype} of shape {given.shape}")
        labels[split] = given.astype(np.int64)
    h, w = images["train"].shape[1:]
    return UserArrays(images, labels, (int(h), int(w)), digest)


@dataclass(frozen=True)
class FileSummary:
    sha256: str
    shape: tuple[int, int]
    sizes: dict[str, int]


def inspect(name: str) -> FileSummary:
    """SHA-256, image shape and split sizes of a checked file, read once per (path, size, mtime) in a
    process: a grid expands one config per run, each of which asks."""
    path = path_of(name)
    try:
        stat = path.stat()
    except OSError:
        raise UserDatasetError(f"{path}: no such file (data.dataset = {name!r})") from None
    return _summary(name, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _summary(name: str, size: int, mtime_ns: int) -> FileSummary:
    arrays = read(name)
    return FileSummary(arrays.sha256, arrays.shape, {split: int(a.shape[0]) for split, a in arrays.images.items()})


def test_split_size(data) -> int:
    """Images in the test split of ``data`` (a DataConfig): 10,000 for MNIST and Fashion-MNIST."""
    return inspect(data.dataset).sizes["test"] if data.is_file else 10_000


def describe(name: str) -> list[dict]:
    """``data info`` rows for a file dataset: per split, count, image shape, type, pixel mean."""
    arrays = read(name)
    rows = []
    for split in ("train", "test"):
        images = arrays.images[split]
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        rows.append({"dataset": label(name), "file": str(path_of(name)), "split": split, "kind": "images",
                     "source": "your file", "path": str(path_of(name)), "bytes": path_of(name).stat().st_size,
                     "sha256": arrays.sha256, "count": int(images.shape[0]),
                     "shape": f"{arrays.shape[0]}x{arrays.shape[1]}", "dtype": str(images.dtype),
                     "pixel_mean": float(images.mean(dtype=np.float64) / scale)})
    return rows
