"""Amortization-gap computations on the linear-Gaussian model, where q* and log p(x) are exact."""

from __future__ import annotations

import math

import pytest
import torch

from amortized_bayes.gap import LocalOptimConfig, elbo_per_image, iwae_log_evidence, optimise_local

from . import linear_gaussian as lg


@pytest.fixture(scope="module")
def setup():
    model = lg.make(D=6, d=3, obs_var=0.5, seed=4)
    x = model.sample(16, torch.Generator().manual_seed(2))
    decoder = model.decoder().requires_grad_(False)
    mu_star = model.posterior_mean(x)
    ls_star = 0.5 * model.meanfield_var().log().expand_as(mu_star).clone()
    return model, x, decoder, decoder.mean(), mu_star, ls_star


def test_elbo_per_image_is_unbiased_for_the_exact_elbo(setup):
    model, x, decoder, theta, mu, ls = setup
    g = torch.Generator().manual_seed(0)
    est = torch.stack([elbo_per_image(decoder, x, mu, ls, theta, 64, g) for _ in range(50)])
    exact = model.elbo(x, mu, ls)
    se = est.std(0) / math.sqrt(est.shape[0])
    assert bool(((est.mean(0) - exact).abs() < 4 * se + 1e-4).all())


def test_local_optimisation_from_prior_and_from_a_family_reach_the_same_closed_form_q_star(setup):
    model, x, decoder, theta, mu_star, ls_star = setup
    config = LocalOptimConfig(num_samples=32, max_steps=4000)
    g = torch.Generator().manual_seed(1)
    from_prior = optimise_local(decoder, x, torch.zeros_like(mu_star), torch.zeros_like(ls_star), theta, config, g)
    from_family = optimise_local(decoder, x, mu_star + 0.5, ls_star - 0.7, theta, config, g)
    for opt in (from_prior, from_family):
        assert opt.steps > 0
        assert float((opt.mu - mu_star).norm() / mu_star.norm()) < 2e-2
        assert float((opt.log_sigma - ls_star).abs().max()) < 5e-2
    gap = model.elbo(x, mu_star, ls_star) - model.elbo(x, from_prior.mu, from_prior.log_sigma)
    assert float(gap.max()) < 0.01  # nats per image


def test_gap_of_the_optimal_linear_encoder_is_zero_and_constant_vi_gap_is_its_closed_form(setup):
    model, x, decoder, theta, mu_star, ls_star = setup
    g = torch.Generator().manual_seed(3)
    q_star = optimise_local(decoder, x, mu_star, ls_star, theta, LocalOptimConfig(num_samples=32, max_steps=2000), g)
    elbo_star = elbo_per_image(decoder, x, q_star.mu, q_star.log_sigma, theta, 4000, g)
    # A linear encoder at its optimum outputs exactly (mu_star, ls_star): its gap is Monte Carlo noise.
    elbo_enc = elbo_per_image(decoder, x, mu_star, ls_star, theta, 4000, g)
    assert float((elbo_star - elbo_enc).abs().mean()) < 0.05
    # Constant-VI's best shared factor is the mean image's; its gap per image is known exactly.
    mu_c = model.posterior_mean(x.mean(0, keepdim=True)).expand_as(mu_star)
    exact_gap = model.elbo(x, mu_star, ls_star) - model.elbo(x, mu_c, ls_star)
    reps = torch.stack([elbo_per_image(decoder, x, q_star.mu, q_star.log_sigma, theta, 2000, g)
                        - elbo_per_image(decoder, x, mu_c, ls_star, theta, 2000, g) for _ in range(20)])
    est_gap, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
    assert bool((exact_gap > 0).all())
    assert bool(((est_gap - exact_gap).abs() < 4 * se + 0.01).all()), (est_gap - exact_gap) / se


def test_iwae_approaches_the_exact_evidence_and_never_exceeds_it(setup):
    model, x, decoder, theta, mu_star, ls_star = setup
    exact = model.log_evidence(x)
    g = torch.Generator().manual_seed(5)
    errors = {}
    for k in (1, 10, 100, 5000):
        reps = torch.stack([iwae_log_evidence(decoder, x, mu_star, ls_star, theta, k, g) for _ in range(30)])
        mean, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
        assert bool((mean <= exact + 4 * se + 1e-4).all()), k  # a lower bound in expectation
        errors[k] = float((exact - mean).mean())
    assert errors[1] > errors[10] > errors[100] > errors[5000] - 1e-3
    assert errors[5000] < 0.01
    # With K = 1 the bound is the ELBO of the proposal: the mean-field restriction's gap.
    assert errors[1] == pytest.approx(float((exact - model.elbo(x, mu_star, ls_star)).mean()), abs=0.05)


def test_gap_command_on_stored_runs(tmp_path):
    """`run` a tiny grid, then `gap`: every run gets gap.json with non-negative amortization gaps (within
    Monte Carlo error), an IWAE evidence above the best ELBO, and a refinement curve that climbs."""
    import json
    import subprocess
    import sys

    grid = tmp_path / "grid.toml"
    grid.write_text('name = "g"\n[base.data]\nn_train = 100\nn_test = 20\n[base.model]\nlatent_dim = 4\n'
                    'hidden = 16\n[base.train]\nepochs = 3\nbatch_size = 50\n[axes]\n'
                    '"family.name" = ["amortized", "factorized"]\n"family.width" = [8]\n')
    out = tmp_path / "out"
    for args in (["run", grid, "--out", out], ["gap", out, "--images", "10", "--iwae-k", "300"]):
        proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "amortization gap" in proc.stdout
    files = sorted(out.glob("runs/*/gap.json"))
    assert len(files) == 2
    for path in files:
        result = json.loads(path.read_text())
        for split in ("train", "test"):
            s = result["splits"][split]
            assert s["images"] == 10
            assert s["amortization_gap"]["mean"] > -3 * s["amortization_gap"]["se"] - 0.05
            assert s["approximation_gap"]["mean"] > -3 * s["approximation_gap"]["se"] - 0.05
            curve = s["refinement_curve"]
            assert [c["steps"] for c in curve][:3] == [0, 1, 2]
            assert curve[-1]["elbo_mean"] > curve[0]["elbo_mean"]
            assert curve[0]["elbo_mean"] == pytest.approx(s["elbo_family"]["mean"], abs=1.0)
            assert s["q_star_cost_from_prior"]["steps"] > 0
