"""Where the tool keeps things on disk. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "AMORTIZED_BAYES_CACHE"
DATA_ENV = "AMORTIZED_BAYES_DATA"
OFFLINE_ENV = "AMORTIZED_BAYES_OFFLINE"


def cache_dir() -> Path:
    """The tool's cache: ``$AMORTIZED_BAYES_CACHE``, else ``$XDG_CACHE_HOME/amortized-bayes``, else
    ``~/.cache/amortized-bayes`` (the XDG default)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "amortized-bayes"


def data_cache_dir(dataset: str) -> Path:
    """The cache folder of one dataset's verified, decompressed IDX files."""
    return cache_dir() / "data" / dataset


def user_data_dir() -> Path | None:
    """The folder named by ``$AMORTIZED_BAYES_DATA``, if set."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def offline() -> bool:
    """True when ``$AMORTIZED_BAYES_OFFLINE`` asks to skip the network sources (mirrors, registries)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")
