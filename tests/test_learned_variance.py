"""model.obs_var = "learned": sigma_x^2 as a type-II maximum-likelihood point estimate inside the same
objective. Every fused Gaussian path against the plain torch.distributions expression in float64
(values and gradients, including d/d log sigma_x^2), the stationary point against its closed form,
and the value recorded at each evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from amortized_bayes.config import DataConfig, family_config, ModelConfig, RunConfig, TrainConfig
from amortized_bayes.model import BayesianDecoder
from amortized_bayes.likelihoods import GaussianLikelihood
from amortized_bayes.objectives import elbo_per_image


def _model(log_var: float, depth: int = 1):
    torch.manual_seed(0)
    config = ModelConfig(latent_dim=3, hidden=5, depth=depth, data_dim=7, obs_var="learned")
    model = BayesianDecoder(config).double()
    with torch.no_grad():
        model.log_obs_var.fill_(log_var)
        model.theta_log_scale.fill_(-1.5)
    return model


def _plain(model, x, z, theta):
    """sum over draws, images and pixels of log N(x; decoder, exp(log_obs_var)), by hand."""
    out = model.decode(z, theta)
    return Normal(out, torch.exp(0.5 * model.log_obs_var)).log_prob(x).sum()


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("log_var", [0.0, -2.3, 1.1])
def test_fused_totals_match_the_plain_expression_with_a_learned_variance(num_samples, log_var):
    model = _model(log_var)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 7, generator=g, dtype=torch.float64)
    z = torch.randn(num_samples, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    theta = model.sample(num_samples, g)
    params = [model.theta_loc, model.theta_log_scale, model.log_obs_var, z]
    fused = GaussianLikelihood().decoded_total(model, x, z, theta)
    plain = _plain(model, x, z, theta)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, params, retain_graph=True),
                    torch.autograd.grad(plain, params, retain_graph=True)):
        torch.testing.assert_close(a, b)
    per_draw = GaussianLikelihood().per_image(model, x, model.decode(z, theta))
    torch.testing.assert_close(per_draw.sum(), plain)


def test_per_image_elbo_matches_the_plain_expression_with_a_learned_variance():
    model = _model(-0.7)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 7, generator=g, dtype=torch.float64)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    log_sigma = torch.full((5, 3), -30.0, dtype=torch.float64)  # z = mu: the likelihood term is exact
    theta = model.mean()
    value = elbo_per_image(model, x, mu, log_sigma, theta, 1, g)
    out = model.decode(mu, theta)[0]
    expected = Normal(out, torch.exp(0.5 * model.log_obs_var)).log_prob(x).sum(-1) - 0.5 * (
        torch.exp(2 * log_sigma) + mu**2 - 1 - 2 * log_sigma).sum(-1)
    torch.testing.assert_close(value, expected)
    grad = torch.autograd.grad(value.sum(), model.log_obs_var, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), model.log_obs_var)[0])


def test_the_learned_variance_is_stationary_at_the_mean_squared_residual():
    """d/d log v of sum log N(x; m, v) = 0.5 SQ / v - 0.5 n: zero at v = SQ / n, the type-II ML value."""
    model = _model(0.0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 7, generator=g, dtype=torch.float64)
    z = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    theta = model.mean()
    with torch.no_grad():
        sq = (model.decode(z, theta) - x).pow(2).sum()
        model.log_obs_var.fill_(float(torch.log(sq / x.numel())))
    ll = GaussianLikelihood().decoded_total(model, x, z, theta)
    assert abs(float(torch.autograd.grad(ll, model.log_obs_var)[0])) < 1e-9
    with torch.no_grad():
        model.log_obs_var.add_(math.log(2.0))  # above the optimum: the gradient pushes it down
    ll = GaussianLikelihood().decoded_total(model, x, z, theta)
    assert float(torch.autograd.grad(ll, model.log_obs_var)[0]) < 0


def test_learned_variance_is_trained_recorded_and_saved(tmp_path):
    from amortized_bayes import load_fit, save_fit
    from amortized_bayes.training import TrainingData, fit

    g = torch.Generator().manual_seed(4)
    data = TrainingData(torch.rand(40, 784, generator=g) * 0.3, None)
    config = RunConfig(data=DataConfig(n_train=40, n_test=0), model=ModelConfig(latent_dim=2, hidden=8,
                                                                               obs_var="learned"),
                       family=family_config(name="factorized"), train=TrainConfig(epochs=30, lr=0.05))
    result = fit(config, data)
    values = [e["obs_var"] for e in result.history.evals]
    assert values[0] == 1.0 and values[-1] < 0.5  # pixels in [0, 0.3]: far less noise than 1
    assert values[-1] == pytest.approx(result.model.obs_var_value, rel=1e-6)
    loaded = load_fit(save_fit(result, tmp_path / "model.pt"))
    assert loaded.model.obs_var_value == pytest.approx(values[-1], rel=1e-6)
    # A fixed variance keeps its state dict and records nothing extra.
    assert BayesianDecoder(ModelConfig()).log_obs_var is None
    assert "log_obs_var" not in BayesianDecoder(ModelConfig()).state_dict()
