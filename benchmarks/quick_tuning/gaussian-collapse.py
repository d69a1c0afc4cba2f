"""The first measurement behind the `quick` preset: Gaussian likelihoods of variance 1 and 0.1.

    python benchmarks/quick_tuning/gaussian-collapse.py 1.0
    python benchmarks/quick_tuning/gaussian-collapse.py 0.1

MNIST, N = 2,000, minibatches of 100, 150 epochs, one thread; prints per family the evaluation curve
(epoch, -ELBO per image, train MSE, test MSE, active units).
"""

import json
import sys
import time

import torch

from amortized_bayes import DataConfig, family_config, ModelConfig, RunConfig, TrainConfig, fit

torch.set_num_threads(1)
obs_var = float(sys.argv[1])
for name, width in [("amortized", 1), ("amortized", 64), ("factorized", 64), ("constant", 64)]:
    config = RunConfig(data=DataConfig(n_train=2000, n_test=500), model=ModelConfig(obs_var=obs_var),
                       family=family_config(name=name, width=width),
                       train=TrainConfig(epochs=150, batch_size=100, eval_every=25))
    start = time.time()
    result = fit(config)
    curve = [(e["epoch"], round(e["neg_elbo"] / 2000, 1), round(e["train_mse"], 4), round(e["test_mse"], 4),
              e["active_units"]) for e in result.history.evals]
    print(json.dumps({"obs_var": obs_var, "family": name, "width": width, "seconds": round(time.time() - start, 1),
                      "curve": curve}), flush=True)
