"""Likelihoods and objectives as objects (issue 18): every override of every registered likelihood
against its own plain per-image value, and every registered objective's fused Monte Carlo terms against
its plain ones, in float64 (values and gradients), for one and several draws."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from amortized_bayes.config import ModelConfig
from amortized_bayes.likelihoods import LIKELIHOODS, Legacy2024Likelihood, get_likelihood
from amortized_bayes.model import BayesianDecoder
from amortized_bayes.objectives import OBJECTIVES, draw_z

CASES = [(name, obs_var) for name in sorted(LIKELIHOODS) for obs_var in ((0.7, "learned") if name == "gaussian"
                                                                         else (1.0,))]


def _model(likelihood: str, obs_var) -> BayesianDecoder:
    torch.manual_seed(0)
    model = BayesianDecoder(ModelConfig(latent_dim=3, hidden=6, data_dim=7, likelihood=likelihood, obs_var=obs_var,
                                        init_log_scale=-1.0)).double()
    with torch.no_grad():
        model.theta_loc.normal_(0, 0.4)
        if model.log_obs_var is not None:
            model.log_obs_var.fill_(-0.4)
    return model


def _images(likelihood: str) -> torch.Tensor:
    x = torch.rand(4, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (x > 0.5).double() if likelihood == "bernoulli" else x


@pytest.mark.parametrize("name, obs_var", CASES)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_every_override_equals_the_plain_per_image_value(name, obs_var, num_samples):
    likelihood, model = get_likelihood(name), _model(name, obs_var)
    x = _images(name)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(num_samples, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    theta = model.sample(num_samples, g)
    params = [p for p in (model.theta_loc, model.theta_log_scale, model.log_obs_var, z) if p is not None]
    plain = likelihood.per_image(model, x, model.decode(z, theta))
    assert plain.shape == (num_samples, 4)
    for value in (likelihood.total(model, x, model.decode(z, theta)),
                  likelihood.decoded_per_image(model, x, z, theta).sum(),
                  likelihood.decoded_total(model, x, z, theta)):
        torch.testing.assert_close(value, plain.sum())
        for a, b in zip(torch.autograd.grad(value, params, retain_graph=True),
                        torch.autograd.grad(plain.sum(), params, retain_graph=True)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name, obs_var", CASES)
def test_the_plain_value_is_the_textbook_density(name, obs_var):
    likelihood, model = get_likelihood(name), _model(name, obs_var)
    x = _images(name)
    out = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if name == "gaussian":
        var = model.obs_var_value
        expected = Normal(out, var**0.5).log_prob(x).sum(-1)
        torch.testing.assert_close(likelihood.mean(out), out)
    else:
        expected = Bernoulli(logits=out).log_prob(x.expand_as(out)).sum(-1)
        torch.testing.assert_close(likelihood.mean(out), torch.sigmoid(out))
    torch.testing.assert_close(likelihood.per_image(model, x, out), expected)


def test_the_legacy_term_is_minus_the_squared_error():
    model, x = _model("gaussian", 1.0), _images("gaussian")
    out = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(Legacy2024Likelihood().per_image(model, x, out), -((x - out) ** 2).sum(-1))


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
@pytest.mark.parametrize("num_samples", [1, 3])
def test_each_objectives_drawn_terms_equal_its_plain_terms(kind, num_samples):
    objective = OBJECTIVES[kind]
    g0 = torch.Generator().manual_seed(5)
    mu0 = torch.randn(6, 3, generator=g0, dtype=torch.float64)
    ls0 = 0.3 * torch.randn(6, 3, generator=g0, dtype=torch.float64)
    results = []
    for draw in (objective.draw_z_with_terms, None):
        mu, ls = mu0.clone().requires_grad_(True), ls0.clone().requires_grad_(True)
        g = torch.Generator().manual_seed(6)
        if draw is not None:
            z, lp, ent = draw(mu, ls, num_samples, g, "mc")
        else:
            z, eps = draw_z(mu, ls, num_samples, g)
            lp, ent = objective.local_terms(mu, ls, z, eps, "mc")
        total = (z**2).sum() + 1.3 * lp + 0.7 * ent
        total.backward()
        results.append((z.detach(), lp.detach(), ent.detach(), mu.grad, ls.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
