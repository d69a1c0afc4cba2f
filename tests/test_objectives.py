"""Densities, KL terms, estimators and the legacy objective against references and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from amortized_bayes import densities as dens
from amortized_bayes import objectives
from amortized_bayes.config import family_config, ModelConfig, ObjectiveConfig
from amortized_bayes.families import build_family
from amortized_bayes.model import BayesianDecoder
from amortized_bayes.objectives import draw_z, objective_terms

from . import linear_gaussian as lg

torch.set_default_dtype(torch.float32)


def test_normal_log_prob_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    v, m, ls = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    ref = Normal(m, ls.exp())
    torch.testing.assert_close(dens.normal_log_prob(v, m, ls), ref.log_prob(v))
    eps = (v - m) / ls.exp()
    torch.testing.assert_close(dens.normal_log_prob_from_noise(eps, ls), ref.log_prob(v))
    torch.testing.assert_close(dens.normal_entropy(ls), ref.entropy())
    torch.testing.assert_close(dens.standard_normal_log_prob(v, 2.5), Normal(0.0, 2.5).log_prob(v))


def test_likelihoods_match_torch_distributions_with_constants():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 9, generator=g, dtype=torch.float64)
    mean = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    for var in (1.0, 0.5, 0.01):
        ref = Normal(mean, math.sqrt(var)).log_prob(x).sum(-1)
        torch.testing.assert_close(dens.gaussian_log_likelihood(x, mean, var), ref)
    xb = (x > 0.5).double()
    torch.testing.assert_close(dens.bernoulli_log_likelihood(xb, mean), Bernoulli(logits=mean).log_prob(xb).sum(-1))


@pytest.mark.parametrize("prior_scale", [1.0, 0.3, 2.0])
def test_kl_matches_torch_kl_divergence(prior_scale):
    g = torch.Generator().manual_seed(2)
    m, ls = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m, ls.exp()), Normal(torch.zeros(50, dtype=torch.float64), prior_scale))
    torch.testing.assert_close(dens.kl_normal_to_centered(m, ls, prior_scale), ref)


def small_setup(family="factorized", n=40, likelihood="gaussian", seed=0, **family_options):
    torch.manual_seed(seed)
    cfg = ModelConfig(latent_dim=3, hidden=8, depth=1, data_dim=10, likelihood=likelihood, obs_var=0.7,
                      prior_scale=0.9, init_log_scale=-1.0)
    model = BayesianDecoder(cfg)
    fam = build_family(family_config(name=family, width=6, depth=1, **family_options), num_data=n,
                       data_dim=10, latent_dim=3)
    with torch.no_grad():  # move the free factors away from their init so every term matters
        for p in fam.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(n, 10)
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    return model, fam, x


def repeated(fn, reps):
    vals = torch.tensor([float(fn()) for _ in range(reps)], dtype=torch.float64)
    return float(vals.mean()), float(vals.std() / math.sqrt(reps))


@pytest.mark.parametrize("family", ["factorized", "amortized", "constant"])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_mc_and_analytic_estimate_the_same_elbo(family, likelihood):
    model, fam, x = small_setup(family, likelihood=likelihood)
    g = torch.Generator().manual_seed(3)
    idx = torch.arange(x.shape[0])
    means = {}
    for est in ("mc", "analytic"):
        cfg = ObjectiveConfig(estimator=est, num_samples=4)
        with torch.no_grad():
            means[est] = repeated(lambda cfg=cfg: objective_terms(model, fam, x, idx, num_data=x.shape[0], config=cfg,
                                                                  generator=g).value, 1500)
    (m1, s1), (m2, s2) = means["mc"], means["analytic"]
    assert abs(m1 - m2) < 3 * math.hypot(s1, s2), means


@pytest.mark.parametrize("scheme", ["batch", "all"])
@pytest.mark.parametrize("family", ["factorized", "amortized"])
def test_minibatch_estimate_is_unbiased_for_the_full_data_elbo(scheme, family):
    model, fam, x = small_setup(family)
    n, b = x.shape[0], 8
    g = torch.Generator().manual_seed(4)
    full_cfg = ObjectiveConfig(estimator="mc", local_terms="batch", num_samples=2)
    mini_cfg = ObjectiveConfig(estimator="mc", local_terms=scheme, num_samples=2)
    idx = torch.arange(n)
    with torch.no_grad():
        full = repeated(lambda: objective_terms(model, fam, x, idx, num_data=n, config=full_cfg, generator=g).value,
                        1500)

        def mini():
            rows = torch.randperm(n, generator=g)[:b]
            return objective_terms(model, fam, x[rows], rows, num_data=n, config=mini_cfg, generator=g,
                                   x_all=x).value

        batch = repeated(mini, 4000)
    assert abs(full[0] - batch[0]) < 3 * math.hypot(full[1], batch[1]), (full, batch)


def test_mc_gradient_is_unbiased_for_the_exact_elbo_gradient():
    """On the linear-Gaussian model the ELBO of an F-VI q is known exactly; the mean of the Monte Carlo
    gradients wrt (mu, log sigma) must match autograd of the closed form."""
    model = lg.make(D=5, d=2, obs_var=0.6, seed=3)
    x = model.sample(6, torch.Generator().manual_seed(5))
    decoder = model.decoder().requires_grad_(False)
    fam = build_family(family_config(name="factorized"), num_data=6, data_dim=5, latent_dim=2)
    with torch.no_grad():
        fam.loc.weight.copy_(torch.randn(6, 2) * 0.5)
        fam.log_sigma.weight.copy_(torch.randn(6, 2) * 0.3 - 0.5)
    params = [fam.loc.weight, fam.log_sigma.weight]
    exact = torch.autograd.grad(model.elbo(x, *params).sum(), params)
    g = torch.Generator().manual_seed(6)
    cfg = ObjectiveConfig(estimator="mc", num_samples=1)
    grads = []
    for _ in range(3000):
        terms = objective_terms(decoder, fam, x, torch.arange(6), num_data=6, config=cfg, generator=g)
        local = terms.log_lik + terms.log_prior_z + terms.entropy_z  # theta terms carry no such gradient
        grads.append(torch.cat([gr.flatten() for gr in torch.autograd.grad(local, params)]))
    grads = torch.stack(grads).double()
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    target = torch.cat([e.flatten() for e in exact]).double()
    assert bool(((mean - target).abs() < 4 * se + 1e-4).all()), (mean - target) / se


def test_legacy_2024_equals_its_formula_computed_directly():
    """SPEC §3 legacy-2024, written out by hand on a tiny example with the same random draws."""
    model, fam, x = small_setup("factorized", n=12)
    n, rows = 12, torch.tensor([3, 7, 1, 10])
    cfg = ObjectiveConfig(kind="legacy-2024", estimator="mc", local_terms="batch", num_samples=3)
    with torch.no_grad():
        got = objective_terms(model, fam, x[rows], rows, num_data=n, config=cfg,
                              generator=torch.Generator().manual_seed(9)).value
        # Replay the draws in the objective's order: theta, then z.
        g = torch.Generator().manual_seed(9)
        theta = model.sample(3, g)
        mu, ls = fam.loc.weight[rows], fam.log_sigma.weight[rows]
        z, _ = draw_z(mu, ls, 3, g)
        W1, b1, W2, b2 = theta.values
        omega = F.leaky_relu(z @ W1.transpose(1, 2) + b1[:, None], 0.2) @ W2.transpose(1, 2) + b2[:, None]
        scale = n / len(rows)
        lik = -scale * ((x[rows] - omega) ** 2).sum() / 3
        prior_z = -0.5 * scale * (z**2).sum() / 3
        s_z = ls.exp()
        log_q_z = -0.5 * scale * (torch.log(s_z) + (z - mu) ** 2 / s_z).sum() / 3
        prior_theta = -sum((v**2).sum() for v in theta.values) / 3
        log_q_theta = -0.5 * sum((torch.log(s.exp()) + (v - m) ** 2 / s.exp()).sum()
                                 for v, m, s in zip(theta.values, model.loc, model.log_scale)) / 3
        want = lik + prior_z - log_q_z + prior_theta - log_q_theta
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_theta_terms_counted_once_per_step_whatever_the_batch():
    model, fam, x = small_setup("factorized")
    cfg = ObjectiveConfig(estimator="analytic")
    with torch.no_grad():
        a = objective_terms(model, fam, x[:4], torch.arange(4), num_data=40, config=cfg)
        b = objective_terms(model, fam, x, torch.arange(40), num_data=40, config=cfg)
    kl_theta = sum(dens.kl_normal_to_centered(m, s, 0.9).sum() for m, s in zip(model.loc, model.log_scale))
    for t in (a, b):
        torch.testing.assert_close(t.log_prior_theta + t.entropy_theta, -kl_theta)


def test_fused_gaussian_log_likelihood_total_matches_the_plain_expression():
    from amortized_bayes.densities import gaussian_log_likelihood, gaussian_log_likelihood_total

    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 11, generator=g, dtype=torch.float64)
    mean = torch.randn(3, 7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    plain = gaussian_log_likelihood(x, mean, 0.3).sum()
    (g_plain,) = torch.autograd.grad(plain, mean)
    fused = gaussian_log_likelihood_total(x, mean, 0.3)
    (g_fused,) = torch.autograd.grad(fused, mean)
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    assert torch.allclose(g_fused, g_plain, rtol=1e-12, atol=1e-12)
    # The backward reuses the residual in place, so a second backward through a retained graph must
    # fail loudly rather than return a wrong gradient.
    again = gaussian_log_likelihood_total(x, mean, 0.3)
    torch.autograd.grad(again, mean, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(again, mean)


def test_per_image_residual_likelihood_matches_the_plain_expression_to_second_order():
    # SA-VI differentiates through its refinement gradients, so the first and second derivatives
    # of the fused per-image likelihood must both be right.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 9, generator=g, dtype=torch.float64)
    mean = torch.randn(2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    fused = dens.gaussian_log_likelihood_of_residual_per_image(mean - x, 0.4)
    plain = dens.gaussian_log_likelihood(x, mean, 0.4)
    assert fused.shape == (2, 5)
    assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-12)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (g_fused,) = torch.autograd.grad((w * fused).sum(), mean, create_graph=True)
    (g_plain,) = torch.autograd.grad((w * plain).sum(), mean, create_graph=True)
    assert torch.allclose(g_fused, g_plain, rtol=1e-12, atol=1e-12)
    v = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    (h_fused,) = torch.autograd.grad((v * g_fused).sum(), mean)
    (h_plain,) = torch.autograd.grad((v * g_plain).sum(), mean)
    assert torch.allclose(h_fused, h_plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda r: dens.gaussian_log_likelihood_of_residual_per_image(r, 0.4),
                                        (mean.detach() - x).requires_grad_(True))


@pytest.mark.parametrize("num_samples", [1, 3])
def test_flat_theta_draws_and_gradients_match_a_per_tensor_reference(num_samples):
    """q(theta) is stored flat; its draws, Monte Carlo terms and gradients must be those of the plain
    per-tensor expressions with the same noise."""
    model, fam, x = small_setup("amortized")
    S = num_samples
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    theta = model.sample(S, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    eps = [e.clone() for e in theta.eps]
    assert all(e.shape == (S, *m.shape) for e, m in zip(eps, model.loc))
    assert abs(float(torch.cat([e.reshape(-1) for e in eps]).std()) - 1) < 0.25  # standard normal noise
    locs = [m.detach().clone().requires_grad_(True) for m in model.loc]
    scales = [s.detach().clone().requires_grad_(True) for s in model.log_scale]
    values = [m + s.exp() * e for m, s, e in zip(locs, scales, eps)]
    for got, want in zip(theta.values, values):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    z = torch.randn(S, 5, model.config.latent_dim, generator=g)
    prior, entropy = objectives.ELBO().theta_terms(model, theta, "mc")
    loss = (model.decode(z, theta) ** 2).sum() + prior + entropy
    loss.backward()
    ref_prior = sum(dens.standard_normal_log_prob(v, 0.9).sum() for v in values) / S
    ref_entropy = -sum(dens.normal_log_prob_from_noise(e, s).sum() for e, s in zip(eps, scales)) / S
    h = z
    for layer in range(len(values) // 2):
        h = h @ values[2 * layer].transpose(1, 2) + values[2 * layer + 1][:, None]
        if layer < len(values) // 2 - 1:
            h = F.leaky_relu(h, 0.2)
    ref = (h**2).sum() + ref_prior + ref_entropy
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-3)
    for flat_grad, ref_params in ((model.theta_loc.grad, locs), (model.theta_log_scale.grad, scales)):
        torch.testing.assert_close(flat_grad, torch.cat([p.grad.reshape(-1) for p in ref_params]),
                                   rtol=1e-4, atol=1e-4)
    # The analytic terms over the flat vectors equal the per-tensor sums.
    prior_a, entropy_a = objectives.ELBO().theta_terms(model, theta, "analytic")
    want_kl = sum(dens.kl_normal_to_centered(m, s, 0.9).sum() for m, s in zip(model.loc, model.log_scale))
    torch.testing.assert_close(prior_a + entropy_a, -want_kl)


def test_theta_terms_of_a_draw_given_tensor_by_tensor_equal_those_of_the_flat_draw():
    """A ThetaDraw need not carry the flat (S, P) matrices (a decoder or objective written outside the
    package may give only the per-tensor values and noise): its Monte Carlo theta terms are then the
    same, and without its noise they refuse with the reason."""
    from amortized_bayes.model import ThetaDraw

    model, _, _ = small_setup("amortized")
    with torch.no_grad():
        model.theta_log_scale.uniform_(-2, 0, generator=torch.Generator().manual_seed(1))
    S = 3
    flat_draw = model.sample(S, torch.Generator().manual_seed(5))
    assert flat_draw.flat is not None and flat_draw.eps_flat is not None
    per_tensor = ThetaDraw([v.clone() for v in flat_draw.values], [e.clone() for e in flat_draw.eps])
    want = objectives.ELBO().theta_terms(model, flat_draw, "mc")
    got = objectives.ELBO().theta_terms(model, per_tensor, "mc")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-3)
    # Only the values, no noise: no entropy estimate can be formed.
    with pytest.raises(AssertionError) as err:
        objectives.ELBO().theta_terms(model, ThetaDraw(per_tensor.values, None), "mc")
    assert str(err.value) == "theta_terms needs the noise of a reparameterised draw"


def test_checkpoints_with_per_tensor_theta_still_load():
    """Models saved before q(theta) was stored flat hold loc.0, loc.1, ... and log_scale.0, ..."""
    model, _, _ = small_setup("amortized")
    with torch.no_grad():
        model.theta_log_scale.uniform_(-3, -1)
    old_format = {f"loc.{i}": v.detach().clone() for i, v in enumerate(model.loc)}
    old_format.update({f"log_scale.{i}": v.detach().clone() for i, v in enumerate(model.log_scale)})
    fresh, _, _ = small_setup("amortized")
    fresh.load_state_dict(old_format)
    assert torch.equal(fresh.theta_loc, model.theta_loc)
    assert torch.equal(fresh.theta_log_scale, model.theta_log_scale)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_fused_theta_terms_and_residual_decoding_match_the_separate_expressions(num_samples):
    """The training objective's fused paths (theta drawn with its Monte Carlo terms in one autograd node;
    the Gaussian residual formed inside the last product) against model.sample + theta_terms and
    decode(z) - x: same values and gradients, in float64, for one and several draws."""
    torch.manual_seed(3)
    cfg = ModelConfig(latent_dim=3, hidden=8, depth=2, data_dim=10, obs_var=0.7, prior_scale=0.9, init_log_scale=-1.0)
    model = BayesianDecoder(cfg).double()
    with torch.no_grad():
        model.theta_log_scale.uniform_(-2, 0)
    x = torch.rand(5, 10, dtype=torch.float64)
    S = num_samples

    def run(fused: bool, single_theta: bool):
        model.zero_grad()
        g = torch.Generator().manual_seed(11)
        if fused:
            theta, prior, entropy = objectives.sample_theta_with_terms(model, S, g)
        else:
            theta = model.sample(S, g)
            prior, entropy = objectives.ELBO().theta_terms(model, theta, "mc")
        if single_theta:
            theta = model.draw(theta.flat[:1], None)
        z = torch.randn(S, 5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
        if fused:  # the trainer's path: the last layer and the likelihood in one node for a single theta
            ll = objectives.likelihood_of(model).decoded_total(model, x, z, theta)
        else:
            ll = dens.gaussian_log_likelihood(x, model.decode(z, theta), 0.7).sum()
        total = 1.7 * ll + prior + entropy
        total.backward()
        return ([float(t.detach()) for t in (ll, prior, entropy)], model.theta_loc.grad.clone(),
                model.theta_log_scale.grad.clone(), z.grad.clone())

    for single_theta in (False, True):
        (v1, *grads1), (v2, *grads2) = run(True, single_theta), run(False, single_theta)
        assert v1 == pytest.approx(v2, rel=1e-12)
        for got, want in zip(grads1, grads2):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_last_layer_fused_with_the_gaussian_likelihood_matches_the_plain_expression():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(6, 9, generator=g, dtype=torch.float64)
    for scale in (1.0, -2.5):  # the incoming gradient enters the products as a scale factor
        fused = dens.gaussian_log_likelihood_of_affine_mean(h, w, b, x, 0.3)
        plain = dens.gaussian_log_likelihood(x, h @ w.T + b, 0.3).sum()
        assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
        for got, want in zip(torch.autograd.grad(scale * fused, (h, w, b)),
                             torch.autograd.grad(scale * plain, (h, w, b))):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Only the inputs that need a gradient get one (a frozen decoder: h alone).
    (g_h,) = torch.autograd.grad(dens.gaussian_log_likelihood_of_affine_mean(h, w.detach(), b.detach(), x, 0.3), h)
    torch.testing.assert_close(g_h, torch.autograd.grad(dens.gaussian_log_likelihood(x, h @ w.T + b, 0.3).sum(), h)[0])


@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_local_draws_match_draw_z_and_local_terms(num_samples, shared):
    """z with its Monte Carlo terms from one node, against draw_z + local_terms (float64), for per-image
    factors and for one factor expanded over the batch (constant-VI)."""
    g0 = torch.Generator().manual_seed(2)
    base_mu = torch.randn(1 if shared else 6, 3, generator=g0, dtype=torch.float64)
    base_ls = 0.3 * torch.randn(1 if shared else 6, 3, generator=g0, dtype=torch.float64)
    weights = torch.randn(num_samples, 6, 3, generator=g0, dtype=torch.float64)
    results = []
    for fused in (True, False):
        mu_p, ls_p = base_mu.clone().requires_grad_(True), base_ls.clone().requires_grad_(True)
        mu, ls = mu_p.expand(6, 3), ls_p.expand(6, 3)
        g = torch.Generator().manual_seed(7)
        if fused:
            z, lp, ent = objectives.ELBO().draw_z_with_terms(mu, ls, num_samples, g, "mc")
        else:
            z, eps = draw_z(mu, ls, num_samples, g)
            lp, ent = objectives.ELBO().local_terms(mu, ls, z, eps, "mc")
        total = (weights * z).sum() + (z**2).sum() + 1.3 * lp + 0.7 * ent
        total.backward()
        results.append((z.detach(), float(lp.detach()), float(ent.detach()), mu_p.grad, ls_p.grad))
    (z1, lp1, e1, gm1, gs1), (z2, lp2, e2, gm2, gs2) = results
    torch.testing.assert_close(z1, z2)
    assert (lp1, e1) == pytest.approx((lp2, e2), rel=1e-12)
    torch.testing.assert_close(gm1, gm2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs1, gs2, rtol=1e-10, atol=1e-12)


def test_the_local_elbo_closure_scores_the_theta_it_was_given_and_defaults_to_one_draw_at_the_mean():
    """make_local_elbo: with a theta, that theta (not the posterior mean); without one, the mean as it is
    when called; num_samples 1 by default; each value is elbo_per_image on the images passed."""
    torch.manual_seed(0)
    model = BayesianDecoder(ModelConfig(latent_dim=2, hidden=5, depth=1, data_dim=6, obs_var=0.4)).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    mu, log_sigma = torch.randn(3, 2, dtype=torch.float64), torch.full((3, 2), -1.0, dtype=torch.float64)
    draw = model.sample(1, torch.Generator().manual_seed(1))

    def direct(theta, samples, seed):
        return objectives.elbo_per_image(model, x, mu, log_sigma, theta, samples, torch.Generator().manual_seed(seed))

    with_draw = objectives.make_local_elbo(model, 1, torch.Generator().manual_seed(2), theta=draw)(x, mu, log_sigma)
    torch.testing.assert_close(with_draw, direct(draw, 1, 2))
    at_mean = objectives.make_local_elbo(model, 1, torch.Generator().manual_seed(2))(x, mu, log_sigma)
    torch.testing.assert_close(at_mean, direct(model.mean(), 1, 2))
    assert not torch.allclose(with_draw, at_mean)
    default = objectives.make_local_elbo(model, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(default(x, mu, log_sigma), direct(model.mean(), 1, 3))
    assert default(x[:2], mu[:2], log_sigma[:2]).shape == (2,)
    # The mean is read when the closure is called, so it follows training.
    late = objectives.make_local_elbo(model, 1, torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.theta_loc.add_(0.5)
    torch.testing.assert_close(late(x, mu, log_sigma), direct(model.mean(), 1, 4))


def test_register_objective_makes_the_class_available_by_its_kind():
    @objectives.register_objective
    class Doubled(objectives.ELBO):
        kind = "doubled-elbo-for-a-test"

    try:
        assert isinstance(objectives.get_objective("doubled-elbo-for-a-test"), Doubled)
    finally:
        del objectives.OBJECTIVES["doubled-elbo-for-a-test"]


@pytest.mark.parametrize("scheme", ["batch", "all"])
def test_the_training_loss_is_minus_the_objective_at_the_same_draws(scheme):
    """negative_elbo, what the trainer minimises: -(objective_terms' value) for the same batch, rows,
    generator state and (with local_terms="all") the whole data set; a different generator state draws
    other noise. Checked here in process because only the training tests called it."""
    model, fam, x = small_setup("amortized")
    n, rows = x.shape[0], torch.tensor([3, 0, 7, 5])
    cfg = ObjectiveConfig(estimator="mc", local_terms=scheme, num_samples=2)
    with torch.no_grad():
        loss = objectives.negative_elbo(model, fam, x[rows], rows, num_data=n, config=cfg,
                                        generator=torch.Generator().manual_seed(8), x_all=x)
        value = objective_terms(model, fam, x[rows], rows, num_data=n, config=cfg,
                                generator=torch.Generator().manual_seed(8), x_all=x).value
        other = objectives.negative_elbo(model, fam, x[rows], rows, num_data=n, config=cfg,
                                         generator=torch.Generator().manual_seed(9), x_all=x)
    assert loss.dim() == 0 and torch.equal(loss, -value)
    assert float(value) < 0 < float(loss)  # an ELBO of real images is far below 0 nats
    assert not torch.equal(loss, other)


def _closed_form_local_terms(mu, log_sigma):
    """(E log p(z), E[-log q(z)]) summed over the rows of q = N(mu, sigma^2), from torch.distributions."""
    q = Normal(mu, log_sigma.exp())
    entropy = q.entropy().sum()
    return -kl_divergence(q, Normal(0.0, 1.0)).sum() - entropy, entropy


@pytest.mark.parametrize("family", ["factorized", "amortized", "semi-amortized"])
def test_analytic_local_terms_cover_every_image_with_all_and_the_scaled_batch_otherwise(family):
    """With the closed-form estimator the local terms are known exactly: local_terms="all" gives those
    of every one of the N images, whichever batch the step has (SA-VI's q refined with the step's own
    generator); "batch" gives N/B times those of the batch's rows."""
    model, fam, x = small_setup(family, refine_steps=2) if family == "semi-amortized" else small_setup(family)
    n, all_rows = x.shape[0], torch.arange(x.shape[0])
    with torch.no_grad():
        for scheme in ("all", "batch"):
            cfg = ObjectiveConfig(estimator="analytic", local_terms=scheme, num_samples=2)
            for rows in (torch.tensor([3, 0, 7, 5]), torch.tensor([11, 2])):
                terms = objective_terms(model, fam, x[rows], rows, num_data=n, config=cfg,
                                        generator=torch.Generator().manual_seed(8), x_all=x)
                # What the step does before the local terms: theta drawn, then the refinement (if any)
                # drawing from the same generator.
                g = torch.Generator().manual_seed(8)
                model.sample(2, g)
                refine = objectives.make_local_elbo(model, 1, g) if fam.refines_locally else None
                if scheme == "all":
                    expected = _closed_form_local_terms(*fam.local_params(x, all_rows, refine))
                else:
                    expected = [t * (n / len(rows)) for t in _closed_form_local_terms(*fam.local_params(x[rows], rows,
                                                                                                     refine))]
                torch.testing.assert_close(terms.log_prior_z, expected[0], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(terms.entropy_z, expected[1], rtol=1e-6, atol=1e-6)
            if fam.refines_locally:  # the refinement is not a no-op here
                unrefined = _closed_form_local_terms(*fam.local_params(x, all_rows, None))
                assert abs(float(unrefined[1] - expected[1])) > 1e-3


def test_local_terms_all_refuses_a_step_without_every_image():
    model, fam, x = small_setup("amortized")
    cfg = ObjectiveConfig(local_terms="all")
    rows = torch.tensor([1, 2])
    for x_all in (None, x[:-1]):
        with pytest.raises(ValueError) as info:
            objective_terms(model, fam, x[rows], rows, num_data=x.shape[0], config=cfg, x_all=x_all)
        assert str(info.value) == "local_terms='all' needs x_all with every one of the num_data images"


@pytest.mark.parametrize("scheme", ["batch", "all"])
def test_a_full_batch_without_rows_is_the_batch_of_rows_0_to_n(scheme):
    model, fam, x = small_setup("factorized", n=12)
    cfg = ObjectiveConfig(local_terms=scheme, num_samples=3)
    values = [objective_terms(model, fam, x, rows, num_data=12, config=cfg, x_all=x,
                              generator=torch.Generator().manual_seed(2)) for rows in (None, torch.arange(12))]
    for name in ("log_lik", "log_prior_z", "entropy_z", "log_prior_theta", "entropy_theta"):
        assert torch.equal(getattr(values[0], name), getattr(values[1], name)), name


def test_theta_drawn_with_its_terms_is_the_draw_of_model_sample_noise_included():
    """sample_theta_with_terms' draw is model.sample's, with the noise that ``theta_terms`` reads."""
    model, _, _ = small_setup()
    fused, _, _ = objectives.sample_theta_with_terms(model, 3, torch.Generator().manual_seed(4))
    plain = model.sample(3, torch.Generator().manual_seed(4))
    assert torch.equal(fused.flat, plain.flat) and torch.equal(fused.eps_flat, plain.eps_flat)
    assert all(torch.equal(a, b) for a, b in zip(fused.eps, plain.eps, strict=True))


@pytest.mark.parametrize("kind", ["elbo", "legacy-2024"])
def test_analytic_local_terms_are_the_closed_form_whatever_the_draws(kind):
    """estimator="analytic": (E log p(z), E[-log q(z)]) summed over the rows in closed form, from
    torch.distributions, and the same for any draws passed in (the mc estimate would follow them)."""
    objective = objectives.get_objective(kind)
    g = torch.Generator().manual_seed(0)
    mu, log_sigma = torch.randn(5, 3, generator=g, dtype=torch.float64), 0.3 * torch.randn(5, 3, generator=g,
                                                                                           dtype=torch.float64)
    q = Normal(mu, log_sigma.exp())
    entropy = q.entropy().sum()
    expected_log_prior = -kl_divergence(q, Normal(0.0, 1.0)).sum() - entropy
    for seed in (1, 2):
        eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        z = mu + log_sigma.exp() * eps
        log_prior, neg_log_q = objective.local_terms(mu, log_sigma, z, eps, "analytic")
        torch.testing.assert_close(log_prior, expected_log_prior, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(neg_log_q, entropy, rtol=1e-12, atol=1e-12)
