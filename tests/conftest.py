"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the cache at an empty temp folder, forbid network sources, ignore the user's data env."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AMORTIZED_BAYES_CACHE", str(cache))
    monkeypatch.setenv("AMORTIZED_BAYES_OFFLINE", "1")
    monkeypatch.delenv("AMORTIZED_BAYES_DATA", raising=False)
    return cache
