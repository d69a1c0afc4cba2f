"""Data layer (SPEC §8): verified MNIST and Fashion-MNIST from a chain of sources.

Typical use::

    from amortized_bayes.data import load_split
    train = load_split("mnist", "train", n=10_000)   # train.images: (10000, 784) float32 in [0, 1]
"""

from .errors import (
    BadMagicError,
    ChecksumMismatchError,
    CorruptGzipError,
    DataError,
    DataNotFoundError,
    HeaderSizeMismatchError,
    IDXFormatError,
    ImageInputError,
    TruncatedIDXError,
    UnexpectedShapeError,
    UnknownDatasetError,
)
from .idx import parse_idx, read_idx
from .registry import DATASETS, SPLITS, DatasetSpec, FileSpec, get_dataset
from .store import describe, load_arrays, resolve, verify_cached

# The loading API returns torch tensors: imported on first use, so that the command line (`data`,
# `status`, `list`, argument errors) starts without paying for torch (about 2.3 s here).
_LOADING = ("Split", "binarize_pixels", "load_run_split", "load_split", "select_indices")


def __getattr__(name: str):
    if name in _LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BadMagicError", "ChecksumMismatchError", "CorruptGzipError", "DataError", "DataNotFoundError",
    "HeaderSizeMismatchError", "IDXFormatError", "ImageInputError", "TruncatedIDXError", "UnexpectedShapeError",
    "UnknownDatasetError", "parse_idx", "read_idx", "Split", "binarize_pixels", "load_run_split", "load_split",
    "select_indices", "DATASETS", "SPLITS", "DatasetSpec", "FileSpec", "get_dataset", "describe",
    "load_arrays", "resolve", "verify_cached",
]
