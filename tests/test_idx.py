"""The IDX reader against files written independently with numpy/struct, and against damaged bytes."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortized_bayes.data import (
    BadMagicError,
    CorruptGzipError,
    HeaderSizeMismatchError,
    IDXFormatError,
    TruncatedIDXError,
    parse_idx,
    read_idx,
)

from .helpers import idx_bytes


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("shape", [(7,), (4, 28, 28), (2, 3, 5, 1)])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(data) if compress else data)
    back = read_idx(path)
    assert back.shape == shape
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array.astype(np.dtype(dtype).newbyteorder("=")))


def test_gzip_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "no-extension"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path), array)


GOOD = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)


@pytest.mark.parametrize(
    "data, error, words",
    [
        (GOOD[:3], TruncatedIDXError, "too short for an IDX header"),
        (GOOD[:10], TruncatedIDXError, "too short for a rank-3 IDX header"),
        (GOOD[:-1], TruncatedIDXError, "truncated"),
        (GOOD[: len(GOOD) // 2], TruncatedIDXError, "truncated"),
        (b"\x01" + GOOD[1:], BadMagicError, "bad magic number"),
        (GOOD[:2] + b"\x42" + GOOD[3:], BadMagicError, "unknown element type 0x42"),
        (GOOD[:3] + b"\x00" + GOOD[4:], BadMagicError, "rank 0"),
        (GOOD + b"\x00", HeaderSizeMismatchError, "accounts for 1568 data bytes, file has 1569"),
        (GOOD[:4] + b"\x00\x00\x00\x00" + GOOD[8:], HeaderSizeMismatchError, "zero dimension"),
        (gzip.compress(GOOD)[:-12], CorruptGzipError, "truncated"),
        (gzip.compress(GOOD)[:20] + b"\xff" * 30 + gzip.compress(GOOD)[50:], CorruptGzipError, "corrupt"),
    ],
    ids=["3-bytes", "short-header", "one-byte-short", "half", "magic", "type", "rank0", "extra-byte",
         "zero-dim", "gzip-truncated", "gzip-garbled"],
)
def test_malformed_inputs_each_get_their_own_error(tmp_path, data, error, words):
    path = tmp_path / "bad-file"
    path.write_bytes(data)
    with pytest.raises(error) as info:
        read_idx(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)  # the error names the file


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_array_or_a_clear_error(data):
    _check_reader_total(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x0A, 0xFF]),
    st.lists(st.integers(0, 6), min_size=0, max_size=4),
    st.binary(max_size=200),
    st.booleans(),
)
def test_near_valid_headers_give_an_array_or_a_clear_error(code, dims, payload, compress):
    header = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    data = header + payload
    _check_reader_total(gzip.compress(data) if compress else data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 200))
def test_damaged_gzip_gives_an_array_or_a_clear_error(noise, cut):
    blob = gzip.compress(GOOD)
    _check_reader_total(blob[:cut] + noise + blob[cut + len(noise):])


def _check_reader_total(data: bytes) -> None:
    try:
        array = parse_idx(data)
    except IDXFormatError as exc:
        assert str(exc)
        return
    assert isinstance(array, np.ndarray)
    assert array.ndim >= 1 and all(d > 0 for d in array.shape)
