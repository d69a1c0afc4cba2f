"""Runs and grids (SPEC §6): stable run ids, grid expansion, overrides, grid files.

A grid is a base config (any :class:`~amortized_bayes.config.RunConfig` fields, as nested tables),
``axes`` (dotted field -> list of values, crossed: every combination), and optional ``variants``
(a list of override tables, crossed with the axes; handy for "A-VI at these widths, plus F-VI and
constant-VI"). Expansion validates every run before anything runs and drops duplicates: fields a family
does not use (an encoder's width for F-VI, say) are reset to their defaults before hashing, so they
cannot create distinct copies of the same run.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig, RunConfig, check_safe_name

def canonical(config: RunConfig) -> RunConfig:
    """``config`` as it is stored and hashed. A family's config holds only the fields that family uses
    (an encoder's width given to F-VI is dropped when the config is built); the decoder's shape fields
    that its architecture does not read (``hidden`` for a conv decoder, ``channels`` for an MLP) are reset
    to their defaults here, so that neither splits a grid into runs that are the same run."""
    from ..model import DecoderNetwork, get_architecture

    model = config.model
    unused = DecoderNetwork.SHAPE_FIELDS - get_architecture(model.architecture).config_fields
    defaults = ModelConfig()
    reset = {name: getattr(defaults, name) for name in unused if getattr(model, name) != getattr(defaults, name)}
    return replace(config, model=replace(model, **reset)) if reset else config


def _non_default(raw: dict, defaults: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            sub = _non_default(value, defaults.get(key, {}))
            if sub:
                out[key] = sub
        elif key not in defaults or value != defaults[key]:
            out[key] = value
    return out


def run_hash(config: RunConfig) -> str:
    """SHA-256 (first 10 hex digits) of the canonical config's fields that differ from their defaults,
    as sorted, compact JSON. Leaving defaults out keeps ids stable when a later version adds a field."""
    raw = canonical(config).to_dict()
    del raw["plugins"]  # where the code is found, not what the run is
    defaults = RunConfig().to_dict()
    # The family's fields against its own config's defaults (name: against the default family's), which
    # are the values the single family table of earlier versions had: ids stay as they were.
    defaults["family"] = {**type(config.family)(name=config.family.name).__dict__, "name": defaults["family"]["name"]}
    changed = _non_default(raw, defaults)
    text = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def describe_run(config: RunConfig) -> str:
    """A short human label: dataset, family (and its width/depth), objective if not the default, seed."""
    from ..families import get_family

    c = canonical(config)
    parts = [c.data.label, get_family(c.family.name).short_id(c.family)]
    if c.model.architecture != "mlp":
        parts.append(f"{c.model.architecture}dec")
    if c.objective.kind != "elbo":
        parts.append(c.objective.kind)
    parts.append(f"s{c.train.seed}")
    return "-".join(parts)


def run_id(config: RunConfig) -> str:
    """The stable id of a run: its label and the hash of its canonical config. It names the run's
    folder, so it is checked against :data:`~amortized_bayes.config.SAFE_NAME` (a family registered
    under a name with a '/' cannot escape the results folder)."""
    return check_safe_name(f"{describe_run(config)}-{run_hash(config)}", "run id")


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b]... = value`` for ``dotted`` = "a.b...", refusing unknown fields by name."""
    keys = dotted.split(".")
    probe: Any = RunConfig().to_dict()
    if keys[0] == "family" and len(keys) == 2:
        from ..families import family_field_names

        # Any registered family's field: which family a run has is known only when its table is complete.
        probe["family"] = dict.fromkeys(family_field_names())
    for k in keys:
        if not isinstance(probe, dict) or k not in probe:
            raise ConfigError(f"{dotted}: unknown field")
        probe = probe[k]
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Grid:
    """A named grid: ``base`` (nested dict of RunConfig fields), ``axes`` (dotted field -> values,
    crossed), ``variants`` (override dicts, crossed with the axes), and a description."""

    name: str
    base: dict = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)
    description: str = ""
    # For the report: the metric and, per dataset, the tolerance of iterations_to_tolerance.
    tolerance: dict = field(default_factory=lambda: {"metric": "train_mse"})

    def __post_init__(self):
        check_safe_name(self.name, "grid name")
        if not isinstance(self.base, dict):
            raise ConfigError(f"grid {self.name}: base must be a table of config fields, got {self.base!r}")
        if not isinstance(self.axes, dict):
            raise ConfigError(f"grid {self.name}: axes must be a table (dotted field = [values]), got {self.axes!r}")
        if not isinstance(self.variants, list) or not all(isinstance(v, dict) for v in self.variants):
            raise ConfigError(f"grid {self.name}: variants must be a list of tables, got {self.variants!r}")
        if not isinstance(self.tolerance, dict):
            raise ConfigError(f"grid {self.name}: tolerance must be a table, got {self.tolerance!r}")

    def with_overrides(self, overrides: dict[str, Any]) -> Grid:
        """A copy with ``overrides`` (dotted field -> value, or list of values for an axis) applied.
        An override replaces the field everywhere: in the base, as an axis, and in the variants."""
        grid = copy.deepcopy(self)
        for key, value in overrides.items():
            set_path({}, key, None)  # refuses unknown fields
            grid.axes.pop(key, None)
            for variant in grid.variants:
                flat = flatten(variant)
                if key in flat:
                    variant.clear()
                    for k, v in flat.items():
                        if k != key:
                            set_path(variant, k, v)
            if isinstance(value, list):
                grid.axes[key] = value
            else:
                set_path(grid.base, key, value)
        grid.variants = [v for v in grid.variants if v] or []
        return grid

    def expand(self) -> list[RunConfig]:
        """Every run of the grid, validated, duplicates removed, in a stable order."""
        keys = list(self.axes)
        for key in keys:
            if not isinstance(self.axes[key], list) or not self.axes[key]:
                raise ConfigError(f"grid {self.name}: axis {key} must be a non-empty list of values, "
                                  f"got {self.axes[key]!r}")
        combos = list(itertools.product(*(self.axes[k] for k in keys))) if keys else [()]
        if self.base.get("plugins"):
            from ..plugins import import_plugins

            import_plugins(self.base["plugins"])
        variants = self.variants or [{}]
        runs: dict[str, RunConfig] = {}
        for variant in variants:
            for combo in combos:
                raw = copy.deepcopy(self.base)
                for k, v in flatten(variant).items():
                    set_path(raw, k, v)
                for k, v in zip(keys, combo):
                    set_path(raw, k, v)
                try:
                    config = RunConfig.from_dict(raw)
                except TypeError as exc:
                    raise ConfigError(f"grid {self.name}: {exc}") from None
                run_id(config)  # a safe folder name, checked before anything is written
                runs.setdefault(run_hash(config), config)
        return list(runs.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "base": self.base, "axes": self.axes,
                "variants": self.variants, "tolerance": self.tolerance}


def parse_value(text: str) -> Any:
    """A command-line value: JSON (numbers, true/false, null, [lists], "strings"), 'none', or a bare
    string. A top-level comma makes a list (an axis): ``1,64,128``."""
    text = text.strip()
    if "," in text and not text.startswith("["):
        return [parse_value(part) for part in text.split(",")]
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["train.epochs=5", "family.width=1,64"]`` -> ``{"train.epochs": 5, "family.width": [1, 64]}``.
    ``flag`` names the option in the error message (``--set``, ``--only``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE (e.g. train.epochs=5)")
        key, value = item.split("=", 1)
        key = key.strip()
        set_path({}, key, None)
        out[key] = parse_value(value)
    return out


def select_runs(configs: list[RunConfig], criteria: dict[str, Any]) -> list[RunConfig]:
    """The runs of ``configs`` (in their order) whose fields equal every criterion: dotted field ->
    value, or a list of values any of which matches (``--only data.dataset=mnist``). Unlike an override,
    a selection changes no run, so the selected runs keep the run ids they have in the whole grid (a
    dataset's runs of one seed, run first and stored with the others). A run without the field (a
    family that has no ``width``) does not match. A criterion that no run meets is an error that lists
    the values the runs have, since an empty selection is always a typo."""
    selected = list(configs)
    for key, wanted in criteria.items():
        set_path({}, key, None)  # refuses unknown fields
        allowed = wanted if isinstance(wanted, list) else [wanted]
        values = [flatten(c.to_dict()).get(key, _MISSING) for c in selected]
        kept = [c for c, v in zip(selected, values) if v is not _MISSING and any(_same(v, a) for a in allowed)]
        if not kept:
            present = sorted({repr(v) for v in values if v is not _MISSING})
            raise ConfigError(f"--only {key}={wanted!r}: no run has it; the runs have "
                              f"{', '.join(present) if present else 'no such field'}")
        selected = kept
    return selected


_MISSING = object()


def _same(value: Any, wanted: Any) -> bool:
    """Equal as a config value: 64 matches 64.0, but ``false`` does not match seed 0."""
    return value == wanted and isinstance(value, bool) == isinstance(wanted, bool)


def load_grid_file(path: str | Path) -> Grid:
    """Read a grid from TOML (``.toml``), JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: grid files are .toml, .json or .yaml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the grid file ({exc.strerror if isinstance(exc, OSError) else exc})"
                          ) from None
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(f"{path}: YAML grid files need PyYAML (pip install pyyaml), or use TOML") from None
            raw = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - each parser has its own error type; all mean "malformed"
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid file must hold a table (name, base, axes, variants, tolerance), "
                          f"got {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "base", "axes", "variants", "tolerance", "plugins"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} "
                          "(known: name, description, base, axes, variants, tolerance, plugins)")
    base = raw.get("base", {})
    plugins = raw.get("plugins", [])
    if isinstance(base, dict) and "plugins" in base:
        plugins = [*plugins, *base["plugins"]] if isinstance(base["plugins"], list) else base["plugins"]
    if plugins:
        from ..plugins import import_plugins, resolve_plugin

        if not isinstance(plugins, list):
            raise ConfigError(f"{path}: plugins must be a list of file paths or module names, got {plugins!r}")
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: base must be a table of config fields, got {base!r}")
        # File paths relative to the grid file, made absolute: every run's config records where its
        # family's code is, for the worker processes that read it.
        base = {**base, "plugins": [resolve_plugin(p, path.parent) for p in plugins]}
        import_plugins(base["plugins"])  # their families' fields may be set below
    axes = raw.get("axes", {})
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: axes must be a table (dotted field = [values]), got {type(axes).__name__}")
    for key, values in axes.items():
        set_path({}, key, None)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list")
    # Without a name, the file's stem, made a safe folder name.
    default_name = re.sub(r"[^A-Za-z0-9._+-]+", "-", path.stem).strip(".-") or "grid"
    grid = Grid(name=raw.get("name", default_name), base=base, axes=axes,
                variants=raw.get("variants", []), description=raw.get("description", ""),
                tolerance=raw.get("tolerance", {"metric": "train_mse"}))
    grid.expand()  # validate now, with the file named
    return grid
