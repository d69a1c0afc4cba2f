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
    TruncatedIDXError,
    UnexpectedShapeError,
    UnknownDatasetError,
)
from .idx import parse_idx, read_idx
from .loading import Split, binarize_pixels, load_split, select_indices
from .registry import DATASETS, SPLITS, DatasetSpec, FileSpec, get_dataset
from .store import describe, load_arrays, resolve, verify_cached

__all__ = [
    "BadMagicError", "ChecksumMismatchError", "CorruptGzipError", "DataError", "DataNotFoundError",
    "HeaderSizeMismatchError", "IDXFormatError", "TruncatedIDXError", "UnexpectedShapeError",
    "UnknownDatasetError", "parse_idx", "read_idx", "Split", "binarize_pixels", "load_split",
    "select_indices", "DATASETS", "SPLITS", "DatasetSpec", "FileSpec", "get_dataset", "describe",
    "load_arrays", "resolve", "verify_cached",
]
