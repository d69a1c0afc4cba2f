"""evaluation.py's metrics, each against a value written out here (issue 21): the reconstruction MSE and
the collapse diagnostics by hand, the chunked local posterior against one pass, and the legacy-2024
objective's value re-computed at the same draws from its definition (SPEC §3). These functions were
reached only by the training tests, which mutation testing leaves out (too slow under its trampoline),
so a mistake in them showed as "no tests" there; these tests run in a second."""

from __future__ import annotations

import math

import pytest
import torch

from amortized_bayes.config import ModelConfig, family_config
from amortized_bayes.evaluation import (
    ACTIVE_UNIT_THRESHOLD, collapse_diagnostics, legacy_objective_value, local_posterior, reconstruction_mse,
)
from amortized_bayes.families import build_family
from amortized_bayes.model import BayesianDecoder
from amortized_bayes.objectives import make_local_elbo


def _decoder(likelihood: str = "gaussian", seed: int = 0) -> BayesianDecoder:
    torch.manual_seed(seed)
    config = ModelConfig(latent_dim=3, hidden=5, depth=1, data_dim=6, likelihood=likelihood, obs_var=0.5)
    decoder = BayesianDecoder(config).requires_grad_(False)
    with torch.no_grad():  # a q(theta) with spread and a mean away from the initialisation
        decoder.theta_loc.normal_(0.0, 0.6)
        decoder.theta_log_scale.uniform_(math.log(0.1), math.log(0.5))
    return decoder


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_reconstruction_mse_is_the_mean_squared_error_at_the_means_over_every_pixel(likelihood, chunk):
    """Mean over N x D of (Omega(E z; E theta) - x)^2, with the decoder's mean written out (the Gaussian
    mean, or the sigmoid of the Bernoulli logits), whatever the chunk size (N = 10: chunks of 1 and 4
    leave a remainder)."""
    decoder = _decoder(likelihood)
    g = torch.Generator().manual_seed(1)
    mu, x = torch.randn(10, 3, generator=g), torch.rand(10, 6, generator=g)
    out = decoder.decode(mu, decoder.mean())[0]
    if likelihood == "bernoulli":
        out = torch.sigmoid(out)
    expected = sum(float((out[n, i] - x[n, i]) ** 2) for n in range(10) for i in range(6)) / 60
    assert reconstruction_mse(decoder, mu, x, chunk=chunk) == pytest.approx(expected, rel=1e-6)
    # Zero for images equal to their own reconstructions.
    assert reconstruction_mse(decoder, mu, out, chunk=chunk) == pytest.approx(0.0, abs=1e-12)


def test_collapse_diagnostics_by_hand():
    """KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum_j (mu^2 + sigma^2 - 1 - 2 log sigma) per image, averaged over
    images; a unit is active when its mean's sample variance (N - 1 in the denominator) exceeds 0.01."""
    mu = torch.tensor([[0.0, 0.0, 1.0, 0.3],
                       [0.2, 0.09, 1.0, -0.3],
                       [0.4, 0.18, 1.0, 0.0]])
    # Column variances (unbiased): 0.04, 0.0081, 0, 0.09 -> columns 0 and 3 are active.
    log_sigma = torch.tensor([[0.0, -1.0, 0.5, 0.0],
                              [-0.5, 0.0, 0.0, 0.2],
                              [0.1, 0.3, -0.2, 0.0]])
    kl_rows = [0.5 * sum(float(m) ** 2 + math.exp(2 * float(s)) - 1 - 2 * float(s) for m, s in zip(mr, sr))
               for mr, sr in zip(mu, log_sigma)]
    out = collapse_diagnostics(mu, log_sigma)
    assert out["kl_z_per_image"] == pytest.approx(sum(kl_rows) / 3, rel=1e-6)
    assert out["active_units"] == 2 and isinstance(out["active_units"], int)
    assert ACTIVE_UNIT_THRESHOLD == 0.01
    # With the biased variance (N in the denominator) column 0 would still count, column 1 not: 0.04 * 2/3
    # and 0.0081 * 2/3. Scaling column 1 by 1.2 puts it between the two: 0.011664 unbiased, 0.007776 biased.
    assert collapse_diagnostics(mu * torch.tensor([1.0, 1.2, 1.0, 1.0]), log_sigma)["active_units"] == 3
    # Means that agree across images: no active unit, whatever the spread of q.
    assert collapse_diagnostics(mu[:1].expand(3, 4), log_sigma)["active_units"] == 0
    # Two images (the smallest sample with a variance): means 0 and 0.2 vary by 0.02. A variance of
    # exactly the threshold (float64: 0.1414213562373095^2 / 2 == 0.01) is not "above" it.
    two = torch.tensor([[0.0, 0.0], [0.2, 0.1414213562373095]], dtype=torch.float64)
    assert float(two[:, 1].var()) == ACTIVE_UNIT_THRESHOLD
    assert collapse_diagnostics(two, torch.zeros_like(two))["active_units"] == 1
    # One image: no variance to measure, no active unit, and its own KL.
    one = collapse_diagnostics(mu[:1], log_sigma[:1])
    assert one["active_units"] == 0 and one["kl_z_per_image"] == pytest.approx(kl_rows[0], rel=1e-6)


@pytest.mark.parametrize("name", ["amortized", "factorized", "constant"])
def test_the_chunked_local_posterior_equals_one_pass_over_every_image(name):
    """Chunks of 3 over N = 10 images (a remainder of 1) give the rows one call of the family gives; for
    a factorized family without explicit rows, image n is factor n (the chunk's offset is kept)."""
    decoder = _decoder()
    torch.manual_seed(2)
    family = build_family(family_config(name, width=4), data_dim=6, latent_dim=3, num_data=10)
    with torch.no_grad():
        for p in family.parameters():
            p.normal_(0.0, 0.5)  # factors and weights that differ row by row
    x = torch.rand(10, 6, generator=torch.Generator().manual_seed(3))
    every = torch.arange(10)
    want_mu, want_ls = family.local_params(x, every, None)
    for idx in (None, every):
        mu, ls = local_posterior(decoder, family, x, idx, chunk=3)
        assert mu.shape == ls.shape == (10, 3) and not mu.requires_grad
        assert torch.equal(mu, want_mu.detach()) and torch.equal(ls, want_ls.detach())
    # Explicit rows are used as given: the images in reverse order read the factors in reverse order.
    backwards = every.flip(0)
    mu, _ = local_posterior(decoder, family, x, backwards, chunk=3)
    assert torch.equal(mu, family.local_params(x, backwards, None)[0].detach())


@torch.no_grad()
def test_sa_vi_local_posterior_is_the_encoder_refined_on_the_local_elbo_at_the_posterior_mean():
    """SA-VI's q(z): the encoder's output after its K refinement steps on the single-draw local ELBO
    with theta at its posterior mean, drawing from the given generator; without refinement (as for a
    plain encoder) it would be the encoder's output."""
    decoder = _decoder()
    torch.manual_seed(2)
    family = build_family(family_config("semi-amortized", width=4, refine_steps=3, refine_lr=0.5),
                          data_dim=6, latent_dim=3, num_data=10)
    x = torch.rand(10, 6, generator=torch.Generator().manual_seed(3))
    mu, ls = local_posterior(decoder, family, x, None, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    with torch.enable_grad():
        want_mu, want_ls = family.local_params(x, torch.arange(10), make_local_elbo(decoder, 1, g))
    assert torch.equal(mu, want_mu.detach()) and torch.equal(ls, want_ls.detach())
    encoder_mu, _ = family.encode(x)
    assert float((mu - encoder_mu).abs().max()) > 1e-3  # the refinement moved it
    # Two draws per step, or another generator, refine differently.
    with torch.enable_grad():
        two_mu, _ = family.local_params(x, torch.arange(10), make_local_elbo(decoder, 2,
                                                                             torch.Generator().manual_seed(4)))
    assert not torch.equal(mu, two_mu.detach())
    other, _ = local_posterior(decoder, family, x, None, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(mu, other)


def _legacy_by_hand(decoder, family, x, num_data, num_samples, generator):
    """The published code's objective at the draws the implementation takes from ``generator`` (theta's
    noise first, then z's): its likelihood -||x - Omega||^2, priors -theta^2 and -z^2 / 2, and
    -log q = 1/2 [log s + (s eps)^2 / s] with the standard deviation s where the variance belongs, each
    summed over everything and averaged over the S draws, the batch's terms scaled by num_data / B
    (SPEC §3)."""
    S = num_samples
    eps_theta = decoder.theta_noise(S, generator)
    s_theta = decoder.theta_log_scale.exp()
    theta_flat = decoder.theta_loc + s_theta * eps_theta
    theta = decoder.draw(theta_flat, eps_theta)
    refine = make_local_elbo(decoder, 1, generator) if family.refines_locally else None
    with torch.enable_grad():  # SA-VI's refinement steps take gradients of the local ELBO
        mu, log_sigma = family.local_params(x, torch.arange(x.shape[0]), refine)
    mu, log_sigma = mu.detach(), log_sigma.detach()
    eps_z = torch.randn((S, *mu.shape), generator=generator)
    sigma = log_sigma.exp()
    z = mu + sigma * eps_z
    mean = decoder.decode(z, theta)
    log_lik = -((x - mean) ** 2).sum() / S
    prior_z = (-0.5 * z**2).sum() / S
    neg_log_q_z = (0.5 * (log_sigma + (sigma * eps_z) ** 2 / sigma)).sum() / S
    prior_theta = (-(theta_flat**2)).sum() / S
    neg_log_q_theta = (0.5 * (decoder.theta_log_scale + (s_theta * eps_theta) ** 2 / s_theta)).sum() / S
    scale = num_data / x.shape[0]
    return float(scale * (log_lik + prior_z + neg_log_q_z) + prior_theta + neg_log_q_theta)


@pytest.mark.parametrize("name", ["amortized", "factorized", "semi-amortized"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_legacy_objective_value_is_its_definition_at_the_same_draws(name, num_samples):
    """SA-VI included: its q(z) is the encoder's output refined on the local ELBO (draws from the same
    generator, between theta's and z's), which needs gradients where the rest needs none."""
    decoder = _decoder()
    torch.manual_seed(4)
    family = build_family(family_config(name, width=4), data_dim=6, latent_dim=3, num_data=8)
    with torch.no_grad():
        for p in family.parameters():
            p.normal_(0.0, 0.5)
    x = torch.rand(8, 6, generator=torch.Generator().manual_seed(5))
    for num_data in (8, 20):  # the whole data set in the batch, and a batch of 8 of 20 images
        value = legacy_objective_value(decoder, family, x, num_data, num_samples, torch.Generator().manual_seed(6))
        expected = _legacy_by_hand(decoder, family, x, num_data, num_samples, torch.Generator().manual_seed(6))
        assert value == pytest.approx(expected, rel=1e-5)
