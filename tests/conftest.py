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


def pytest_collection_modifyitems(config, items):
    """Under mutation testing only (mutmut sets MUTANT_UNDER_TEST and runs in mutants/, beside its
    mutmut-stats.json): run each mutant's tests fastest first. mutmut stops at the first failure (-x)
    but passes the tests in set order, so a mutant that a 0.1 s test kills often waited for a 110 s
    gap test first; the slow tests still run for every mutant the fast ones miss."""
    import json
    import math
    import os
    from pathlib import Path

    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, math.inf))
