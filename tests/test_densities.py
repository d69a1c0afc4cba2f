"""Every function of densities.py against an independent reference in float64: torch.distributions for
the densities, entropies and KLs, and the published code's expressions written out for the legacy-2024
terms; the fused sums against the elementwise values they stand for, in value and gradient; default
arguments included (issue 21: each of these was changed by a surviving one-line mutant)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from amortized_bayes import densities as dens

G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_normal_log_probs_equal_torch_distributions():
    value, loc, log_sigma = _randn(4, 5), _randn(4, 5), 0.5 * _randn(4, 5)
    expected = Normal(loc, log_sigma.exp()).log_prob(value)
    torch.testing.assert_close(dens.normal_log_prob(value, loc, log_sigma), expected)
    eps = (value - loc) / log_sigma.exp()
    torch.testing.assert_close(dens.normal_log_prob_from_noise(eps, log_sigma), expected)
    # The total over S draws of a (P,) log sigma.
    eps2, ls = _randn(3, 7), 0.3 * _randn(7)
    torch.testing.assert_close(dens.normal_log_prob_from_noise_total(eps2, ls),
                               Normal(0.0, 1.0).log_prob(eps2).sum() - 3 * ls.sum())


@pytest.mark.parametrize("scale", [None, 1.0, 0.37, 2.5])
def test_centred_normal_log_prob_and_its_total_equal_torch_distributions(scale):
    value = _randn(6, 4) * 1.7
    ref = Normal(0.0, 1.0 if scale is None else scale).log_prob(value)
    args = () if scale is None else (scale,)  # None: the default scale, which must be 1
    torch.testing.assert_close(dens.standard_normal_log_prob(value, *args), ref)
    torch.testing.assert_close(dens.standard_normal_log_prob_total(value, *args), ref.sum())


@pytest.mark.parametrize("prior_scale", [None, 1.0, 0.6, 3.0])
def test_kl_to_a_centred_normal_and_the_entropy_equal_torch_closed_forms(prior_scale):
    loc, log_sigma = _randn(5, 3), 0.7 * _randn(5, 3)
    prior = Normal(0.0, 1.0 if prior_scale is None else prior_scale)
    args = () if prior_scale is None else (prior_scale,)
    torch.testing.assert_close(dens.kl_normal_to_centered(loc, log_sigma, *args),
                               kl_divergence(Normal(loc, log_sigma.exp()), prior))
    torch.testing.assert_close(dens.normal_entropy(log_sigma), Normal(loc, log_sigma.exp()).entropy())


@pytest.mark.parametrize("obs_var", [1.0, 0.03, 2.7])
def test_every_gaussian_likelihood_form_equals_torch_distributions_in_value_and_gradient(obs_var):
    x = torch.rand(4, 9, generator=G, dtype=torch.float64)
    mean = _randn(3, 4, 9).requires_grad_(True)
    expected = Normal(mean, math.sqrt(obs_var)).log_prob(x).sum(-1)  # (S, B)
    (g_expected,) = torch.autograd.grad(expected.sum(), mean)
    torch.testing.assert_close(dens.gaussian_log_likelihood(x, mean, obs_var), expected)
    total = dens.gaussian_log_likelihood_total(x, mean, obs_var)
    torch.testing.assert_close(total, expected.sum())
    torch.testing.assert_close(torch.autograd.grad(total, mean)[0], g_expected)
    resid = (mean - x).detach().requires_grad_(True)
    per_image = dens.gaussian_log_likelihood_of_residual_per_image(resid, obs_var)
    torch.testing.assert_close(per_image, expected.detach())
    torch.testing.assert_close(torch.autograd.grad(per_image.sum(), resid)[0], g_expected)
    fresh = (mean - x).detach().clone().requires_grad_(True)
    summed = dens.gaussian_log_likelihood_of_residual(fresh, obs_var)
    torch.testing.assert_close(summed, expected.sum().detach())
    torch.testing.assert_close(torch.autograd.grad(summed, fresh)[0], g_expected)
    # The affine form: mean = h W^T + b, with gradients to h, W and b.
    h, w, b = _randn(4, 6), _randn(9, 6), _randn(9)
    params = [t.requires_grad_(True) for t in (h, w, b)]
    affine = dens.gaussian_log_likelihood_of_affine_mean(*params, x, obs_var)
    plain = Normal(h @ w.T + b, math.sqrt(obs_var)).log_prob(x).sum()
    torch.testing.assert_close(affine, plain)
    for a, p in zip(torch.autograd.grad(affine, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, p)


def test_the_per_image_gaussian_likelihood_takes_its_dimension_from_the_last_axis():
    """x may carry leading axes of its own ((S, B, D) here, with D != B): the constant counts D pixels."""
    x, mean = torch.rand(2, 3, 5, generator=G, dtype=torch.float64), _randn(2, 3, 5)
    torch.testing.assert_close(dens.gaussian_log_likelihood(x, mean, 0.4),
                               Normal(mean, math.sqrt(0.4)).log_prob(x).sum(-1))


def test_the_fused_gaussian_totals_keep_float32_accurate_at_full_batch():
    """In float32 at a full batch of 10,000 MNIST-sized images (7.8 million residuals), the fused
    likelihoods sum the squares image by image: within 2e-6 of the float64 total. One norm over the
    whole tensor, squared, is off by ~5e-4 of it here, which is 2,000 nats at obs_var = 0.01."""
    g = torch.Generator().manual_seed(5)
    m, d, hidden, obs_var = 10_000, 784, 8, 0.01
    f32 = {"generator": g, "dtype": torch.float32}  # this file's fixture makes float64 the default
    x = torch.rand(m, d, **f32)
    h, w = torch.randn(m, hidden, **f32), 0.05 * torch.randn(d, hidden, **f32)
    b = 0.5 + 0.1 * torch.randn(d, **f32)

    def exact(resid64):
        return float(-0.5 * resid64.square().sum() / obs_var - 0.5 * resid64.numel() * math.log(2 * math.pi * obs_var))

    resid64 = h.double() @ w.double().T + b.double() - x.double()
    expected = exact(resid64)
    affine = float(dens.gaussian_log_likelihood_of_affine_mean(h, w, b, x, obs_var))
    assert abs(affine - expected) < 2e-6 * abs(expected), (affine, expected)
    resid = (h @ w.T + b - x).view(2, m // 2, d)  # (S, B, D) as the Monte Carlo terms give it
    summed = float(dens.gaussian_log_likelihood_of_residual(resid, obs_var))
    expected = exact(resid.double())
    assert abs(summed - expected) < 2e-6 * abs(expected), (summed, expected)


def test_rescaling_a_unit_variance_sum_gives_the_likelihood_at_any_variance():
    x, mean = torch.rand(5, 8, generator=G, dtype=torch.float64), _randn(5, 8)
    unit = Normal(mean, 1.0).log_prob(x).sum()
    for var in (0.05, 1.0, 4.0):
        log_var = torch.tensor(math.log(var))
        torch.testing.assert_close(dens.rescale_gaussian_log_likelihood(unit, x.numel(), log_var),
                                   Normal(mean, math.sqrt(var)).log_prob(x).sum())


def test_bernoulli_likelihood_equals_torch_distributions_on_binary_and_grey_pixels():
    logits = _randn(2, 3, 10) * 3
    binary = (torch.rand(3, 10, generator=G, dtype=torch.float64) > 0.5).double()
    torch.testing.assert_close(dens.bernoulli_log_likelihood(binary, logits),
                               Bernoulli(logits=logits).log_prob(binary).sum(-1))
    grey = torch.rand(3, 10, generator=G, dtype=torch.float64)  # the cross-entropy form, as the published code uses it
    p = torch.sigmoid(logits)
    torch.testing.assert_close(dens.bernoulli_log_likelihood(grey, logits),
                               (grey * p.log() + (1 - grey) * (1 - p).log()).sum(-1))


def test_legacy_terms_are_the_published_expressions():
    eps, log_sigma = _randn(4, 3), 0.4 * _randn(4, 3)
    s = log_sigma.exp()
    v_minus_m = s * eps
    # The published log q: -1/2 [log s + (v - m)^2 / s], with the sd where the variance belongs.
    torch.testing.assert_close(dens.legacy_log_q(eps, log_sigma), -0.5 * (log_sigma + v_minus_m**2 / s))
    theta, z = _randn(7), _randn(2, 5)
    torch.testing.assert_close(dens.legacy_log_prior_theta(theta), -theta * theta)
    torch.testing.assert_close(dens.legacy_log_prior_z(z), -0.5 * z * z)
    x, mean = torch.rand(3, 6, generator=G, dtype=torch.float64), _randn(3, 6)
    torch.testing.assert_close(dens.legacy_log_likelihood(x, mean), -((x - mean) ** 2).sum(-1))
    # N(0, 1/2) without its constant: the legacy prior differs from the density by a constant only.
    diff = dens.legacy_log_prior_theta(theta) - Normal(0.0, math.sqrt(0.5)).log_prob(theta)
    torch.testing.assert_close(diff, diff[0].expand_as(diff))
