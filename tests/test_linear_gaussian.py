"""The trainer against closed forms on a linear-Gaussian model (decoder weights known and fixed)."""

from __future__ import annotations

import pytest
import torch

from amortized_bayes.config import DataConfig, family_config, ObjectiveConfig, RunConfig, TrainConfig
from amortized_bayes.training import TrainingData, fit

from . import linear_gaussian as lg

N = 64
# Adam on noisy gradients jitters around the optimum by about its step size, so the fit runs in
# stages of falling learning rate and rising draws, each continuing from the last.
STAGES = [(1e-2, 800, 16), (1e-3, 800, 64), (2e-4, 600, 256), (4e-5, 800, 256)]


def staged_fit(model: lg.LinearGaussian, x: torch.Tensor, family: str, **family_options):
    fitted, result = None, None
    for lr, epochs, samples in STAGES:
        config = RunConfig(
            data=DataConfig(n_train=N, n_test=0),
            model=model.model_config(),
            family=family_config(name=family, **family_options),
            objective=ObjectiveConfig(estimator="analytic", num_samples=samples),
            train=TrainConfig(epochs=epochs, lr=lr, eval_every=epochs, eval_samples=64, train_decoder=False),
        )
        result = fit(config, TrainingData(x, None), model=model.decoder(), family=fitted)
        fitted = result.family
    with torch.no_grad():
        mu, log_sigma = result.family.local_params(x, torch.arange(N))
    return result, mu.detach(), log_sigma.detach()


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def problem():
    model = lg.make()
    x = model.sample(N, torch.Generator().manual_seed(1))
    mu_star = model.posterior_mean(x)
    log_sigma_star = 0.5 * model.meanfield_var().log().expand_as(mu_star)
    return model, x, mu_star, log_sigma_star


@pytest.fixture(scope="module")
def fvi(problem):
    model, x, _, _ = problem
    return staged_fit(model, x, "factorized")


def test_fvi_reaches_the_closed_form_meanfield_optimum(problem, fvi):
    model, x, mu_star, ls_star = problem
    _, mu, log_sigma = fvi
    var, var_star = torch.exp(2 * log_sigma), torch.exp(2 * ls_star)
    assert rel(mu, mu_star) < 1e-2
    assert rel(var, var_star) < 1e-2
    assert float(((var - var_star) / var_star).abs().max()) < 3e-2
    # ... and the ELBO there is the optimum's, to a hundredth of a nat per image.
    gap = float(model.elbo(x, mu_star, ls_star).sum() - model.elbo(x, mu, log_sigma).sum())
    assert 0 <= gap < 0.01 * N


def test_linear_encoder_avi_reaches_fvi_elbo_and_never_beats_it(problem, fvi):
    model, x, mu_star, ls_star = problem
    result, mu, log_sigma = staged_fit(model, x, "amortized", depth=0)
    optimum = float(model.elbo(x, mu_star, ls_star).sum())
    avi = float(model.elbo(x, mu, log_sigma).sum())
    fvi_elbo = float(model.elbo(x, fvi[1], fvi[2]).sum())
    assert avi <= optimum + 1e-3  # exact ELBOs: the optimum bounds every q
    assert abs(avi - fvi_elbo) < 0.01 * N
    assert rel(mu, mu_star) < 1e-2
    # The trainer's own Monte Carlo estimate of the full-data ELBO agrees with these within its error:
    # the theta terms are constants here (q(theta) is fixed), so compare the difference A-VI - F-VI.
    est_avi = -result.final_eval["neg_elbo"]
    est_fvi = -fvi[0].final_eval["neg_elbo"]
    assert abs((est_avi - est_fvi) - (avi - fvi_elbo)) < 1.0


def test_constant_vi_reaches_its_own_closed_form_optimum(problem):
    model, x, _, ls_star = problem
    _, mu, log_sigma = staged_fit(model, x, "constant")
    mu_c = model.posterior_mean(x.mean(0, keepdim=True))[0]  # best shared factor: that of the mean image
    assert torch.allclose(mu, mu[0].expand_as(mu))
    assert rel(mu[0], mu_c) < 1e-2
    assert rel(torch.exp(2 * log_sigma[0]), torch.exp(2 * ls_star[0])) < 1e-2
    # Its ELBO is the closed-form constant-VI optimum, below the mean-field optimum by a positive gap.
    best_const = float(model.elbo(x, mu_c.expand_as(mu), ls_star).sum())
    assert abs(float(model.elbo(x, mu, log_sigma).sum()) - best_const) < 0.01 * N
    assert best_const < float(model.elbo(x, model.posterior_mean(x), ls_star).sum())


def test_exact_elbo_helper_is_a_lower_bound_tight_only_for_full_covariance(problem):
    """Sanity of the reference itself: ELBO(q*) <= log p(x), with a gap from the mean-field restriction."""
    model, x, mu_star, ls_star = problem
    gap = model.log_evidence(x) - model.elbo(x, mu_star, ls_star)
    assert bool((gap > 0).all())
