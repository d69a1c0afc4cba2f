"""Hostile and mistaken values for every field, on the command line and in grid files (issue 19): each
is either a valid config or refused with one ConfigError naming the field, before anything is written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amortized_bayes.config import SAFE_NAME, ConfigError, RunConfig
from amortized_bayes.experiments.grid import Grid, flatten, load_grid_file, run_id

KEYS = sorted(flatten(RunConfig().to_dict()))

hostile_text = st.one_of(
    st.sampled_from(["/../../../escaped", "..", "a/b", "\x00", "mnist\x00", "", " ", "~", "$HOME", "C:\\x",
                     "fashion-mnist/../x", "NaN", "Infinity", "10**12", "1e1", "2.5", "-1", "MNIST", "fmnist"]),
    st.text(max_size=12),
)
hostile_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, -3, 2.5, 1e1, 10**12, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30]),
)
hostile = st.one_of(hostile_text, hostile_number, st.booleans(), st.none(),
                    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2))


def expand_or_refuse(overrides: dict):
    try:
        configs = Grid(name="hostile").with_overrides(overrides).expand()
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        return None
    for config in configs:
        rid = run_id(config)
        assert SAFE_NAME.fullmatch(rid) and ".." not in rid and "/" not in rid
        for value in flatten(config.to_dict()).values():
            assert not (isinstance(value, float) and not math.isfinite(value))
    return configs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=hostile)
def test_every_field_takes_a_valid_value_or_refuses_it(key, value):
    expand_or_refuse({key: value})


@pytest.mark.parametrize("key, value", [
    ("train.seed", "/../../../escaped"), ("train.epochs", 2.5), ("data.n_train", 1e1), ("family.width", "10**12"),
    ("family.width", 10**12), ("train.lr", float("inf")), ("model.obs_var", float("inf")),
    ("train.test_inference.rtol", float("nan")), ("train.test_inference.num_samples", -3),
    ("data.subset_seed", -1), ("data.dataset", 5), ("train.seed", []), ("train.device", "cuda/../x"),
])
def test_the_reported_probes_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        Grid(name="probe").with_overrides({key: value}).expand()


def test_aliases_and_case_of_a_dataset_make_one_run():
    configs = Grid(name="alias").with_overrides({"data.dataset": ["mnist", "MNIST", "MniST"]}).expand()
    assert len(configs) == 1 and configs[0].data.dataset == "mnist"
    fashion = Grid(name="alias").with_overrides({"data.dataset": ["fmnist", "fashion-mnist", "Fashion_MNIST"]})
    assert len(fashion.expand()) == 1


@pytest.mark.parametrize("name", ["/abs/path", "../up", "a/b", "", ".hidden", "x" * 101])
def test_unsafe_grid_names_are_refused(name):
    with pytest.raises(ConfigError) as refused:
        Grid(name=name)
    assert str(refused.value) == ("grid name: must be 1-100 letters, digits, '.', '_', '+' or '-', not starting "
                                  f"with '.' and without '..'; got {name!r}")


@pytest.mark.parametrize("suffix, text, match", [
    (".toml", "name = [", "not valid TOML"), (".json", "{", "not valid JSON"), (".yaml", "", "must hold a table"),
    (".toml", 'axes = ["train.seed"]', "axes must be a table"), (".json", "[1, 2]", "must hold a table"),
    (".toml", 'name = "../x"', "grid name"), (".toml", '[axes]\n"train.seed" = []', "non-empty list"),
    (".toml", '[base.train]\nseed = "x"', "train.seed"),
])
def test_malformed_grid_files_are_refused_in_one_line(tmp_path, suffix, text, match):
    path = tmp_path / f"grid{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_grid_file(path)


def test_a_missing_grid_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_grid_file(tmp_path / "nope.toml")


@pytest.mark.parametrize("args", [
    ["--preset", "quick", "--set", "train.seed=/../../../escaped"],
    ["--preset", "quick", "--set", "train.epochs=2.5"],
    ["--preset", "quick", "--set", "train.lr=Infinity"],
    ["--preset", "quick", "--set", "data.dataset=5"],
    ["GRID_MISSING"],
])
@pytest.mark.processes
def test_the_cli_refuses_with_exit_2_and_writes_nothing(tmp_path, args):
    args = [str(tmp_path / "missing.toml") if a == "GRID_MISSING" else a for a in args]
    out = tmp_path / "o" / "out"
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "run", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if args[0] != str(tmp_path / "missing.toml") else [])


def _grid_file(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, message", [
    ("g.toml", "zeta = 1\nalpha = 2\nname = 'g'",
     "unknown top-level key 'alpha' (known: name, description, base, axes, variants, tolerance, plugins)"),
    ("g.json", "[1, 2]", "a grid file must hold a table (name, base, axes, variants, tolerance), got list"),
    ("g.json", '"text"', "a grid file must hold a table (name, base, axes, variants, tolerance), got str"),
    ("g.toml", 'axes = ["train.seed"]', "axes must be a table (dotted field = [values]), got list"),
    ("g.toml", '[axes]\n"train.seed" = []', "axes.train.seed must be a non-empty list"),
    ("g.toml", '[axes]\n"train.seed" = 3', "axes.train.seed must be a non-empty list"),
    ("g.toml", 'plugins = "family.py"', "plugins must be a list of file paths or module names, got 'family.py'"),
    ("g.json", '{"base": {"plugins": "family.py"}}',
     "plugins must be a list of file paths or module names, got 'family.py'"),
    ("g.json", '{"plugins": ["json"], "base": 3}', "base must be a table of config fields, got 3"),
])
def test_each_refusal_of_a_grid_file_names_the_file_and_says_what_is_wrong(tmp_path, name, text, message):
    path = _grid_file(tmp_path, name, text)
    with pytest.raises(ConfigError) as refused:
        load_grid_file(path)
    assert str(refused.value) == f"{path}: {message}"


def test_an_unknown_axis_field_is_refused_by_its_name_before_any_run_is_made(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_grid_file(_grid_file(tmp_path, "g.toml", '[axes]\n"train.seed" = [0]\n"train.nope" = [1]'))
    assert str(refused.value) == "train.nope: unknown field"


@pytest.mark.parametrize("field, value, message", [
    ("base", [1], "base must be a table of config fields, got [1]"),
    ("axes", [1], "axes must be a table (dotted field = [values]), got [1]"),
    ("variants", {"family": {}}, "variants must be a list of tables, got {'family': {}}"),
    ("variants", [{}, 1], "variants must be a list of tables, got [{}, 1]"),
    ("tolerance", [1], "tolerance must be a table, got [1]"),
])
def test_a_grid_refuses_a_part_of_the_wrong_kind_by_the_grid_and_part_names(field, value, message):
    with pytest.raises(ConfigError) as refused:
        Grid(name="g", **{field: value})
    assert str(refused.value) == f"grid g: {message}"


def test_a_grid_file_without_name_and_parts_takes_its_file_name_and_the_defaults(tmp_path):
    grid = load_grid_file(_grid_file(tmp_path, "My grid (v2) X.toml", ""))
    assert (grid.name, grid.base, grid.axes, grid.variants, grid.description, grid.tolerance) == (
        "My-grid-v2-X", {}, {}, [], "", {"metric": "train_mse"})
    assert load_grid_file(_grid_file(tmp_path, "-.x-.toml", "")).name == "x"
    assert load_grid_file(_grid_file(tmp_path, "(((.json", "{}")).name == "grid"
    named = load_grid_file(_grid_file(tmp_path, "file.toml", 'name = "chosen"\ndescription = "what it is"\n'
                                      '[tolerance]\nmetric = "train_mse"\nmnist = 0.05\n'
                                      '[[variants]]\nfamily = { name = "amortized", width = 4 }\n'
                                      '[[variants]]\nfamily = { name = "factorized" }'))
    assert (named.name, named.description, named.tolerance, named.variants) == (
        "chosen", "what it is", {"metric": "train_mse", "mnist": 0.05},
        [{"family": {"name": "amortized", "width": 4}}, {"family": {"name": "factorized"}}])
    assert [c.family.name for c in named.expand()] == ["amortized", "factorized"]


def test_plugins_of_a_grid_file_and_of_its_base_are_found_beside_it_in_that_order(tmp_path):
    folder = tmp_path / "grids"
    folder.mkdir()
    first = _grid_file(folder, "first_plugin.py", "LOADED = True\n")
    second = _grid_file(folder, "second_plugin.py", "LOADED = True\n")
    grid = load_grid_file(_grid_file(folder, "g.json", json.dumps(
        {"plugins": ["first_plugin.py"], "base": {"plugins": ["./second_plugin.py"], "train": {"epochs": 2}}})))
    assert grid.base == {"plugins": [str(first.resolve()), str(second.resolve())], "train": {"epochs": 2}}
    [config] = grid.expand()
    assert config.plugins == (str(first.resolve()), str(second.resolve())) and config.train.epochs == 2
    only_base = load_grid_file(_grid_file(folder, "h.json", json.dumps({"base": {"plugins": ["json"]}})))
    assert only_base.base == {"plugins": ["json"]}


_FAMILY_PLUGIN = """
from dataclasses import dataclass

from amortized_bayes.config import EncoderConfig
from amortized_bayes.families import AmortizedFamily, register_family


@dataclass(frozen=True)
class WithAKnobConfig(EncoderConfig):
    {field}: int = 1


@register_family
class WithAKnob(AmortizedFamily):
    name, short_name, title = {name!r}, "knob", "A-VI with a knob"
    config_class = WithAKnobConfig
"""


def test_a_grid_imports_its_base_plugins_before_it_reads_its_axes(tmp_path):
    """An axis over a field that only a family of the grid's base plugins has (names no other test has
    used, so that nothing imported it before): the plugin is imported before the axes are read."""
    import uuid

    from amortized_bayes.families import FAMILIES

    tag = uuid.uuid4().hex[:8]
    name, field = f"knob-family-{tag}", f"knob_{tag}"
    plugin = tmp_path / f"plugin_{tag}.py"
    plugin.write_text(_FAMILY_PLUGIN.format(name=name, field=field))
    grid = Grid(name="g", base={"plugins": [str(plugin)], "family": {"name": name}}, axes={f"family.{field}": [1, 2]})
    try:
        configs = grid.expand()
        assert [getattr(c.family, field) for c in configs] == [1, 2] and configs[0].plugins == (str(plugin),)
    finally:
        FAMILIES.pop(name, None)


def test_a_run_whose_id_would_be_unsafe_is_refused_by_the_grid_with_the_id_named():
    """A registered name that makes an unsafe folder name (here an objective's, with a '/') is refused
    when the grid is expanded, before anything is written, as the run id it would give."""
    from amortized_bayes.objectives import ELBO, OBJECTIVES, register_objective

    @register_objective
    class Escaping(ELBO):
        kind = "../escape"

    try:
        with pytest.raises(ConfigError) as info:
            Grid(name="g", base={"objective": {"kind": "../escape"}}, axes={}).expand()
        assert str(info.value).startswith("run id: must be 1-100 letters, digits, '.', '_', '+' or '-', not "
                                          "starting with '.' and without '..'; got 'mnist-")
    finally:
        OBJECTIVES.pop("../escape", None)


def test_a_type_error_of_a_config_class_is_reported_with_the_grid_name(monkeypatch):
    """A config class of a plugin may raise TypeError on a value it cannot take: the grid says which grid."""
    def refuse(raw):
        raise TypeError("a plugin's config cannot take this")

    monkeypatch.setattr(RunConfig, "from_dict", staticmethod(refuse))
    with pytest.raises(ConfigError) as info:
        Grid(name="my-grid", base={}, axes={}).expand()
    assert str(info.value) == "grid my-grid: a plugin's config cannot take this"


def test_an_axis_three_levels_deep_sets_that_field_and_no_other():
    (config,) = Grid(name="g", base={}, axes={"train.test_inference.lr": [0.5]}).expand()
    assert config.train.test_inference.lr == 0.5
    assert config.train.lr == RunConfig().train.lr  # not the training step size of the level above
