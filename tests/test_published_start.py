"""replicate-2024 starts where the published code starts (issue 16): the init fields, and the first
epoch on Fashion-MNIST against the published ten-seed medians."""

from __future__ import annotations

import math

import pytest
import torch

from amortized_bayes.config import family_config, ModelConfig, RunConfig, TrainConfig
from amortized_bayes.experiments.grid import run_id
from amortized_bayes.experiments.presets import PRESETS
from amortized_bayes.families import build_family
from amortized_bayes.training import build, fit


def _replicate_run(family: str, width: int | None = None, seed: int = 0) -> RunConfig:
    for config in PRESETS["replicate-2024"].expand():
        f = config.family
        if (config.data.dataset == "fashion-mnist" and config.train.seed == seed and f.name == family
                and (width is None or f.width == width)):
            return config
    raise AssertionError(f"no {family} run in replicate-2024")


def test_free_factors_start_at_the_requested_distribution():
    torch.manual_seed(0)
    config = family_config(name="factorized", init_loc_sd=1.0, init_log_scale=-1.0, init_log_scale_sd=1.0)
    family = build_family(config, num_data=20_000, data_dim=784, latent_dim=8)
    loc, log_sigma = family.loc.weight.detach(), family.log_sigma.weight.detach()
    # 160,000 draws: the sample mean is within ~4 standard errors (0.01) of the truth.
    assert abs(float(loc.mean())) < 0.01 and abs(float(loc.std()) - 1.0) < 0.01
    assert abs(float(log_sigma.mean()) + 1.0) < 0.01 and abs(float(log_sigma.std()) - 1.0) < 0.01
    # Independent draws for every image and dimension, and the two tables independent of each other.
    assert abs(float(torch.corrcoef(torch.stack([loc.flatten(), log_sigma.flatten()]))[0, 1])) < 0.01
    assert loc[0].ne(loc[1]).all()
    # New images (test-time inference) start at the centre of that distribution, deterministically.
    new = family.for_new_data(3)
    assert new.loc.weight.eq(0).all() and new.log_sigma.weight.eq(-1.0).all()

    constant = build_family(family_config(name="constant", init_loc_sd=1.0, init_log_scale_sd=1.0),
                            num_data=5, data_dim=784, latent_dim=4096)
    c_loc, c_log_sigma = constant.loc.detach(), constant.log_sigma.detach()
    assert abs(float(c_loc.mean())) < 0.1 and abs(float(c_loc.std()) - 1.0) < 0.05
    assert abs(float(c_log_sigma.mean())) < 0.1 and abs(float(c_log_sigma.std()) - 1.0) < 0.05


def test_zero_spreads_keep_the_old_constant_start_and_run_ids():
    family = build_family(family_config(name="factorized", init_log_scale=0.5), num_data=4, data_dim=784,
                          latent_dim=3)
    assert family.loc.weight.eq(0).all() and family.log_sigma.weight.eq(0.5).all()
    # A field left at its default does not enter the run id, so the stored runs keep theirs.
    plain = RunConfig(family=family_config(name="factorized"))
    explicit = RunConfig(family=family_config(name="factorized", init_loc_sd=0.0, init_log_scale_sd=0.0))
    assert run_id(plain) == run_id(explicit)
    assert run_id(RunConfig(family=family_config(name="factorized", init_loc_sd=1.0))) != run_id(plain)
    # An encoder does not use the free factors' fields: they cannot split its runs.
    assert run_id(RunConfig(family=family_config(init_loc_sd=1.0))) == run_id(RunConfig())


def test_replicate_preset_carries_the_published_start():
    runs = PRESETS["replicate-2024"].expand()
    assert len(runs) == 2 * 6 * 10
    for config in runs:
        assert config.model.init_loc == "zero" and config.model.init_log_scale == -2.0
        assert (config.data.n_train, config.data.subset, config.data.n_test) == (10_000, "random", 10_000)
        assert config.train.mse_every == 1 and config.train.batches == "fixed"
        f = config.family
        if f.name == "factorized":
            assert (f.init_loc_sd, f.init_log_scale, f.init_log_scale_sd) == (1.0, -1.0, 1.0)
        if f.name == "constant":
            assert (f.init_loc_sd, f.init_log_scale, f.init_log_scale_sd) == (1.0, 0.0, 1.0)
    model, _ = build(runs[0], 10)
    assert model.theta_loc.eq(0).all() and model.theta_log_scale.eq(-2.0).all()
    # The stored 5,000-epoch grid file is a part of the preset: the same run ids.
    from pathlib import Path

    from amortized_bayes.experiments.grid import load_grid_file

    path = Path(__file__).parent.parent / "results" / "replication" / "replicate-2024-fashion-e5000.toml"
    preset_ids = {run_id(c) for c in runs}
    assert {run_id(c) for c in load_grid_file(path).expand()} <= preset_ids


@pytest.mark.parametrize("family", ["amortized", "semi-amortized", "factorized"])
def test_the_trace_records_every_epoch_and_changes_no_number(family):
    from amortized_bayes.training import TrainingData

    data = TrainingData(torch.rand(64, 784, generator=torch.Generator().manual_seed(0)))
    base = RunConfig(model=ModelConfig(latent_dim=3, hidden=8, depth=1),
                     family=family_config(name=family, width=8, refine_steps=2),
                     train=TrainConfig(epochs=4, eval_every=2, batch_size=16))
    traced = RunConfig.from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "mse_every": 1}})
    a, b = fit(base, data), fit(traced, data)
    def numbers(evals):  # wall_time is a measurement, not a result
        return [{k: v for k, v in e.items() if k not in ("wall_time", "test_inference_seconds")} for e in evals]

    assert a.history.neg_elbo == b.history.neg_elbo and numbers(a.history.evals) == numbers(b.history.evals)
    assert a.history.mse_trace == []
    assert [e["epoch"] for e in b.history.mse_trace] == [0, 1, 2, 3, 4]
    by_epoch = {e["epoch"]: e["train_mse"] for e in b.history.evals}
    for e in b.history.mse_trace:
        if e["epoch"] in by_epoch:
            assert e["train_mse"] == by_epoch[e["epoch"]]
    if family == "semi-amortized":
        return  # its refinement draws noise: an evaluation and the trace refine with different draws
    # Epoch 3 has no full evaluation: its trace value is the MSE of the model as it was after epoch 3,
    # which a 3-epoch run evaluates at its end.
    three = fit(RunConfig.from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "epochs": 3}}), data)
    assert math.isclose(b.history.mse_trace[3]["train_mse"], three.history.evals[-1]["train_mse"], rel_tol=1e-6)


# The published code's median train MSE after the first epoch (10 steps) on Fashion-MNIST, ten seeds,
# one shared random subset of 10,000 images (issue 16). A different random subset moves these by up
# to ~1.5%, hence the 2% band.
PUBLISHED_FIRST_EPOCH = [("amortized", 1, 0.2041), ("amortized", 64, 0.2065), ("factorized", None, 0.2087),
                         ("constant", None, 0.2059)]


@pytest.mark.realdata
@pytest.mark.parametrize("family,width,published", PUBLISHED_FIRST_EPOCH)
def test_first_epoch_matches_the_published_runs(family, width, published):
    config = _replicate_run(family, width)
    raw = config.to_dict()
    raw["data"]["n_test"] = 0
    raw["train"].update(epochs=1, eval_every=1, eval_samples=1)
    result = fit(RunConfig.from_dict(raw))
    mse = result.history.evals[-1]["train_mse"]
    assert abs(mse / published - 1) < 0.02, f"{family} k={width}: train MSE {mse:.4f}, published {published}"
