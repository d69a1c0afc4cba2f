"""Errors raised by the data layer.

Every error names the file (or dataset) it is about and says what is wrong, so that a user can act on
it without reading a traceback. They all derive from :class:`DataError`.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of every data-layer error."""


class IDXFormatError(DataError):
    """The bytes are not a well-formed IDX file (base class of the specific format errors)."""


class TruncatedIDXError(IDXFormatError):
    """The file is shorter than its header says (or too short to hold a header at all)."""


class BadMagicError(IDXFormatError):
    """The first four bytes are not an IDX magic number (two zero bytes, a type code, a rank)."""


class HeaderSizeMismatchError(IDXFormatError):
    """The file holds more bytes than its header's dimensions account for."""


class CorruptGzipError(IDXFormatError):
    """The file starts like gzip but does not decompress."""


class UnexpectedShapeError(IDXFormatError):
    """A well-formed IDX file whose dtype or dimensions are not what the dataset needs."""


class ChecksumMismatchError(DataError):
    """The decompressed bytes do not have the registered SHA-256."""


class DataNotFoundError(DataError):
    """No source could supply a file; the message lists what was tried and how to supply it."""


class UnknownDatasetError(DataError, ValueError):
    """A dataset or split name that the registry does not know."""


class ImageInputError(DataError):
    """A user's image file or folder cannot be used as it is (unreadable, wrong shape, values out of range)."""
