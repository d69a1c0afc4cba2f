"""Test helpers: IDX bytes written independently of the package, and a tiny dataset spec."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from amortized_bayes.data.registry import DatasetSpec, FileSpec

TYPE_CODES = {("u", 1): 0x08, ("i", 1): 0x09, ("i", 2): 0x0B, ("i", 4): 0x0C, ("f", 4): 0x0D, ("f", 8): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of ``array`` written with struct and numpy only (not with the package)."""
    code = TYPE_CODES[(array.dtype.kind, array.dtype.itemsize)]
    big = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes(order="C")


def tiny_dataset(name: str = "tiny", n_train: int = 5, n_test: int = 3, seed: int = 0):
    """A DatasetSpec of small random images/labels and the raw bytes of each of its files."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, bytes] = {}
    files = []
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for kind, arr, fname in (("images", images, f"{prefix}-images-idx3-ubyte"),
                                 ("labels", labels, f"{prefix}-labels-idx1-ubyte")):
            data = idx_bytes(arr)
            blobs[fname] = data
            files.append(FileSpec(fname, split, kind, arr.shape, hashlib.sha256(data).hexdigest(), len(data)))
    spec = DatasetSpec(name=name, title="tiny test set", files=tuple(files), mirrors=("http://127.0.0.1:9/",),
                       local_installs=())
    return spec, blobs


def write_files(folder: Path, blobs: dict[str, bytes], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


