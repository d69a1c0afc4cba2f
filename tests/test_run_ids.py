"""Run ids: a run is identified by exactly the fields that define it (issue 21). Every field a family
uses changes the id; a field it does not use does not; the hash is the documented one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amortized_bayes.config import EncoderConfig, FreeFactorConfig, RunConfig, SemiAmortizedConfig
from amortized_bayes.experiments.grid import run_hash, run_id

# The family fields each family uses, written out by hand (not taken from the code under test).
USED_BY = {
    "amortized": {"width", "depth", "architecture"},
    "semi-amortized": {"width", "depth", "architecture", "refine_steps", "refine_lr", "refine_backprop",
                       "refine_max_norm"},
    "factorized": {"init_log_scale", "init_loc_sd", "init_log_scale_sd"},
    "constant": {"init_log_scale", "init_loc_sd", "init_log_scale_sd"},
}
FAMILY_FIELDS = set().union(*USED_BY.values())
BUILT_IN_CONFIGS = (EncoderConfig, SemiAmortizedConfig, FreeFactorConfig)
# Recorded from a file: dataset only (refused for MNIST): tests/test_user_dataset.py changes the file.
FILE_FIELDS = {"data.file_sha256", "data.image_height", "data.image_width"}
# Decoder shape fields the default (MLP) decoder does not read; tests/test_conv.py checks the conv ones.
UNUSED_BY_THE_MLP = {"model.channels"}
# A valid value other than the default for every string and optional field.
ALTERNATIVES = {
    "data.dataset": "fashion-mnist", "data.subset": "random", "data.binarize": "threshold",
    "data.n_train": 500, "data.n_test": None, "model.likelihood": "bernoulli", "model.init_loc": "zero",
    "objective.kind": "legacy-2024", "objective.estimator": "analytic", "objective.local_terms": "all",
    "train.batch_size": 100, "train.batches": "fixed", "train.device": "cuda", "family.refine_backprop": False,
    "model.architecture": "conv", "family.architecture": "conv",
}


def leaves(config=None, prefix=""):
    config = config if config is not None else RunConfig()
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def changed(raw: dict, dotted: str, value) -> RunConfig:
    raw = json.loads(json.dumps(raw))
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value
    return RunConfig.from_dict(raw)


def other_value(dotted: str, value):
    if dotted in ALTERNATIVES:
        return ALTERNATIVES[dotted]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    raise AssertionError(f"no alternative value for {dotted}={value!r}")


@pytest.mark.parametrize("family", sorted(USED_BY))
def test_every_used_field_changes_the_id_and_no_unused_one_does(family):
    base = changed(RunConfig().to_dict(), "family.name", family)
    raw = base.to_dict()
    seen = set()
    for dotted, value in leaves(base):
        if dotted == "family.name" or dotted in FILE_FIELDS:
            continue
        if dotted == "plugins":  # where code is found is not what the run is
            assert run_id(changed(raw, dotted, ["json"])) == run_id(base)
            continue
        if dotted in UNUSED_BY_THE_MLP:
            assert run_id(changed(raw, dotted, other_value(dotted, value))) == run_id(base), dotted
            continue
        seen.add(dotted)
        assert run_hash(changed(raw, dotted, other_value(dotted, value))) != run_hash(base), \
            f"{family}: {dotted} did not change the id"
    # A family's config holds exactly the fields it uses; the others' fields are accepted and dropped.
    assert {d.split(".", 1)[1] for d in seen if d.startswith("family.")} == USED_BY[family]
    for name in sorted(FAMILY_FIELDS - USED_BY[family]):
        dotted = f"family.{name}"
        default = {f.name: f.default for c in BUILT_IN_CONFIGS for f in fields(c)}[name]
        other = changed(raw, dotted, other_value(dotted, default))
        assert run_id(other) == run_id(base) and not hasattr(other.family, name), f"{family}: unused {dotted}"
    # Every built-in family field is classified above (a new field must be added there).
    assert {f.name for c in BUILT_IN_CONFIGS for f in fields(c)} - {"name"} == FAMILY_FIELDS


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(1e-6, 1.0), seed=st.integers(0, 10**6), width=st.integers(1, 4096))
def test_ids_of_random_values_differ_exactly_when_the_values_do(lr, seed, width):
    a = changed(changed(changed(RunConfig().to_dict(), "train.lr", lr).to_dict(), "train.seed", seed).to_dict(),
                "family.width", width)
    b = changed(a.to_dict(), "train.lr", lr * 1.5)
    assert run_hash(a) != run_hash(b)
    assert run_hash(a) == run_hash(RunConfig.from_dict(json.loads(json.dumps(a.to_dict()))))


def test_the_hash_is_sha256_of_the_non_default_fields_as_compact_sorted_json():
    # Computed by hand: only train.lr differs from the defaults.
    text = json.dumps({"train": {"lr": 0.01}}, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(text.encode()).hexdigest()[:10]
    assert run_hash(changed(RunConfig().to_dict(), "train.lr", 0.01)) == expected



def test_every_stored_run_is_in_the_folder_its_config_names():
    """The ids of the results on main (the replication and findings folders, 116 runs of several
    families, objectives, decoders and datasets) are what their stored configs give today: a change to
    the hash (a field order, a default, the JSON form) would orphan them."""
    from pathlib import Path

    runs = sorted(Path(__file__).resolve().parent.parent.glob("results/*/*/runs/*/config.json"))
    assert len(runs) >= 100
    for path in runs:
        assert run_id(RunConfig.from_dict(json.loads(path.read_text()))) == path.parent.name, path
