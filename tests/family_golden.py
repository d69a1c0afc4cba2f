"""Fixed-seed numbers of every built-in family on synthetic data, to check that a refactor changes none
of them: ``python tests/family_golden.py OUT.json`` writes them (tests/data/family_golden.json was
written by commit 73196c6, before the per-family configs); tests/test_family_contract.py compares."""

from __future__ import annotations

import json
import sys

import torch

from amortized_bayes.config import DataConfig, LocalInferenceConfig, ModelConfig, RunConfig, TrainConfig
from amortized_bayes.training import TrainingData, fit

try:
    from amortized_bayes.config import family_config
except ImportError:  # the versions before per-family configs
    from amortized_bayes.config import FamilyConfig as family_config  # type: ignore[no-redef]

FAMILIES = {
    "amortized": {"name": "amortized", "width": 4},
    "semi-amortized": {"name": "semi-amortized", "width": 4, "refine_steps": 2},
    "factorized": {"name": "factorized", "init_loc_sd": 1.0, "init_log_scale": -1.0, "init_log_scale_sd": 1.0},
    "constant": {"name": "constant", "init_loc_sd": 1.0, "init_log_scale_sd": 1.0},
}


def golden_data() -> TrainingData:
    g = torch.Generator().manual_seed(0)
    return TrainingData(torch.rand(40, 20, generator=g), torch.rand(10, 20, generator=g))


def golden_numbers(name: str) -> dict:
    config = RunConfig(data=DataConfig(n_train=40, n_test=10),
                       model=ModelConfig(latent_dim=3, hidden=8, data_dim=20, obs_var=0.1, init_log_scale=-4.0),
                       family=family_config(**FAMILIES[name]),
                       train=TrainConfig(epochs=3, batch_size=20, lr=1e-2, eval_every=3, seed=1,
                                         test_inference=LocalInferenceConfig(max_steps=100)))
    result = fit(config, golden_data())
    final = result.final_eval
    return {"neg_elbo_steps": result.history.neg_elbo,
            **{k: final[k] for k in ("neg_elbo", "train_mse", "test_mse")}}


if __name__ == "__main__":
    json.dump({name: golden_numbers(name) for name in FAMILIES}, open(sys.argv[1], "w"), indent=1)
