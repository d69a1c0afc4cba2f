"""The amortization gap per image, in nats (SPEC §5): the core computations.

For an image x and a fixed theta (default: the posterior mean E_q[theta]; optionally every quantity
is averaged over draws of q(theta)):

* ``ELBO_x(q) = E_q(z)[log p(x | z, theta) + log p(z) - log q(z)]`` (closed-form KL, S draws);
* ``q*_x``: the best Gaussian for x, by Adam on ELBO_x, images optimised independently but in one
  vectorised problem, stopped by a stated rule (see :class:`LocalOptimConfig`);
* ``log p(x | theta)`` by the importance-weighted bound with K samples and q*_x as proposal, and
  optionally by annealed importance sampling with HMC transitions (see :class:`AISConfig`);
* amortization gap = ELBO_x(q*_x) - ELBO_x(q_family(x)) >= 0, approximation gap =
  log p(x | theta) - ELBO_x(q*_x).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from . import densities as dens
from .model import BayesianDecoder, ThetaDraw
from .objectives import draw_z, elbo_per_image, likelihood_of


@dataclass(frozen=True)
class LocalOptimConfig:
    """Adam on the summed ELBO_x of the images with ``num_samples`` draws per step. A plateau is a
    window of ``window`` steps whose mean loss improves by less than ``rtol`` (relative) on the window
    before; at each plateau the step size is multiplied by ``decay`` (Monte Carlo noise keeps Adam
    jittering at a fixed step size), and the optimisation stops at the ``plateaus``-th plateau or after
    ``max_steps``."""

    lr: float = 2e-2
    num_samples: int = 8
    window: int = 100
    rtol: float = 1e-5
    decay: float = 0.3
    plateaus: int = 4
    max_steps: int = 5000


@dataclass
class LocalOptimum:
    """q*_x = N(mu, sigma^2) per image (M, d); ``curve``: the mean ELBO_x after the recorded step
    counts, with the optimisation seconds spent to get there (evaluations excluded)."""

    mu: torch.Tensor
    log_sigma: torch.Tensor
    steps: int
    seconds: float
    converged: bool
    curve: list[dict]


def optimise_local(model: BayesianDecoder, x: torch.Tensor, mu0: torch.Tensor, log_sigma0: torch.Tensor,
                   theta: ThetaDraw, config: LocalOptimConfig = LocalOptimConfig(),
                   generator: torch.Generator | None = None, record_at: tuple[int, ...] = (),
                   record_samples: int = 256) -> LocalOptimum:
    """q*_x for every image, started from (mu0, log_sigma0); theta and the decoder are not changed.
    After each step count in ``record_at`` (and at the end) the mean ELBO_x is estimated with
    ``record_samples`` draws and added to the curve."""
    mu = mu0.detach().clone().requires_grad_(True)
    log_sigma = log_sigma0.detach().clone().requires_grad_(True)
    theta = ThetaDraw([v.detach() for v in theta.values], None)
    optimiser = torch.optim.Adam([mu, log_sigma], lr=config.lr)
    record_steps = set(record_at)
    curve: list[dict] = []
    seconds = 0.0

    def record(steps):
        with torch.no_grad():
            elbo = elbo_per_image(model, x, mu, log_sigma, theta, record_samples, generator)
        curve.append({"steps": steps, "seconds": seconds, "elbo_mean": float(elbo.mean())})

    if 0 in record_steps:
        record(0)
    previous, window, steps, converged, plateaus = None, [], 0, False, 0
    while steps < config.max_steps:
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = -elbo_per_image(model, x, mu, log_sigma, theta, config.num_samples, generator).sum()
        loss.backward()
        optimiser.step()
        steps += 1
        window.append(float(loss.detach()))
        stop = False
        if len(window) == config.window:
            current = sum(window) / len(window)
            if previous is not None and previous - current < config.rtol * abs(previous):
                plateaus += 1
                if plateaus >= config.plateaus:
                    converged = stop = True
                for group in optimiser.param_groups:
                    group["lr"] *= config.decay
            previous, window = current, []
        seconds += time.perf_counter() - start
        if steps in record_steps:
            record(steps)
        if stop:
            break
    if record_at and (not curve or curve[-1]["steps"] != steps):
        record(steps)
    return LocalOptimum(mu.detach(), log_sigma.detach(), steps, seconds, converged, curve)


@torch.no_grad()
def iwae_log_evidence(model: BayesianDecoder, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                      theta: ThetaDraw, num_samples: int, generator: torch.Generator | None = None,
                      chunk: int = 500) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k p(x, z_k | theta) / q(z_k) per image (M,), with
    q = N(mu, sigma^2) as proposal; the K samples are drawn in chunks to bound memory."""
    log_weights = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        z, eps = draw_z(mu, log_sigma, k, generator)
        ll = likelihood_of(model).per_image(model, x, model.decode(z, theta))
        log_prior = dens.standard_normal_log_prob(z).sum(-1)
        log_q = dens.normal_log_prob_from_noise(eps, log_sigma).sum(-1)
        log_weights.append(ll + log_prior - log_q)
    w = torch.cat(log_weights, 0)
    return torch.logsumexp(w, 0) - math.log(num_samples)


@dataclass(frozen=True)
class AISConfig:
    """Annealed importance sampling (Neal, 2001) from a Gaussian start q0 = N(mu, sigma^2) (q*_x by
    default) to p(x, z | theta), along the geometric path f_b(z) = q0(z)^(1 - b) p(x, z | theta)^b.

    The ``steps`` inverse temperatures b_1 < ... < b_T = 1 follow a sigmoid schedule (Grosse et al.,
    2015): b_t = (s(t) - s(0)) / (s(T) - s(0)) with s(t) = sigmoid(sharpness (2t/T - 1)), dense at both
    ends where the path changes fastest. Each temperature applies one Hamiltonian Monte Carlo transition
    (``leapfrog`` leapfrog steps, unit mass, Metropolis accept/reject), which leaves f_b invariant. The
    step size is one per image, shared by its chains: multiplied by ``adapt`` after a temperature whose
    mean acceptance over the chains exceeded ``target_accept`` and divided by it otherwise (as in Wu et
    al., 2017). ``chains`` independent chains per image give log p(x | theta) ~ log mean_c w_c."""

    chains: int = 16
    steps: int = 500
    leapfrog: int = 5
    step_size: float = 0.05
    target_accept: float = 0.65
    adapt: float = 1.02
    sharpness: float = 4.0
    from_prior: bool = False

    def __post_init__(self):
        if self.chains < 1 or self.steps < 1 or self.leapfrog < 1:
            raise ValueError("AIS chains, steps and leapfrog must be >= 1")
        if not (self.step_size > 0 and 0 < self.target_accept < 1 and self.adapt >= 1):
            raise ValueError("AIS needs step_size > 0, 0 < target_accept < 1 and adapt >= 1")


def sigmoid_schedule(steps: int, sharpness: float = 4.0) -> torch.Tensor:
    """Inverse temperatures (steps + 1,), float64, from exactly 0 to exactly 1 (see :class:`AISConfig`)."""
    t = torch.linspace(-sharpness, sharpness, steps + 1, dtype=torch.float64)
    s = torch.sigmoid(t)
    b = (s - s[0]) / (s[-1] - s[0])
    b[0], b[-1] = 0.0, 1.0
    return b


def ais_log_evidence(model: BayesianDecoder, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                     theta: ThetaDraw, config: AISConfig = AISConfig(),
                     generator: torch.Generator | None = None) -> dict:
    """log p(x | theta) per image by AIS (see :class:`AISConfig`). x: (M, D); mu, log_sigma: (M, d),
    the start distribution (ignored with ``config.from_prior``: then q0 = N(0, I), the prior).

    Returns ``log_px`` (M,), a stochastic lower bound in expectation (log of an unbiased estimate),
    ``log_weights`` (chains, M), ``ess`` (M,) the effective sample size of the normalised weights, and
    ``acceptance`` (M,) the mean HMC acceptance rate per image."""
    theta = ThetaDraw([v.detach() for v in theta.values], None)
    if config.from_prior:
        mu, log_sigma = torch.zeros_like(mu), torch.zeros_like(log_sigma)
    mu, log_sigma = mu.detach(), log_sigma.detach()
    sigma = torch.exp(log_sigma)
    c = config.chains

    def log_q0_and_grad(z):
        eps = (z - mu) / sigma
        return dens.normal_log_prob_from_noise(eps, log_sigma).sum(-1), -eps / sigma

    def log_joint_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lj = (likelihood_of(model).per_image(model, x, model.decode(z, theta))
                  + dens.standard_normal_log_prob(z).sum(-1))
            (grad,) = torch.autograd.grad(lj.sum(), z)
        return lj.detach(), grad

    def evaluate(z):
        """(log q0, its gradient, log p(x, z), its gradient): U_b and its gradient are mixtures of these."""
        return (*log_q0_and_grad(z), *log_joint_and_grad(z))

    def energy(state, b):
        lq, glq, lj, glj = state
        return -((1 - b) * lq + b * lj), -((1 - b) * glq + b * glj)

    betas = sigmoid_schedule(config.steps, config.sharpness).tolist()
    z = mu + sigma * torch.randn((c, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device)
    step = torch.full((1, mu.shape[0], 1), config.step_size, dtype=mu.dtype, device=mu.device)
    log_w = torch.zeros((c, mu.shape[0]), dtype=torch.float64, device=mu.device)
    accepted = torch.zeros(mu.shape[0], dtype=torch.float64, device=mu.device)
    state = evaluate(z)
    for b_prev, b in zip(betas[:-1], betas[1:]):
        # The weight increment uses the state before the transition at temperature b.
        log_w += (b - b_prev) * (state[2] - state[0]).double()
        u, grad = energy(state, b)
        p = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        h0 = u + 0.5 * (p * p).sum(-1)
        z_new, p_new = z, p - 0.5 * step * grad
        for i in range(config.leapfrog):
            z_new = z_new + step * p_new
            new_state = evaluate(z_new)
            u_new, g_new = energy(new_state, b)
            p_new = p_new - (step if i < config.leapfrog - 1 else 0.5 * step) * g_new
        h1 = u_new + 0.5 * (p_new * p_new).sum(-1)
        log_u = torch.log(torch.rand(h0.shape, generator=generator, dtype=h0.dtype, device=h0.device))
        accept = (log_u < (h0 - h1)) & torch.isfinite(h1)
        a = accept.unsqueeze(-1)
        z = torch.where(a, z_new, z)
        state = tuple(torch.where(a if old.dim() == 3 else accept, new, old) for old, new in zip(state, new_state))
        rate = accept.double().mean(0)
        accepted += rate
        factor = torch.where(rate > config.target_accept, config.adapt, 1.0 / config.adapt).to(step.dtype)
        step = step * factor.view(1, -1, 1)
    log_px = torch.logsumexp(log_w, 0) - math.log(c)
    w = torch.softmax(log_w, 0)
    return {"log_px": log_px.to(mu.dtype), "log_weights": log_w, "ess": 1.0 / (w * w).sum(0),
            "acceptance": accepted / config.steps}


CURVE_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True)
class GapConfig:
    """What ``measure_gap`` does: the first ``images`` images of each split; ELBO_x estimated with
    ``elbo_samples`` draws; q* by ``optim`` from the family's q and from the prior, with the mean ELBO_x
    recorded after ``curve_steps`` steps of each (the refinement and from-scratch curves); log p(x | theta)
    by IWAE with ``iwae_samples`` and q* as proposal, and by AIS when ``ais`` is given. theta is the
    posterior mean (``theta_draws`` = 0) or, per image, the gaps are averaged over ``theta_draws`` draws
    of q(theta)."""

    images: int = 100
    splits: tuple[str, ...] = ("train", "test")
    elbo_samples: int = 256
    iwae_samples: int = 1000
    optim: LocalOptimConfig = LocalOptimConfig()
    curve_steps: tuple[int, ...] = CURVE_STEPS
    ais: AISConfig | None = None
    theta_draws: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.images < 1 or self.elbo_samples < 1 or self.iwae_samples < 1 or self.theta_draws < 0:
            raise ValueError("images, elbo_samples and iwae_samples must be >= 1 and theta_draws >= 0")
        if not self.splits or set(self.splits) - {"train", "test"}:
            raise ValueError(f"splits must be a non-empty subset of ('train', 'test'), got {self.splits}")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# log sigma of a family's q(z) is clamped to this range before the gap is measured: beyond it
# exp(2 log sigma) under- or overflows float32 and the estimates become -inf or NaN (seen at 45-100).
LOG_SIGMA_RANGE = (-20.0, 20.0)


def _stats(values: torch.Tensor) -> dict:
    """Statistics over the images whose value is finite; ``non_finite`` counts the others, which are
    left out rather than averaged in (NaN when no image is finite)."""
    v = values.double()
    finite = torch.isfinite(v)
    bad = int((~finite).sum())
    v = v[finite]
    if v.numel() == 0:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "median": nan, "min": nan, "max": nan, "se": nan, "non_finite": bad}
    return {"mean": float(v.mean()), "sd": float(v.std()) if v.numel() > 1 else 0.0,
            "median": float(v.median()), "min": float(v.min()), "max": float(v.max()),
            "se": float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0, "non_finite": bad}


def _finite_list(values: torch.Tensor) -> list:
    """Per-image values for JSON: a non-finite value becomes None (flagged, not a number)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def sample_thetas(model: BayesianDecoder, count: int, generator: torch.Generator | None) -> list[ThetaDraw]:
    """``count`` independent draws of q(theta), each as a single-draw ThetaDraw. :func:`measure_gap` makes
    them first, from a generator seeded with ``GapConfig.seed``."""
    draws = model.sample(count, generator)
    return [ThetaDraw([v[i : i + 1] for v in draws.values], None) for i in range(count)]


def _gap_at_theta(model, x, mu_f, ls_f, theta, config: GapConfig, g) -> dict:
    """Per-image tensors (M,) and costs at one theta."""
    opt = dict(config=config.optim, generator=g, record_at=config.curve_steps, record_samples=config.elbo_samples)
    q_fam = optimise_local(model, x, mu_f, ls_f, theta, **opt)
    q_pri = optimise_local(model, x, torch.zeros_like(mu_f), torch.zeros_like(ls_f), theta, **opt)
    with torch.no_grad():
        elbo_family = elbo_per_image(model, x, mu_f, ls_f, theta, config.elbo_samples, g)
        from_family = elbo_per_image(model, x, q_fam.mu, q_fam.log_sigma, theta, config.elbo_samples, g)
        from_prior = elbo_per_image(model, x, q_pri.mu, q_pri.log_sigma, theta, config.elbo_samples, g)
        # q* is the better of the two optima, image by image.
        best_is_family = from_family >= from_prior
        mu_s = torch.where(best_is_family[:, None], q_fam.mu, q_pri.mu)
        ls_s = torch.where(best_is_family[:, None], q_fam.log_sigma, q_pri.log_sigma)
        out: dict = {"elbo_family": elbo_family, "elbo_q_star": torch.maximum(from_family, from_prior),
               "q_star_from_family_vs_prior_nats": from_family - from_prior,
               "log_px_iwae": iwae_log_evidence(model, x, mu_s, ls_s, theta, config.iwae_samples, g)}
    if config.ais is not None:
        start = time.perf_counter()
        ais = ais_log_evidence(model, x, mu_s, ls_s, theta, config.ais, g)
        out.update(log_px_ais=ais["log_px"], ais_ess=ais["ess"].float(), ais_acceptance=ais["acceptance"].float(),
                   ais_seconds=time.perf_counter() - start)
    out.update(q_fam=q_fam, q_pri=q_pri)
    return out


def _average(per_theta: list[dict], key: str) -> torch.Tensor:
    return torch.stack([r[key] for r in per_theta]).mean(0)


def _average_cost(per_theta: list[dict], key: str) -> dict:
    opts = [r[key] for r in per_theta]
    return {"steps": sum(o.steps for o in opts) / len(opts), "seconds": sum(o.seconds for o in opts) / len(opts),
            "converged": all(o.converged for o in opts)}


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Average curves recorded at several thetas over the step counts all of them reached."""
    common = set.intersection(*({c["steps"] for c in curve} for curve in curves))
    return [{"steps": s, **{k: sum(next(c[k] for c in curve if c["steps"] == s) for curve in curves) / len(curves)
                            for k in ("seconds", "elbo_mean")}} for s in sorted(common)]


def _first_reaching(curve: list[dict], level: float) -> dict | None:
    return next(({"steps": c["steps"], "seconds": c["seconds"]} for c in curve if c["elbo_mean"] >= level), None)


@dataclass
class ImageGaps:
    """Per-image results (M,) in nats, averaged over the thetas: ELBO_x under the family's q and under q*,
    log p(x | theta) by IWAE (and AIS), the two gaps; ``per_theta`` keeps each theta's optimisations
    (their costs and curves); ``log_sigma_clamped_images`` counts images whose family log sigma was
    outside LOG_SIGMA_RANGE (clamped to it)."""

    elbo_family: torch.Tensor
    elbo_q_star: torch.Tensor
    log_px_iwae: torch.Tensor
    amortization_gap: torch.Tensor
    approximation_gap: torch.Tensor
    log_px_ais: torch.Tensor | None
    approximation_gap_ais: torch.Tensor | None
    per_theta: list[dict]
    log_sigma_clamped_images: int

    @property
    def q_star_converged(self) -> bool:
        """Whether every optimisation of q* (from the family's q and from the prior, at every theta)
        converged before its step limit; if not, the amortization gap is understated."""
        return all(r[start].converged for r in self.per_theta for start in ("q_fam", "q_pri"))


def gaps_per_image(model: BayesianDecoder, x: torch.Tensor, mu_f: torch.Tensor, ls_f: torch.Tensor,
                   thetas: list[ThetaDraw], config: GapConfig, generator: torch.Generator | None) -> ImageGaps:
    """The amortization and approximation gaps of images ``x`` (M, D) whose family q(z) is
    N(mu_f, exp(ls_f)^2) (M, d each), averaged over ``thetas``: the per-image core of
    :func:`measure_gap`, also used by ``infer --gap`` on new images."""
    clamped = int(((ls_f < LOG_SIGMA_RANGE[0]) | (ls_f > LOG_SIGMA_RANGE[1])).any(-1).sum())
    ls_f = ls_f.clamp(*LOG_SIGMA_RANGE)
    per_theta = [_gap_at_theta(model, x, mu_f, ls_f, theta, config, generator) for theta in thetas]
    avg = partial(_average, per_theta)
    elbo_family, elbo_star, log_px = avg("elbo_family"), avg("elbo_q_star"), avg("log_px_iwae")
    log_px_ais = avg("log_px_ais") if config.ais is not None else None
    return ImageGaps(elbo_family, elbo_star, log_px, elbo_star - elbo_family, log_px - elbo_star, log_px_ais,
                     None if log_px_ais is None else log_px_ais - elbo_star, per_theta, clamped)


def posterior_mean_or_draws(model: BayesianDecoder, config: GapConfig,
                            generator: torch.Generator | None) -> tuple[list[ThetaDraw], str]:
    """The thetas a gap is measured at, and how to say so: the posterior mean, or ``theta_draws`` draws."""
    if config.theta_draws:
        return sample_thetas(model, config.theta_draws, generator), \
            f"average over {config.theta_draws} draws of q(theta)"
    return [model.mean()], "posterior mean"


def measure_gap(fitted, images: dict[str, torch.Tensor], config: GapConfig = GapConfig()) -> dict:
    """Amortization and approximation gaps (nats per image) of a fitted model (``FittedModel``).
    ``images`` maps a split name to images (M, D); for "train" they must be the first M images of the
    run's own training set (rows 0..M-1 of F-VI's factors).

    Per split: statistics over images of the amortization gap ELBO_x(q*) - ELBO_x(q_family), the
    approximation gap log p(x) - ELBO_x(q*) (IWAE, and AIS when configured), the family's own inference
    cost, the cost of q* from the family's q and from the prior, and the two curves: the refinement
    curve (local steps from the family's q) and the from-scratch curve (a factorized q fitted from the
    prior for the same images, which is what F-VI pays per new image)."""
    from .inference import infer_local

    g = torch.Generator().manual_seed(config.seed)
    model, family = fitted.model, fitted.family
    model.requires_grad_(False)
    thetas, theta_label = posterior_mean_or_draws(model, config, g)
    result = {"theta": theta_label, "family": family.name, "config": config.to_dict(), "splits": {}}
    for split, x in images.items():
        m = x.shape[0]
        start = time.perf_counter()
        if split == "train" and not family.amortized:
            with torch.no_grad():
                mu_f, ls_f = family.local_params(x, torch.arange(m), None)
            family_cost = {"steps": 0, "seconds": time.perf_counter() - start, "note": "the trained factors"}
        else:
            post = infer_local(model, family, x, fitted.config.train.test_inference, g)
            mu_f, ls_f = post.mu, post.log_sigma
            family_cost = {"steps": post.steps, "seconds": post.seconds}
        gaps = gaps_per_image(model, x, mu_f, ls_f, thetas, config, g)
        per_theta, clamped = gaps.per_theta, gaps.log_sigma_clamped_images
        avg = partial(_average, per_theta)
        cost = partial(_average_cost, per_theta)
        elbo_family, elbo_star, log_px = gaps.elbo_family, gaps.elbo_q_star, gaps.log_px_iwae
        amortization, approximation = gaps.amortization_gap, gaps.approximation_gap
        refinement = _mean_curve([r["q_fam"].curve for r in per_theta])
        scratch = _mean_curve([r["q_pri"].curve for r in per_theta])
        family_mean, star_mean = float(elbo_family.mean()), float(elbo_star.mean())
        s: dict = {
            "images": m,
            "amortization_gap": _stats(amortization),
            "approximation_gap": _stats(approximation),
            "elbo_family": _stats(elbo_family),
            "elbo_q_star": _stats(elbo_star),
            "log_px_iwae": _stats(log_px),
            "q_star_from_family_vs_prior_nats": _stats(avg("q_star_from_family_vs_prior_nats")),
            "q_star_cost_from_family": cost("q_fam"),
            "q_star_cost_from_prior": cost("q_pri"),
            "family_inference_cost": family_cost,
            "refinement_curve": refinement,
            "scratch_curve": scratch,
            # What local computation buys back, and what amortization saves: the first recorded step
            # count at which refining closes 90% of the gap, and at which fitting from scratch reaches the
            # family's own ELBO (None: not within the recorded curve).
            "refinement_to_90pct_of_gap": _first_reaching(refinement, family_mean + 0.9 * (star_mean - family_mean)),
            "scratch_to_family_elbo": _first_reaching(scratch, family_mean),
            "per_image": {"amortization_gap": _finite_list(amortization),
                          "approximation_gap": _finite_list(approximation)},
            # Images whose family q(z) had a log sigma outside LOG_SIGMA_RANGE (clamped to it).
            "log_sigma_clamped_images": clamped,
        }
        if gaps.log_px_ais is not None:
            log_px_ais = gaps.log_px_ais
            s.update(log_px_ais=_stats(log_px_ais), approximation_gap_ais=_stats(log_px_ais - elbo_star),
                     ais_minus_iwae=_stats(log_px_ais - log_px), ais_ess=_stats(avg("ais_ess")),
                     ais_acceptance=_stats(avg("ais_acceptance")),
                     ais_seconds=sum(r["ais_seconds"] for r in per_theta) / len(per_theta))
            s["per_image"]["approximation_gap_ais"] = _finite_list(log_px_ais - elbo_star)
        result["splits"][split] = s
    return result


def measure_run_gap(run_dir, config: GapConfig = GapConfig()) -> dict:
    """:func:`measure_gap` for a run folder of a results store, on the run's own images (the first
    ``config.images`` of its training subset and of the test split), written to ``run_dir/gap.json``."""
    from .checkpoint import load_fit
    from .data import load_run_split
    from .data.user_dataset import test_split_size
    from .experiments.lifecycle import RunPaths
    from .experiments.store import write_json

    paths = RunPaths(run_dir)
    fitted = load_fit(paths.model)
    d = fitted.config.data
    images = {}
    if "train" in config.splits:
        images["train"] = load_run_split(d, "train").images[: config.images]
    if "test" in config.splits:
        images["test"] = load_run_split(d, "test", n=min(config.images, test_split_size(d))).images
    result = measure_gap(fitted, images, config)
    result["run_id"] = paths.run_id
    write_json(paths.gap, result)
    return result
