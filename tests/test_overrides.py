"""`--set KEY=VALUE` as the command line reads it (experiments/grid.py's parse_value and
parse_overrides), value by value, in process (issue 21: the subprocess tests cannot see a mutant)."""

from __future__ import annotations

import json

import pytest

from amortized_bayes.config import ConfigError
from amortized_bayes.experiments.grid import parse_overrides, parse_value


@pytest.mark.parametrize("text, value", [
    ("none", None), ("None", None), ("NONE", None), ("null", None), ("Null", None), ("NULL", None),
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
    ("5", 5), (" 5 ", 5), ("-2.5", -2.5), ("1e-3", 1e-3), ('"64"', "64"), ("fashion-mnist", "fashion-mnist"),
    ("[1, 64]", [1, 64]), ("[true, null]", [True, None]),
    ("1,64,128", [1, 64, 128]), ("mnist,fashion-mnist", ["mnist", "fashion-mnist"]),
    ("true,False,none", [True, False, None]), ("0.1, 0.2", [0.1, 0.2]),
])
def test_each_value_is_read_as_documented(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_overrides_split_at_the_first_equals_sign_and_strip_the_key():
    assert parse_overrides([" train.epochs =5", "family.width=1,64", "data.dataset=file:a=b.npz"]) == {
        "train.epochs": 5, "family.width": [1, 64], "data.dataset": "file:a=b.npz"}
    assert parse_overrides([]) == {}


def test_an_override_without_a_value_or_with_an_unknown_field_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^--set 'train\.epochs': expected KEY=VALUE \(e\.g\. train\.epochs=5\)$"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="train.epoch"):
        parse_overrides(["train.epoch=5"])


def test_overriding_a_grid_returns_a_new_grid_and_leaves_the_original_as_it_was():
    from amortized_bayes.experiments.presets import get_preset

    grid = get_preset("when-and-why")
    before = json.dumps(grid.to_dict(), sort_keys=True)
    small = grid.with_overrides({"train.epochs": 3, "family.width": [1, 2], "data.n_test": 5})
    assert json.dumps(grid.to_dict(), sort_keys=True) == before
    assert small.base["train"]["epochs"] == 3 and small.axes["family.width"] == [1, 2]
    assert all("width" not in v.get("family", {}) for v in small.variants)
    assert {c.train.epochs for c in small.expand()} == {3}


@pytest.mark.parametrize("name", ["quick", "replicate-2024", "when-and-why", "mlp-vs-conv"])
def test_the_stored_grid_json_reads_back_as_the_same_grid(name, tmp_path):
    """`run` stores ``grid.to_dict()`` as OUT/grid.json; that file is itself a grid file, with every
    field (name, description, base, axes, variants, tolerance) and the same runs."""
    from amortized_bayes.experiments.grid import load_grid_file, run_id
    from amortized_bayes.experiments.presets import get_preset

    grid = get_preset(name)
    stored = tmp_path / "grid.json"
    stored.write_text(json.dumps(grid.to_dict()))
    again = load_grid_file(stored)
    assert (again.name, again.description, again.base, again.axes, again.variants, again.tolerance) == (
        grid.name, grid.description, grid.base, grid.axes, grid.variants, grid.tolerance)
    assert [run_id(c) for c in again.expand()] == [run_id(c) for c in grid.expand()]


# `--only KEY=VALUE`: a selection of a grid's runs, which keeps their run ids.

def _when_and_why_runs():
    from amortized_bayes.experiments.grid import run_id
    from amortized_bayes.experiments.presets import get_preset

    configs = get_preset("when-and-why").expand()
    return configs, {run_id(c): c for c in configs}


def test_selecting_a_dataset_and_a_seed_keeps_exactly_those_runs_with_their_ids():
    """The preset has 12 runs per seed: 5 families x 2 datasets plus SA-VI on Fashion-MNIST only.
    MNIST's seed 0 is its 5 runs with the ids they have in the whole grid (an override
    ``--set data.dataset=mnist`` would instead turn Fashion-MNIST's SA-VI into an MNIST run)."""
    from amortized_bayes.experiments.grid import run_id, select_runs

    configs, by_id = _when_and_why_runs()
    assert len(configs) == 22
    mnist0 = select_runs(configs, {"data.dataset": "mnist", "train.seed": 0})
    assert [run_id(c).rsplit("-", 1)[0] for c in mnist0] == [
        "mnist-avi-k1-s0", "mnist-avi-k64-s0", "mnist-avi-k256-s0", "mnist-fvi-s0", "mnist-const-s0"]
    assert all(by_id[run_id(c)] is c for c in mnist0)  # the same configs, not copies with other ids
    from amortized_bayes.experiments.presets import get_preset

    overridden = {run_id(c) for c in get_preset("when-and-why").with_overrides(
        {"data.dataset": "mnist", "train.seed": 0}).expand()}
    assert len(overridden) == 6 and {run_id(c) for c in mnist0} < overridden


def test_a_list_matches_any_of_its_values_and_criteria_combine_as_and():
    from amortized_bayes.experiments.grid import select_runs

    configs, _ = _when_and_why_runs()
    wide = select_runs(configs, {"family.width": [64, 256.0], "train.seed": 1})
    # A-VI k = 64 and 256 on both datasets, SA-VI k = 64 on Fashion-MNIST; F-VI has no width.
    assert sorted((c.data.dataset, c.family.name, c.family.width) for c in wide) == [
        ("fashion-mnist", "amortized", 64), ("fashion-mnist", "amortized", 256),
        ("fashion-mnist", "semi-amortized", 64), ("mnist", "amortized", 64), ("mnist", "amortized", 256)]
    assert {c.train.seed for c in wide} == {1}
    assert select_runs(configs, {}) == configs


def test_a_boolean_does_not_select_a_number():
    from amortized_bayes.experiments.grid import select_runs

    configs, _ = _when_and_why_runs()
    with pytest.raises(ConfigError, match=r"^--only train\.seed=False: no run has it; the runs have 0, 1$"):
        select_runs(configs, {"train.seed": False})


def test_a_selection_no_run_meets_or_of_an_unknown_field_is_one_clear_error():
    from amortized_bayes.experiments.grid import select_runs

    configs, _ = _when_and_why_runs()
    with pytest.raises(ConfigError, match=r"^--only data\.dataset='mnst': no run has it; the runs have "
                       r"'fashion-mnist', 'mnist'$"):
        select_runs(configs, {"data.dataset": "mnst"})
    with pytest.raises(ConfigError, match=r"^data\.datset: unknown field$"):
        select_runs(configs, {"data.datset": "mnist"})
    # The first criterion leaves only F-VI, which has no width.
    with pytest.raises(ConfigError, match=r"^--only family\.width=64: no run has it; the runs have no such field$"):
        select_runs(configs, {"family.name": "factorized", "family.width": 64})
    with pytest.raises(ConfigError, match=r"^--only 'train\.seed': expected KEY=VALUE"):
        parse_overrides(["train.seed"], flag="--only")


def test_a_grid_file_reads_the_same_in_each_format_and_names_what_is_wrong(tmp_path, monkeypatch):
    """One grid written as TOML, JSON and YAML (either YAML suffix, any case) is one grid; a file of
    another kind, one that cannot be read, one that is not text, and YAML without PyYAML are each
    refused with a message that names the file and the reason."""
    import sys

    from amortized_bayes.experiments.grid import load_grid_file

    # 1e-3 is a number in TOML and JSON but a string to PyYAML (YAML 1.1 wants 1.0e-3): each file must
    # go to its own parser.
    texts = {
        ".toml": 'name = "formats"\n[base.train]\nepochs = 3\nlr = 1e-3\n[axes]\n"train.seed" = [0, 1]\n',
        ".json": '{"name": "formats", "base": {"train": {"epochs": 3, "lr": 1e-3}}, "axes": {"train.seed": [0, 1]}}',
        ".yaml": "name: formats\nbase:\n  train:\n    epochs: 3\n    lr: 0.001\naxes:\n  train.seed: [0, 1]\n",
    }
    texts.update({".yml": texts[".yaml"], ".JSON": texts[".json"], ".YML": texts[".yaml"], ".Toml": texts[".toml"]})
    grids = {}
    for suffix, text in texts.items():
        path = tmp_path / f"grid{suffix}"
        path.write_text(text)
        grids[suffix] = load_grid_file(path).to_dict()
    assert all(g == grids[".toml"] for g in grids.values()) and grids[".toml"]["name"] == "formats"
    assert grids[".toml"]["base"]["train"] == {"epochs": 3, "lr": 0.001}
    assert grids[".toml"]["axes"] == {"train.seed": [0, 1]}

    other = tmp_path / "grid.txt"
    other.write_text(texts[".toml"])
    with pytest.raises(ConfigError) as err:
        load_grid_file(other)
    assert str(err.value) == f"{other}: grid files are .toml, .json or .yaml"
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as err:
        load_grid_file(missing)
    assert str(err.value) == f"{missing}: cannot read the grid file (No such file or directory)"
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00grid")
    with pytest.raises(ConfigError) as err:
        load_grid_file(binary)
    assert str(err.value).startswith(f"{binary}: cannot read the grid file ('utf-8' codec can't decode byte 0xff")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(ConfigError) as err:
        load_grid_file(tmp_path / "grid.yaml")
    assert str(err.value) == f"{tmp_path / 'grid.yaml'}: YAML grid files need PyYAML (pip install pyyaml), or use TOML"
