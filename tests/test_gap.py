"""Amortization-gap computations on the linear-Gaussian model, where q* and log p(x) are exact."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from amortized_bayes.gap import (AISConfig, GapConfig, LocalOptimConfig, ais_log_evidence, elbo_per_image,
                                 iwae_log_evidence, optimise_local, sigmoid_schedule)
from amortized_bayes.model import ThetaDraw

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


@pytest.mark.processes
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
    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    cli("run", grid, "--out", out)
    stdout = cli("gap", out, "--images", "10", "--iwae-k", "300", "--ais", "--ais-steps", "50", "--ais-chains", "4")
    assert "amortization gap" in stdout and "2 to measure" in stdout
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/gap.json")}
    assert "0 to measure" in cli("gap", out, "--images", "10", "--iwae-k", "300", "--ais", "--ais-steps", "50",
                                 "--ais-chains", "4")
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/gap.json")}  # up to date: not redone
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
            assert s["ais_acceptance"]["mean"] > 0.2 and "approximation_gap_ais" in s

    # The report picks the gaps up: a figure, and table cells equal to the medians of the stored means.
    cli("report", out)
    assert (out / "report" / "figures" / "mnist-gap.png").stat().st_size > 10_000
    md = (out / "report" / "report.md").read_text()
    assert "### Amortization gap" in md and "approximation gap (AIS)" in md
    for path in files:
        result = json.loads(path.read_text())
        for split in ("train", "test"):
            value = result["splits"][split]["amortization_gap"]["mean"]  # one run per method: median = it
            assert f"| {split} | 1 | 10 | {value:.2f} |" in md

    # A step limit is part of the settings (so both runs are measured again), honoured, and flagged.
    stdout = cli("gap", out, "--split", "test", "--images", "2", "--iwae-k", "10", "--elbo-samples", "4",
                 "--max-local-steps", "3")
    assert "2 to measure" in stdout and stdout.count("the amortization gap is understated") == 2
    for path in files:
        s = json.loads(path.read_text())["splits"]["test"]
        for cost in (s["q_star_cost_from_family"], s["q_star_cost_from_prior"]):
            assert cost == {**cost, "steps": 3, "converged": False}


def test_the_local_step_limit_flags_default_to_the_optimiser_s_own():
    from amortized_bayes.cli import build_parser
    from amortized_bayes.gap import LocalOptimConfig

    parser = build_parser()
    for argv in (["gap", "out"], ["infer", "run", "x.npy", "--out", "o"]):
        assert parser.parse_args(argv).max_local_steps == LocalOptimConfig().max_steps


def test_ais_agrees_with_the_exact_evidence_from_the_prior_and_from_q_star(setup):
    model, x, decoder, theta, mu_star, ls_star = setup
    exact = model.log_evidence(x)
    for from_prior in (False, True):
        config = AISConfig(chains=64, steps=500, from_prior=from_prior)
        reps = torch.stack([ais_log_evidence(decoder, x, mu_star, ls_star, theta, config,
                                             torch.Generator().manual_seed(r))["log_px"] for r in range(2)])
        mean, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
        assert abs(float((mean - exact).mean())) < 0.03, from_prior
        assert float((mean - exact).abs().max()) < 0.15, from_prior
        assert bool((mean <= exact + 4 * se + 0.02).all()), from_prior
    # Annealing is what makes it work: a 10-temperature run from the prior is visibly worse.
    short = ais_log_evidence(decoder, x, mu_star, ls_star, theta, AISConfig(chains=64, steps=10, from_prior=True),
                             torch.Generator().manual_seed(9))
    assert float((exact - short["log_px"]).mean()) > 0.05


# Fast AIS checks (a second each): they kill most of a mutated AIS at once, so that mutation testing
# runs the two slow ones above and below only for what these cannot see.

def _double_linear(W, b, obs_var, images, seed=0):
    model = lg.LinearGaussian(W.double(), b.double(), obs_var)
    decoder = model.decoder().double().requires_grad_(False)
    return model, decoder, model.sample(images, torch.Generator().manual_seed(seed))


def test_ais_started_at_the_exact_posterior_weighs_every_chain_with_the_exact_evidence():
    """With orthogonal columns of W the exact posterior is a mean-field Gaussian. Started there, every
    intermediate distribution of the path is the posterior itself, so each increment of log w is
    (b - b_prev) log p(x) and every chain's weight is log p(x), however few its temperatures or steps:
    equal weights, so an effective sample size of the number of chains."""
    W = torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, -0.5]])
    model, decoder, x = _double_linear(W, torch.tensor([0.1, -0.2, 0.3, 0.0]), 0.5, 5)
    mu = model.posterior_mean(x)
    ls = 0.5 * model.meanfield_var().log().expand_as(mu).clone()
    exact = model.log_evidence(x)
    for chains, steps, leapfrog in ((4, 3, 2), (3, 1, 1), (2, 7, 4)):
        out = ais_log_evidence(decoder, x, mu, ls, decoder.mean(), AISConfig(chains=chains, steps=steps,
                               leapfrog=leapfrog), torch.Generator().manual_seed(1))
        assert out["log_weights"].shape == (chains, 5)
        assert float((out["log_weights"] - exact).abs().max()) < 1e-6
        assert float((out["log_px"] - exact).abs().max()) < 1e-6 and out["log_px"].dtype == torch.float64
        assert torch.allclose(out["ess"], torch.full((5,), float(chains), dtype=torch.float64))
        assert bool(((out["acceptance"] > 0.5) & (out["acceptance"] <= 1)).all())
    # From the prior instead (from_prior ignores mu and log sigma) the weights differ chain by chain.
    prior = ais_log_evidence(decoder, x, mu, ls, decoder.mean(), AISConfig(chains=4, steps=3, from_prior=True),
                             torch.Generator().manual_seed(1))
    assert float((prior["log_weights"] - exact).abs().min()) > 1e-4


def test_ais_from_the_prior_in_four_dimensions_needs_its_transitions_and_gets_the_evidence():
    """Posterior sds ~0.25 against the prior's 1 in 4 dimensions: importance sampling from the prior
    (one temperature) has an ESS of ~2 of 128 chains and misses log p(x) by 1.2 nats per image; 50
    temperatures of HMC give it within a tenth on average (the seeds are fixed: measured -0.03, at most
    0.25 on one image)."""
    base = lg.make(D=8, d=4, obs_var=0.3, seed=1)
    model, decoder, x = _double_linear(base.W, base.b, 0.3, 8)
    zeros = torch.zeros(8, 4, dtype=torch.float64)
    exact = model.log_evidence(x)

    def run(steps):
        return ais_log_evidence(decoder, x, zeros, zeros, decoder.mean(), AISConfig(
            chains=128, steps=steps, leapfrog=3, step_size=0.2, from_prior=True), torch.Generator().manual_seed(0))

    annealed, single = run(50), run(1)
    error = annealed["log_px"] - exact
    assert abs(float(error.mean())) < 0.1 and float(error.abs().max()) < 0.6, error
    assert float(annealed["ess"].mean()) > 20 and float(single["ess"].mean()) < 5
    assert float((single["log_px"] - exact).abs().mean()) > 5 * float(error.abs().mean())
    assert 0.5 < float(annealed["acceptance"].mean()) < 0.98


def test_ais_step_size_adapts_towards_the_target_acceptance():
    """Started 25x too large (5.0 for posterior sds ~0.25), a fixed step size (adapt = 1) is almost
    never accepted; divided by 1.2 after each temperature below the target it shrinks within ~18
    temperatures, and the mean acceptance over 50 climbs far above the fixed one's."""
    base = lg.make(D=8, d=4, obs_var=0.3, seed=1)
    model, decoder, x = _double_linear(base.W, base.b, 0.3, 8)
    zeros = torch.zeros(8, 4, dtype=torch.float64)
    rates = {adapt: float(ais_log_evidence(decoder, x, zeros, zeros, decoder.mean(), AISConfig(
        chains=16, steps=50, leapfrog=3, step_size=5.0, adapt=adapt, from_prior=True),
        torch.Generator().manual_seed(0))["acceptance"].mean()) for adapt in (1.0, 1.2)}
    assert rates[1.0] < 0.2 and rates[1.2] > rates[1.0] + 0.3, rates


def test_ais_settings_are_checked_and_each_one_is_used():
    """One chain, one temperature and one leapfrog step are valid; zero of any is one clear error. The
    schedule's sharpness reaches the schedule, and the estimate comes back in the images' dtype (float32
    images: float32, though the weights accumulate in float64)."""
    AISConfig(chains=1, steps=1, leapfrog=1)
    for bad in ({"chains": 0}, {"steps": 0}, {"leapfrog": 0}, {"chains": -1, "steps": 5}):
        with pytest.raises(ValueError, match=r"^AIS chains, steps and leapfrog must be >= 1$"):
            AISConfig(**bad)
    for bad in ({"step_size": 0.0}, {"target_accept": 1.0}, {"target_accept": 0.0}, {"adapt": 0.99}):
        with pytest.raises(ValueError, match=r"^AIS needs step_size > 0, 0 < target_accept < 1 and adapt >= 1$"):
            AISConfig(**bad)
    AISConfig(adapt=1.0, target_accept=0.01)
    base = lg.make(D=8, d=4, obs_var=0.3, seed=1)
    model, decoder, x = _double_linear(base.W, base.b, 0.3, 4)
    zeros = torch.zeros(4, 4, dtype=torch.float64)

    def run(**kw):
        return ais_log_evidence(decoder, x, zeros, zeros, decoder.mean(), AISConfig(
            chains=8, steps=10, from_prior=True, **kw), torch.Generator().manual_seed(0))["log_px"]

    assert not torch.equal(run(sharpness=2.0), run(sharpness=4.0))
    assert torch.equal(run(sharpness=4.0), run())
    decoder32 = model.decoder().requires_grad_(False)
    z32 = torch.zeros(4, 4)
    out = ais_log_evidence(decoder32, x.float(), z32, z32, decoder32.mean(), AISConfig(chains=4, steps=3),
                           torch.Generator().manual_seed(0))
    assert out["log_px"].dtype == torch.float32 and out["log_weights"].dtype == torch.float64


class _ScriptedLocalELBO:
    """Stands in for gap.elbo_per_image: each optimisation step's loss (minus the summed ELBO) is the next
    value of ``losses`` (then the last one for ever), with a gradient of 1 per coordinate; an evaluation
    (run without gradients) returns -steps and logs its number of draws."""

    def __init__(self, losses):
        self.losses, self.steps, self.record_draws = list(losses), 0, []

    def __call__(self, model, x, mu, log_sigma, theta, num_samples, generator=None):
        if not torch.is_grad_enabled():
            self.record_draws.append(num_samples)
            return torch.full((x.shape[0],), -float(self.steps))
        loss = self.losses[min(self.steps, len(self.losses) - 1)]
        self.steps += 1
        slope = (mu - mu.detach()).sum(-1) + (log_sigma - log_sigma.detach()).sum(-1)
        return slope - loss / x.shape[0]


def test_the_local_optimisation_stops_at_its_plateaus_as_the_rule_says(monkeypatch):
    """The stopping rule on a scripted loss, windows of 2 steps, rtol 0.25, stop at the 2nd plateau:
    window means 100, 90 (10 < 0.25 x 100: plateau 1), 60 (30 >= 22.5: none), 45 (15 = 0.25 x 60,
    not below: none), 40 (5 < 11.25: plateau 2, stop) -> 10 steps, converged. A clock that ticks 1 s
    per reading makes the optimisation seconds the step count."""
    from amortized_bayes import gap

    clock = iter(range(10**6))
    monkeypatch.setattr(gap, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    config = LocalOptimConfig(lr=0.1, num_samples=3, window=2, rtol=0.25, decay=0.5, plateaus=2, max_steps=100)
    script = [100, 100, 80, 100, 60, 60, 45, 45, 41, 39, 1]
    args = (None, torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 1), ThetaDraw([torch.zeros(1)], None), config)

    scripted = _ScriptedLocalELBO(script)
    monkeypatch.setattr(gap, "elbo_per_image", scripted)
    q = optimise_local(*args, record_at=(0, 4, 10))
    assert (q.steps, q.converged, q.seconds) == (10, True, 10.0)
    assert [(c["steps"], c["seconds"], c["elbo_mean"]) for c in q.curve] == [(0, 0.0, 0.0), (4, 4.0, -4.0),
                                                                              (10, 10.0, -10.0)]
    assert scripted.record_draws == [256] * 3
    # Adam with a constant gradient moves each coordinate by the step size: 0.1 for 4 steps, then 0.05.
    torch.testing.assert_close(q.mu, torch.full((2, 1), 0.7), rtol=0, atol=1e-6)

    # Nothing recorded unless asked; the end recorded once, after the last step asked for.
    monkeypatch.setattr(gap, "elbo_per_image", _ScriptedLocalELBO(script))
    assert optimise_local(*args).curve == []
    monkeypatch.setattr(gap, "elbo_per_image", _ScriptedLocalELBO(script))
    assert [c["steps"] for c in optimise_local(*args, record_at=(3,)).curve] == [3, 10]
    # Improving by a quarter per window never plateaus: max_steps ends it, not converged.
    monkeypatch.setattr(gap, "elbo_per_image", _ScriptedLocalELBO([4.0**(6 - i // 2) for i in range(12)]))
    q = optimise_local(*args[:-1], LocalOptimConfig(window=2, rtol=0.25, plateaus=1, max_steps=12))
    assert (q.steps, q.converged) == (12, False)


def test_gap_settings_are_checked_at_each_bound():
    """One image, one draw for the ELBO and for IWAE, no extra theta draws and either split alone are
    valid; one less of any, or a split list that is empty or names another split, is one clear error."""
    for good in ({}, {"images": 1, "elbo_samples": 1, "iwae_samples": 1, "theta_draws": 0},
                 {"splits": ("train",)}, {"splits": ("test",)}):
        GapConfig(**good)
    counts = r"^images, elbo_samples and iwae_samples must be >= 1 and theta_draws >= 0$"
    for bad in ({"images": 0}, {"elbo_samples": 0}, {"iwae_samples": 0}, {"theta_draws": -1}):
        with pytest.raises(ValueError, match=counts):
            GapConfig(**bad)
    for splits in ((), ("train", "valid")):
        with pytest.raises(ValueError) as info:
            GapConfig(splits=splits)
        assert str(info.value) == f"splits must be a non-empty subset of ('train', 'test'), got {splits}"


def test_ais_diagnostics_and_schedule():
    b = sigmoid_schedule(100)
    assert b[0] == 0 and b[-1] == 1 and bool((b[1:] > b[:-1]).all())
    # Written out for T = 4, sharpness 4: s(t) = sigmoid(4 (2t/4 - 1)) at t = 0..4, rescaled to [0, 1].
    s = [1 / (1 + math.exp(-4 * (2 * t / 4 - 1))) for t in range(5)]
    expected = [(v - s[0]) / (s[4] - s[0]) for v in s]
    assert sigmoid_schedule(4).tolist() == pytest.approx(expected, abs=1e-12)
    assert sigmoid_schedule(4, sharpness=2.0)[1] == pytest.approx(
        (1 / (1 + math.exp(1)) - 1 / (1 + math.exp(2))) / (1 / (1 + math.exp(-2)) - 1 / (1 + math.exp(2))), abs=1e-12)
    assert sigmoid_schedule(1).tolist() == [0.0, 1.0] and sigmoid_schedule(4).dtype == torch.float64
    # Densest at both ends, where the geometric path changes fastest.
    gaps = b[1:] - b[:-1]
    assert gaps[0] < gaps[50] and gaps[-1] < gaps[50]
    with pytest.raises(ValueError):
        AISConfig(chains=0)


def _quadrature_log_evidence(decoder, x, theta, half_width=6.0, points=401):
    """log p(x | theta) of a 2-d latent model by a trapezoid rule on a grid: an implementation that
    shares nothing with IWAE or AIS but the decoder."""
    from amortized_bayes.objectives import likelihood_of

    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)  # (P^2, 2)
    with torch.no_grad():
        out = decoder.double().decode(z.unsqueeze(1).expand(-1, x.shape[0], -1).contiguous(),
                                      ThetaDraw([v.double() for v in theta.values], None))
        ll = likelihood_of(decoder).per_image(decoder, x.double(), out)  # (P^2, M)
    log_prior = (-0.5 * (z * z).sum(-1) - math.log(2 * math.pi)).unsqueeze(-1)
    h = float(grid[1] - grid[0])
    w = torch.ones(points, dtype=torch.float64)
    w[0] = w[-1] = 0.5
    log_w = (w[:, None] * w[None, :]).reshape(-1, 1).log() + 2 * math.log(h)
    decoder.float()
    return torch.logsumexp(ll + log_prior + log_w, 0)


def test_iwae_and_ais_match_quadrature_on_a_nonlinear_bernoulli_decoder():
    from amortized_bayes.config import ModelConfig
    from amortized_bayes.model import BayesianDecoder

    torch.manual_seed(0)
    decoder = BayesianDecoder(ModelConfig(latent_dim=2, hidden=16, depth=1, data_dim=20,
                                          likelihood="bernoulli", init_log_scale=-30.0)).requires_grad_(False)
    with torch.no_grad():
        for v in decoder.loc:
            v.mul_(3.0)  # a sharper, more non-Gaussian posterior than PyTorch's default init gives
    theta = decoder.mean()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 2, generator=g)
    with torch.no_grad():
        x = torch.bernoulli(torch.sigmoid(decoder.decode(z, theta)[0]), generator=g)
    exact = _quadrature_log_evidence(decoder, x, theta).float()
    q = optimise_local(decoder, x, torch.zeros(8, 2), torch.zeros(8, 2), theta, LocalOptimConfig(num_samples=32), g)
    elbo = elbo_per_image(decoder, x, q.mu, q.log_sigma, theta, 4000, g)
    iwae = torch.stack([iwae_log_evidence(decoder, x, q.mu, q.log_sigma, theta, 5000, g) for _ in range(5)]).mean(0)
    ais = ais_log_evidence(decoder, x, q.mu, q.log_sigma, theta, AISConfig(chains=64, steps=500), g)["log_px"]
    assert bool((elbo < exact).all())
    assert float((exact - elbo).mean()) > 0.05  # the mean-field gap is real here...
    for estimate in (iwae, ais):  # ...and both estimators close it
        assert float((estimate - exact).abs().max()) < 0.05, (estimate - exact)


def test_measure_gap_at_the_exact_optimum_and_averaged_over_theta_draws(setup):
    """F-VI factors set to the closed-form optimum: amortization gap ~0; approximation gap = exact
    log p(x) - exact ELBO; with theta drawn from q(theta), IWAE's log p(x) is the average of the exact
    evidences at those very draws."""
    from types import SimpleNamespace

    from amortized_bayes.config import RunConfig
    from amortized_bayes.families import FactorizedFamily
    from amortized_bayes.gap import GapConfig, measure_gap, sample_thetas

    model, x, decoder, theta, mu_star, ls_star = setup
    family = FactorizedFamily(x.shape[0], mu_star.shape[1])
    with torch.no_grad():
        family.loc.weight.copy_(mu_star)
        family.log_sigma.weight.copy_(ls_star)
    fitted = SimpleNamespace(model=decoder, family=family, config=RunConfig())
    config = GapConfig(images=x.shape[0], splits=("train",), iwae_samples=3000, elbo_samples=2000,
                       optim=LocalOptimConfig(num_samples=32, max_steps=1500), curve_steps=(0, 10, 100))
    at_mean = measure_gap(fitted, {"train": x}, config)
    assert at_mean["theta"] == "posterior mean" and at_mean["family"] == family.name
    s = at_mean["splits"]["train"]
    assert abs(s["amortization_gap"]["mean"]) < 0.02
    exact_gap = float((model.log_evidence(x) - model.elbo(x, mu_star, ls_star)).mean())
    assert s["approximation_gap"]["mean"] == pytest.approx(exact_gap, abs=0.03)
    assert [c["steps"] for c in s["scratch_curve"]][:3] == [0, 10, 100]
    # Refining the optimum buys nothing; fitting from scratch climbs to it.
    refine, scratch = s["refinement_curve"], s["scratch_curve"]
    assert abs(refine[-1]["elbo_mean"] - refine[0]["elbo_mean"]) < 0.05
    assert scratch[0]["elbo_mean"] < s["elbo_family"]["mean"] - 1.0
    assert scratch[-1]["elbo_mean"] == pytest.approx(s["elbo_family"]["mean"], abs=0.05)

    spread = lg.make(D=6, d=3, obs_var=0.5, seed=4).decoder().requires_grad_(False)
    with torch.no_grad():
        spread.log_scale[1].fill_(math.log(0.3))  # q(theta): b ~ N(b0, 0.3^2), W fixed
    fitted = SimpleNamespace(model=spread, family=family, config=RunConfig())
    config = GapConfig(images=x.shape[0], splits=("train",), iwae_samples=3000, elbo_samples=500, theta_draws=3,
                       optim=LocalOptimConfig(num_samples=16, max_steps=1500), curve_steps=(0,))
    result = measure_gap(fitted, {"train": x}, config)
    assert result["theta"] == "average over 3 draws of q(theta)"
    draws = sample_thetas(spread, 3, torch.Generator().manual_seed(config.seed))
    expected = torch.stack([lg.LinearGaussian(model.W, t.values[1][0], model.obs_var).log_evidence(x)
                            for t in draws]).mean(0)
    assert result["splits"]["train"]["log_px_iwae"]["mean"] == pytest.approx(float(expected.mean()), abs=0.03)
    assert abs(float(expected.mean() - model.log_evidence(x).mean())) > 0.1  # the draws did matter


@pytest.mark.realdata
def test_measure_run_gap_reads_the_runs_own_images_and_writes_what_measure_gap_gives(tmp_path):
    """A run folder's gap (in process): the first images of the run's own training subset (random,
    binarised) and of the test split with the test split's binarisation seed, the same numbers as
    measure_gap on those images, written to gap.json with the run id."""
    import json

    from amortized_bayes.checkpoint import load_fit, save_fit
    from amortized_bayes.config import DataConfig, ModelConfig, RunConfig, TrainConfig, family_config
    from amortized_bayes.data import load_split
    from amortized_bayes.gap import GapConfig, measure_gap, measure_run_gap
    from amortized_bayes.training import fit

    data = DataConfig(n_train=50, n_test=10, subset="random", subset_seed=3, binarize="stochastic", binarize_seed=5)
    config = RunConfig(data=data, model=ModelConfig(latent_dim=3, hidden=8, likelihood="bernoulli"),
                       family=family_config("factorized"), train=TrainConfig(epochs=2, eval_every=2))
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    save_fit(fit(config), run / "model.pt")
    gap_config = GapConfig(images=4, elbo_samples=8, iwae_samples=16, optim=LocalOptimConfig(max_steps=30),
                           curve_steps=(0, 5))
    result = measure_run_gap(run, gap_config)
    assert json.loads((run / "gap.json").read_text()) == json.loads(json.dumps(result))
    assert result["run_id"] == "r" and set(result["splits"]) == {"train", "test"}
    train = load_split("mnist", "train", n=50, subset="random", seed=3, binarize="stochastic", binarize_seed=5).images
    test = load_split("mnist", "test", n=4, binarize="stochastic", binarize_seed=6).images
    expected = measure_gap(load_fit(run / "model.pt"), {"train": train[:4], "test": test}, gap_config)
    for split in ("train", "test"):
        got, want = result["splits"][split], expected["splits"][split]
        assert got["images"] == 4
        for key in ("amortization_gap", "approximation_gap", "elbo_family", "elbo_q_star", "log_px_iwae"):
            assert got[key]["mean"] == pytest.approx(want[key]["mean"], rel=1e-6, abs=1e-6), (split, key)
    only_test = measure_run_gap(run, GapConfig(images=2, splits=("test",), elbo_samples=4, iwae_samples=8,
                                                optim=LocalOptimConfig(max_steps=10), curve_steps=(0,)))
    assert set(only_test["splits"]) == {"test"} and only_test["splits"]["test"]["images"] == 2


def test_sample_thetas_are_the_models_draws_one_by_one():
    """count draws of q(theta) from the generator, each a single draw (leading dimension 1) equal to the
    corresponding row of one call of model.sample with the same generator state."""
    from amortized_bayes.config import ModelConfig
    from amortized_bayes.gap import sample_thetas
    from amortized_bayes.model import BayesianDecoder

    torch.manual_seed(0)
    decoder = BayesianDecoder(ModelConfig(latent_dim=2, hidden=3, depth=1, data_dim=4, init_log_scale=-1.0))
    decoder.requires_grad_(False)
    draws = sample_thetas(decoder, 3, torch.Generator().manual_seed(7))
    whole = decoder.sample(3, torch.Generator().manual_seed(7))
    assert len(draws) == 3 and len({float(d.values[0].sum()) for d in draws}) == 3
    for i, d in enumerate(draws):
        assert d.num_samples == 1 and d.eps is None
        assert len(d.values) == len(whole.values)
        for v, w in zip(d.values, whole.values):
            assert v.shape == (1, *w.shape[1:]) and torch.equal(v, w[i : i + 1])


def test_the_per_theta_helpers_average_image_by_image_and_read_curves_as_written():
    """What measure_gap reports from several thetas, on values written out: per-image averages over the
    thetas (not over the images), mean costs, the curve averaged over the step counts every theta
    recorded, the first recorded point at or above a level, and statistics over the finite images."""
    from amortized_bayes.gap import (LocalOptimum, _average, _average_cost, _finite_list, _first_reaching,
                                     _mean_curve, _stats)

    per_theta = [{"v": torch.tensor([1.0, 2.0, 3.0])}, {"v": torch.tensor([3.0, 6.0, 5.0])}]
    assert _average(per_theta, "v").tolist() == [2.0, 4.0, 4.0]

    def opt(steps, seconds, converged, curve):
        return LocalOptimum(torch.zeros(1, 1), torch.zeros(1, 1), steps, seconds, converged, curve)

    a = opt(10, 1.0, True, [{"steps": 0, "seconds": 0.0, "elbo_mean": -10.0},
                            {"steps": 5, "seconds": 0.5, "elbo_mean": -6.0},
                            {"steps": 10, "seconds": 1.0, "elbo_mean": -4.0}])
    b = opt(30, 4.0, False, [{"steps": 0, "seconds": 0.0, "elbo_mean": -12.0},
                             {"steps": 10, "seconds": 2.0, "elbo_mean": -2.0}])
    assert _average_cost([{"q": a}, {"q": b}], "q") == {"steps": 20.0, "seconds": 2.5, "converged": False}
    assert _average_cost([{"q": a}], "q") == {"steps": 10.0, "seconds": 1.0, "converged": True}
    curve = _mean_curve([a.curve, b.curve])  # step 5 is missing from b: left out
    assert curve == [{"steps": 0, "seconds": 0.0, "elbo_mean": -11.0}, {"steps": 10, "seconds": 1.5, "elbo_mean": -3.0}]
    assert _first_reaching(a.curve, -6.0) == {"steps": 5, "seconds": 0.5}  # "at or above"
    assert _first_reaching(a.curve, -5.0) == {"steps": 10, "seconds": 1.0}
    assert _first_reaching(a.curve, -3.9) is None
    s = _stats(torch.tensor([1.0, float("nan"), 3.0, 5.0, float("inf")]))
    assert s == {"mean": 3.0, "sd": 2.0, "median": 3.0, "min": 1.0, "max": 5.0,
                 "se": pytest.approx(2.0 / math.sqrt(3)), "non_finite": 2}
    two = _stats(torch.tensor([1.0, 3.0]))
    assert two["sd"] == pytest.approx(math.sqrt(2)) and two["se"] == pytest.approx(1.0)
    one = _stats(torch.tensor([4.0]))
    assert one["sd"] == 0.0 and one["se"] == 0.0 and one["mean"] == 4.0 and one["non_finite"] == 0
    none = _stats(torch.tensor([float("nan")]))
    assert none["non_finite"] == 1 and all(math.isnan(none[k]) for k in ("mean", "sd", "median", "min", "max", "se"))
    assert _finite_list(torch.tensor([1.5, float("nan"), -float("inf")])) == [1.5, None, None]


def _orthogonal_model(images: int):
    """A 4-pixel, 2-latent linear-Gaussian model whose W has orthogonal columns (so its exact posterior is
    mean-field), its decoder without gradients, and ``images`` images drawn from it (seed 0)."""
    W = torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, -0.5]])
    model = lg.LinearGaussian(W, torch.tensor([0.1, -0.2, 0.3, 0.0]), 0.5)
    return model, model.decoder().requires_grad_(False), model.sample(images, torch.Generator().manual_seed(0))


def test_gaps_per_image_counts_clamped_images_and_averages_ais_when_asked():
    """log sigma outside LOG_SIGMA_RANGE = [-20, 20] is clamped, and each image with any such unit is
    counted once (the ends themselves are inside); with an AIS configuration the AIS evidence is
    reported (from q*, a few optimiser steps from the exact posterior of an orthogonal-W model: close
    to the exact evidence), without one it is None."""
    from amortized_bayes.gap import LOG_SIGMA_RANGE, GapConfig, gaps_per_image

    assert LOG_SIGMA_RANGE == (-20.0, 20.0)
    model, decoder, x = _orthogonal_model(5)
    mu = model.posterior_mean(x)
    ls = 0.5 * model.meanfield_var().log().expand_as(mu).clone()
    config = GapConfig(images=5, elbo_samples=4, iwae_samples=8, optim=LocalOptimConfig(max_steps=3),
                       curve_steps=(0,), ais=AISConfig(chains=3, steps=2, leapfrog=1))
    extreme = ls.clone()
    extreme[0] = torch.tensor([-20.0, 20.0])  # at the ends: not clamped
    extreme[1] = torch.tensor([-20.5, 0.0])  # one unit below
    extreme[2] = torch.tensor([0.0, 21.0])  # one unit above
    extreme[3] = torch.tensor([-30.0, 30.0])  # both units: one image
    gaps = gaps_per_image(decoder, x, mu, extreme, [decoder.mean()], config, torch.Generator().manual_seed(1))
    assert gaps.log_sigma_clamped_images == 3
    gaps = gaps_per_image(decoder, x, mu, ls, [decoder.mean()], config, torch.Generator().manual_seed(1))
    assert gaps.log_sigma_clamped_images == 0
    assert gaps.log_px_ais is not None and gaps.approximation_gap_ais is not None
    assert float((gaps.log_px_ais - model.log_evidence(x)).abs().max()) < 0.5
    torch.testing.assert_close(gaps.approximation_gap_ais, gaps.log_px_ais - gaps.elbo_q_star)
    no_ais = GapConfig(images=5, elbo_samples=4, iwae_samples=8, optim=LocalOptimConfig(max_steps=3),
                       curve_steps=(0,))
    without = gaps_per_image(decoder, x, mu, ls, [decoder.mean()], no_ais, torch.Generator().manual_seed(1))
    assert without.log_px_ais is None and without.approximation_gap_ais is None


def test_measure_gap_reports_its_settings_and_what_each_families_own_inference_cost():
    """measure_gap's record, on values known in advance: its top-level keys; for F-VI the train images'
    q is the trained factors (no steps, said so) while test images are fitted by the run's own
    test-time inference (its step limit honoured); an encoder's q costs no steps on either split."""
    from types import SimpleNamespace

    from amortized_bayes.config import LocalInferenceConfig, RunConfig, TrainConfig, family_config
    from amortized_bayes.families import FactorizedFamily, build_family
    from amortized_bayes.gap import GapConfig, measure_gap

    model, decoder, x = _orthogonal_model(6)
    run_config = RunConfig(train=TrainConfig(test_inference=LocalInferenceConfig(max_steps=7, rtol=0.0)))
    config = GapConfig(images=6, elbo_samples=4, iwae_samples=8, optim=LocalOptimConfig(max_steps=3),
                       curve_steps=(0,))
    factorized = FactorizedFamily(6, 2)
    with torch.no_grad():
        factorized.loc.weight.copy_(model.posterior_mean(x))
    result = measure_gap(SimpleNamespace(model=decoder, family=factorized, config=run_config),
                         {"train": x, "test": x + 0.1}, config)
    assert set(result) == {"theta", "family", "config", "splits"}
    assert result["family"] == "factorized" and result["config"] == config.to_dict()
    assert set(result["splits"]["test"]) == {
        "images", "amortization_gap", "approximation_gap", "elbo_family", "elbo_q_star", "log_px_iwae",
        "q_star_from_family_vs_prior_nats", "q_star_cost_from_family", "q_star_cost_from_prior",
        "family_inference_cost", "refinement_curve", "scratch_curve", "refinement_to_90pct_of_gap",
        "scratch_to_family_elbo", "per_image", "log_sigma_clamped_images"}
    train, test = (result["splits"][s]["family_inference_cost"] for s in ("train", "test"))
    assert set(train) == {"steps", "seconds", "note"} and train["steps"] == 0
    assert train["note"] == "the trained factors" and 0 <= train["seconds"] < 60
    assert set(test) == {"steps", "seconds"} and test["steps"] == 7 and 0 < test["seconds"] < 60
    # The per-image lists are the per-image values the statistics summarise.
    split = result["splits"]["test"]
    assert set(split["per_image"]) == {"amortization_gap", "approximation_gap"}
    for key in ("amortization_gap", "approximation_gap"):
        assert len(split["per_image"][key]) == 6
        assert sum(split["per_image"][key]) / 6 == pytest.approx(split[key]["mean"], rel=1e-6, abs=1e-9)
    # With AIS: its evidence, the gap it gives, its difference from IWAE, its diagnostics and its cost.
    chains = 3
    with_ais = measure_gap(SimpleNamespace(model=decoder, family=factorized, config=run_config), {"train": x},
                           GapConfig(images=6, elbo_samples=4, iwae_samples=8, optim=LocalOptimConfig(max_steps=3),
                                     curve_steps=(0,), ais=AISConfig(chains=chains, steps=2, leapfrog=1)))
    a = with_ais["splits"]["train"]
    mean = {k: a[k]["mean"] for k in ("log_px_ais", "log_px_iwae", "elbo_q_star", "approximation_gap_ais",
                                       "ais_minus_iwae")}
    assert mean["approximation_gap_ais"] == pytest.approx(mean["log_px_ais"] - mean["elbo_q_star"], abs=1e-4)
    assert mean["ais_minus_iwae"] == pytest.approx(mean["log_px_ais"] - mean["log_px_iwae"], abs=1e-4)
    assert 1 <= a["ais_ess"]["min"] <= a["ais_ess"]["max"] <= chains
    assert 0 <= a["ais_acceptance"]["min"] <= a["ais_acceptance"]["max"] <= 1 and 0 < a["ais_seconds"] < 60
    assert set(a["per_image"]) == {"amortization_gap", "approximation_gap", "approximation_gap_ais"}
    assert sum(a["per_image"]["approximation_gap_ais"]) / 6 == pytest.approx(mean["approximation_gap_ais"], abs=1e-4)
    encoder = build_family(family_config("amortized", width=4), data_dim=4, latent_dim=2, num_data=6)
    result = measure_gap(SimpleNamespace(model=decoder, family=encoder, config=run_config), {"train": x}, config)
    cost = result["splits"]["train"]["family_inference_cost"]
    assert set(cost) == {"steps", "seconds"} and cost["steps"] == 0 and result["family"] == "amortized"


def test_measure_gap_reports_the_mean_ais_seconds_over_theta_draws(monkeypatch):
    """With several draws of theta, the record's AIS cost is the mean over the draws of each draw's AIS
    seconds (known here: each draw's time is replaced by 1, 2, 3 s), not their sum or a multiple of it."""
    from types import SimpleNamespace

    import amortized_bayes.gap as gap_module
    from amortized_bayes.config import RunConfig
    from amortized_bayes.families import FactorizedFamily
    from amortized_bayes.gap import GapConfig, measure_gap

    _, decoder, x = _orthogonal_model(4)
    real, seconds = gap_module._gap_at_theta, iter([1.0, 2.0, 3.0])

    def with_known_seconds(*args, **kwargs):
        out = real(*args, **kwargs)
        out["ais_seconds"] = next(seconds)
        return out

    monkeypatch.setattr(gap_module, "_gap_at_theta", with_known_seconds)
    config = GapConfig(images=4, elbo_samples=2, iwae_samples=4, optim=LocalOptimConfig(max_steps=2),
                       curve_steps=(0,), theta_draws=3, ais=AISConfig(chains=2, steps=2, leapfrog=1))
    result = measure_gap(SimpleNamespace(model=decoder, family=FactorizedFamily(4, 2), config=RunConfig()),
                         {"train": x}, config)
    assert result["splits"]["train"]["ais_seconds"] == pytest.approx(2.0)
    assert result["theta"] == "average over 3 draws of q(theta)"


def test_both_local_optimisations_record_their_curves_with_the_configured_draws(monkeypatch):
    """The refinement and from-scratch curves are estimated with ``elbo_samples`` draws per ELBO_x, at
    the configured steps, by the configured optimiser (optimise_local's own default is 256 draws)."""
    import amortized_bayes.gap as gap_module
    from amortized_bayes.gap import GapConfig, _gap_at_theta

    _, decoder, x = _orthogonal_model(3)
    calls, real = [], gap_module.optimise_local

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gap_module, "optimise_local", spy)
    config = GapConfig(images=3, elbo_samples=7, iwae_samples=4, curve_steps=(0, 2),
                       optim=LocalOptimConfig(max_steps=2))
    mu = torch.zeros(3, 2)
    _gap_at_theta(decoder, x, mu, mu, decoder.mean(), config, torch.Generator().manual_seed(0))
    assert len(calls) == 2
    for kwargs in calls:
        assert kwargs["record_samples"] == 7 and kwargs["record_at"] == (0, 2) and kwargs["config"] is config.optim


def test_gaps_per_image_are_a_function_of_their_generator_alone():
    """Every random draw of the gap (ELBO_x, the local optimisations, IWAE, AIS) comes from the given
    generator: the same seed gives the same numbers bit for bit whatever torch's global RNG holds."""
    from amortized_bayes.gap import GapConfig, gaps_per_image

    _, decoder, x = _orthogonal_model(4)
    mu, ls = torch.zeros(4, 2), torch.zeros(4, 2)
    config = GapConfig(images=4, elbo_samples=4, iwae_samples=8, optim=LocalOptimConfig(max_steps=3),
                       curve_steps=(0,), ais=AISConfig(chains=3, steps=3, leapfrog=2))
    runs = []
    for global_seed in (1, 2):
        with torch.random.fork_rng():  # leaves the global RNG as the other tests found it
            torch.manual_seed(global_seed)
            runs.append(gaps_per_image(decoder, x, mu, ls, [decoder.mean()], config,
                                       torch.Generator().manual_seed(5)))
    first, second = runs
    for name in ("elbo_family", "elbo_q_star", "log_px_iwae", "log_px_ais"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
