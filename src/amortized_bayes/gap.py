"""The amortization gap per image, in nats (SPEC §5): the core computations.

For an image x and a fixed theta (default: the posterior mean E_q[theta]):

* ``ELBO_x(q) = E_q(z)[log p(x | z, theta) + log p(z) - log q(z)]`` (closed-form KL, S draws);
* ``q*_x``: the best Gaussian for x, by Adam on ELBO_x, images optimised independently but in one
  vectorised problem, stopped by a stated rule (see :class:`LocalOptimConfig`);
* ``log p(x | theta)`` by the importance-weighted bound with K samples and q*_x as proposal;
* amortization gap = ELBO_x(q*_x) - ELBO_x(q_family(x)) >= 0, approximation gap =
  log p(x | theta) - ELBO_x(q*_x).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import densities as dens
from .model import BayesianDecoder, ThetaDraw
from .objectives import draw_z, elbo_per_image, log_likelihood


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
    mu: torch.Tensor
    log_sigma: torch.Tensor
    steps: int
    seconds: float
    converged: bool


def optimise_local(model: BayesianDecoder, x: torch.Tensor, mu0: torch.Tensor, log_sigma0: torch.Tensor,
                   theta: ThetaDraw, config: LocalOptimConfig = LocalOptimConfig(),
                   generator: torch.Generator | None = None) -> LocalOptimum:
    """q*_x for every image, started from (mu0, log_sigma0); theta and the decoder are not changed."""
    mu = mu0.detach().clone().requires_grad_(True)
    log_sigma = log_sigma0.detach().clone().requires_grad_(True)
    theta = ThetaDraw([v.detach() for v in theta.values], None)
    optimiser = torch.optim.Adam([mu, log_sigma], lr=config.lr)
    previous, window, steps, converged, plateaus = None, [], 0, False, 0
    start = time.perf_counter()
    while steps < config.max_steps:
        optimiser.zero_grad(set_to_none=True)
        loss = -elbo_per_image(model, x, mu, log_sigma, theta, config.num_samples, generator).sum()
        loss.backward()
        optimiser.step()
        steps += 1
        window.append(float(loss.detach()))
        if len(window) == config.window:
            current = sum(window) / len(window)
            if previous is not None and previous - current < config.rtol * abs(previous):
                plateaus += 1
                if plateaus >= config.plateaus:
                    converged = True
                    break
                for group in optimiser.param_groups:
                    group["lr"] *= config.decay
            previous, window = current, []
    return LocalOptimum(mu.detach(), log_sigma.detach(), steps, time.perf_counter() - start, converged)


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
        ll = log_likelihood(model, x, model.decode(z, theta), legacy=False)
        log_prior = dens.standard_normal_log_prob(z).sum(-1)
        log_q = dens.normal_log_prob_from_noise(eps, log_sigma).sum(-1)
        log_weights.append(ll + log_prior - log_q)
    w = torch.cat(log_weights, 0)
    return torch.logsumexp(w, 0) - math.log(num_samples)


REFINEMENT_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)


@dataclass(frozen=True)
class GapConfig:
    """What ``measure_gap`` does: the first ``images`` images of each split; ELBO_x estimated with
    ``elbo_samples`` draws; log p(x | theta) by IWAE with ``iwae_samples``; q* by ``optim``; the
    refinement curve at ``refinement_steps`` Adam steps (lr ``optim.lr``) from the family's q."""

    images: int = 100
    splits: tuple[str, ...] = ("train", "test")
    elbo_samples: int = 256
    iwae_samples: int = 1000
    optim: LocalOptimConfig = LocalOptimConfig()
    refinement_steps: tuple[int, ...] = REFINEMENT_STEPS
    seed: int = 0


def refinement_curve(model, x, mu0, log_sigma0, theta, steps: tuple[int, ...], lr: float, num_samples: int,
                     elbo_samples: int, generator) -> list[dict]:
    """Mean ELBO_x after each number of Adam steps from (mu0, log_sigma0), with the optimisation seconds
    spent to get there (evaluation excluded)."""
    mu = mu0.detach().clone().requires_grad_(True)
    log_sigma = log_sigma0.detach().clone().requires_grad_(True)
    theta = ThetaDraw([v.detach() for v in theta.values], None)
    optimiser = torch.optim.Adam([mu, log_sigma], lr=lr)
    out, done, seconds = [], 0, 0.0
    for target in sorted(set(steps)):
        start = time.perf_counter()
        while done < target:
            optimiser.zero_grad(set_to_none=True)
            (-elbo_per_image(model, x, mu, log_sigma, theta, num_samples, generator).sum()).backward()
            optimiser.step()
            done += 1
        seconds += time.perf_counter() - start
        with torch.no_grad():
            elbo = elbo_per_image(model, x, mu, log_sigma, theta, elbo_samples, generator)
        out.append({"steps": target, "seconds": seconds, "elbo_mean": float(elbo.mean())})
    return out


def _stats(values: torch.Tensor) -> dict:
    v = values.double()
    return {"mean": float(v.mean()), "sd": float(v.std()) if v.numel() > 1 else 0.0,
            "median": float(v.median()), "min": float(v.min()), "max": float(v.max()),
            "se": float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0}


def measure_gap(fitted, images: dict[str, torch.Tensor], config: GapConfig = GapConfig()) -> dict:
    """Amortization and approximation gaps (nats per image) of a fitted model (``FittedModel``), with
    theta at the posterior mean. ``images`` maps a split name to images (M, D); for "train" they must
    be the first M images of the run's own training set (rows 0..M-1 of F-VI's factors)."""
    from .inference import infer_local

    g = torch.Generator().manual_seed(config.seed)
    model, family = fitted.model, fitted.family
    model.requires_grad_(False)
    theta = model.mean()
    result = {"theta": "posterior mean", "family": family.name, "config": {
        "images": config.images, "elbo_samples": config.elbo_samples, "iwae_samples": config.iwae_samples,
        "optimiser": config.optim.__dict__}, "splits": {}}
    for split, x in images.items():
        m = x.shape[0]
        start = time.perf_counter()
        if split == "train" and not family.amortized:
            with torch.no_grad():
                mu_f, ls_f = family.local_params(x, torch.arange(m), None)
            family_cost = {"steps": 0, "seconds": 0.0, "note": "the trained factors"}
        else:
            post = infer_local(model, family, x, fitted.config.train.test_inference, g)
            mu_f, ls_f = post.mu, post.log_sigma
            family_cost = {"steps": post.steps, "seconds": post.seconds}
        family_cost.setdefault("seconds", time.perf_counter() - start)
        q_fam = optimise_local(model, x, mu_f, ls_f, theta, config.optim, g)
        q_pri = optimise_local(model, x, torch.zeros_like(mu_f), torch.zeros_like(ls_f), theta, config.optim, g)
        with torch.no_grad():
            elbo_family = elbo_per_image(model, x, mu_f, ls_f, theta, config.elbo_samples, g)
            elbo_from_family = elbo_per_image(model, x, q_fam.mu, q_fam.log_sigma, theta, config.elbo_samples, g)
            elbo_from_prior = elbo_per_image(model, x, q_pri.mu, q_pri.log_sigma, theta, config.elbo_samples, g)
            best_is_family = elbo_from_family >= elbo_from_prior
            mu_s = torch.where(best_is_family[:, None], q_fam.mu, q_pri.mu)
            ls_s = torch.where(best_is_family[:, None], q_fam.log_sigma, q_pri.log_sigma)
            elbo_star = torch.maximum(elbo_from_family, elbo_from_prior)
            log_px = iwae_log_evidence(model, x, mu_s, ls_s, theta, config.iwae_samples, g)
        curve = refinement_curve(model, x, mu_f, ls_f, theta, config.refinement_steps, config.optim.lr,
                                 config.optim.num_samples, config.elbo_samples, g)
        result["splits"][split] = {
            "images": m,
            "amortization_gap": _stats(elbo_star - elbo_family),
            "approximation_gap": _stats(log_px - elbo_star),
            "elbo_family": _stats(elbo_family),
            "elbo_q_star": _stats(elbo_star),
            "log_px_iwae": _stats(log_px),
            "q_star_from_family_vs_prior_nats": _stats(elbo_from_family - elbo_from_prior),
            "q_star_cost_from_family": {"steps": q_fam.steps, "seconds": q_fam.seconds, "converged": q_fam.converged},
            "q_star_cost_from_prior": {"steps": q_pri.steps, "seconds": q_pri.seconds, "converged": q_pri.converged},
            "family_inference_cost": family_cost,
            "refinement_curve": curve,
            "per_image": {"amortization_gap": (elbo_star - elbo_family).tolist(),
                          "approximation_gap": (log_px - elbo_star).tolist()},
        }
    return result


def measure_run_gap(run_dir, config: GapConfig = GapConfig()) -> dict:
    """:func:`measure_gap` for a run folder of a results store, written to ``run_dir/gap.json``."""
    import json
    from pathlib import Path

    from .checkpoint import load_fit
    from .data import load_split
    from .data.atomic import atomic_write_text

    run_dir = Path(run_dir)
    fitted = load_fit(run_dir / "model.pt")
    d = fitted.config.data
    images = {}
    if "train" in config.splits:
        train = load_split(d.dataset, "train", n=d.n_train, subset=d.subset, seed=d.subset_seed,
                           binarize=d.binarize, binarize_seed=d.binarize_seed).images
        images["train"] = train[: config.images]
    if "test" in config.splits:
        images["test"] = load_split(d.dataset, "test", n=config.images, binarize=d.binarize,
                                    binarize_seed=d.binarize_seed + 1).images
    result = measure_gap(fitted, images, config)
    result["run_id"] = run_dir.name
    atomic_write_text(run_dir / "gap.json", json.dumps(result, indent=1) + "\n")
    return result
