"""Reader for the IDX format of MNIST-style datasets (raw or gzip-compressed).

An IDX file is a 4-byte magic number ``00 00 TT RR`` (TT: element type code, RR: rank), then RR
big-endian uint32 dimensions, then the elements in C order, big-endian. The reader checks the magic
number, that every dimension is positive, and that the file holds exactly the bytes the header
promises; any violation raises a subclass of :class:`~amortized_bayes.data.errors.IDXFormatError`
and never another exception type.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .errors import (
    BadMagicError,
    CorruptGzipError,
    DataError,
    HeaderSizeMismatchError,
    TruncatedIDXError,
)

GZIP_MAGIC = b"\x1f\x8b"

# IDX element type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# MNIST's largest file decompresses to 47 MB; refusing anything far beyond that keeps a corrupt or
# hostile gzip member from filling memory before the size check could reject it.
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024


def decompress_if_gzip(data: bytes, name: str = "<bytes>") -> bytes:
    """Return ``data`` unchanged, or its gzip-decompressed content if it starts with the gzip magic.

    Raises :class:`CorruptGzipError` when the stream is damaged or truncated.
    """
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out = decompressor.decompress(data, MAX_DECOMPRESSED_BYTES)
        if decompressor.unconsumed_tail:
            raise CorruptGzipError(
                f"{name}: gzip content exceeds {MAX_DECOMPRESSED_BYTES} bytes; not an MNIST-sized IDX file"
            )
        out += decompressor.flush()
        if not decompressor.eof:
            raise CorruptGzipError(f"{name}: gzip stream is truncated (ends before its end marker)")
    except zlib.error as exc:
        raise CorruptGzipError(f"{name}: gzip stream is corrupt ({exc})") from None
    return out


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (raw or gzipped) into a native-endian numpy array.

    ``name`` is used in error messages only. The returned array owns its memory.
    """
    raw = decompress_if_gzip(data, name)
    if len(raw) < 4:
        raise TruncatedIDXError(f"{name}: {len(raw)} bytes, too short for an IDX header (needs >= 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise BadMagicError(
            f"{name}: bad magic number 0x{raw[:4].hex()} (an IDX file starts with two zero bytes)"
        )
    type_code, rank = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise BadMagicError(f"{name}: bad magic number 0x{raw[:4].hex()} (unknown element type 0x{type_code:02x})")
    if rank == 0:
        raise BadMagicError(f"{name}: bad magic number 0x{raw[:4].hex()} (rank 0)")
    header_len = 4 + 4 * rank
    if len(raw) < header_len:
        raise TruncatedIDXError(
            f"{name}: {len(raw)} bytes, too short for a rank-{rank} IDX header ({header_len} bytes)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    if any(d == 0 for d in dims):
        raise HeaderSizeMismatchError(f"{name}: header declares a zero dimension {dims}")
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise TruncatedIDXError(
            f"{name}: truncated: header {dims} of {dtype.name} needs {expected} data bytes, file has {actual}"
        )
    if actual > expected:
        raise HeaderSizeMismatchError(
            f"{name}: header {dims} of {dtype.name} accounts for {expected} data bytes, file has {actual}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped, detected by content) into a numpy array."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_idx(data, str(path))
