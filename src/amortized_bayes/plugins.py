"""Code from outside the package: modules that register families (or other extensions) on import.

Two ways for a module to be found by every process that reads a run (the planner, its worker
processes, ``gap``, ``report``, Ray tasks on other nodes):

- an entry point in the group ``amortized_bayes.plugins`` of an installed distribution
  (``[project.entry-points."amortized_bayes.plugins"] lowrank = "mypkg.lowrank"``): loaded the first
  time a name is not found among the registered ones;
- a grid file's ``plugins = ["lowrank.py", "mypkg.lowrank"]``: a file path (relative to the grid file)
  or a dotted module name, recorded in every run's config (``RunConfig.plugins``) and imported before
  that config is read.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

from .config import ConfigError

T = TypeVar("T")

ENTRY_POINT_GROUP = "amortized_bayes.plugins"


def is_file_plugin(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_plugin(spec: str, base: Path) -> str:
    """``spec`` as a grid file recorded it: a file path made absolute against ``base`` (the grid file's
    folder), a module name unchanged."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"plugins: each entry must be a file path or a module name, got {spec!r}")
    spec = spec.strip()
    if is_file_plugin(spec):
        path = (base / spec).resolve()
        if not path.is_file():
            raise ConfigError(f"plugins: {spec!r}: no such file ({path})")
        return str(path)
    return spec


def import_plugin(spec: str) -> ModuleType:
    """Import one plugin (a ``.py`` file path or a dotted module name), once per process."""
    try:
        if not is_file_plugin(spec):
            return importlib.import_module(spec)
        path = Path(spec)
        # One module name per file, so that two plugins with the same file name do not collide.
        module_name = f"amortized_bayes_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        if not path.is_file():
            raise ConfigError(f"plugins: {spec!r}: no such file")
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(f"plugins: cannot import {spec!r}: {exc}") from None


def import_plugins(specs) -> None:
    if isinstance(specs, str) or not isinstance(specs, (list, tuple)):
        raise ConfigError(f"plugins: must be a list of file paths or module names, got {specs!r}")
    for spec in specs:
        if not isinstance(spec, str):
            raise ConfigError(f"plugins: each entry must be a file path or a module name, got {spec!r}")
        import_plugin(spec)


_entry_points_loaded = False


def load_entry_points() -> None:
    """Import every module or object of the ``amortized_bayes.plugins`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must say which one it is
            raise ConfigError(f"plugin entry point {point.name} = {point.value!r} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc


class Registry(dict, Generic[T]):
    """Name -> a registered family class, likelihood or objective. A name not registered is looked for
    once in the plugins' entry points before it is refused, with the config field named."""

    def __init__(self, what: str, field: str):
        super().__init__()
        self.what, self.field = what, field

    def lookup(self, name: str) -> T:
        if name not in self:
            load_entry_points()
        if name not in self:
            raise ConfigError(f"{self.field}: unknown {self.what} {name!r}; known: {', '.join(self)} (one defined "
                              f"elsewhere needs the grid file's plugins = [...] or an entry point in the group "
                              f"{ENTRY_POINT_GROUP})")
        return self[name]

    def everything(self) -> dict[str, T]:
        """Every registered entry, the plugins' entry points loaded first."""
        load_entry_points()
        return dict(self)
