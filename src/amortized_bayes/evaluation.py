"""Full-data metrics of SPEC §4: -ELBO, reconstruction MSE, posterior-collapse diagnostics."""

from __future__ import annotations

import torch

from . import densities as dens
from .config import ObjectiveConfig
from .families import VariationalFamily
from .model import BayesianDecoder
from .objectives import ELBO, draw_z, likelihood_of, make_local_elbo

ACTIVE_UNIT_THRESHOLD = 0.01


def local_posterior(model: BayesianDecoder, family: VariationalFamily, x: torch.Tensor,
                    idx: torch.Tensor | None, chunk: int = 2048,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's (mu, log_sigma) for every image, (N, d) each, computed in chunks without gradients
    (SA-VI's refinement runs with theta at its posterior mean)."""
    refine = make_local_elbo(model, 1, generator) if family.refines_locally else None
    mus, log_sigmas = [], []
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        ix = idx[rows] if idx is not None else torch.arange(start, min(start + chunk, x.shape[0]), device=x.device)
        with torch.no_grad() if refine is None else torch.enable_grad():
            mu, ls = family.local_params(x[rows], ix, refine)
        mus.append(mu.detach())
        log_sigmas.append(ls.detach())
    return torch.cat(mus), torch.cat(log_sigmas)


@torch.no_grad()
def full_data_negative_elbo(model: BayesianDecoder, mu: torch.Tensor, log_sigma: torch.Tensor,
                            x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
                            chunk: int = 1024) -> dict[str, float]:
    """A fresh estimate of -ELBO over all N images given their q(z) (mu, log_sigma: (N, d)), with S
    draws of theta shared by the chunks, and closed-form KL terms (unbiased for the same ELBO as the
    Monte Carlo estimator, with less variance). Returns -ELBO and its terms, in nats."""
    theta = model.sample(num_samples, generator)
    likelihood = likelihood_of(model)
    ll = torch.zeros((), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        z, _ = draw_z(mu[rows], log_sigma[rows], num_samples, generator)
        ll += likelihood.per_image(model, x[rows], model.decode(z, theta)).sum() / num_samples
    kl_z = dens.kl_normal_to_centered(mu, log_sigma).sum()
    lp_theta, ent_theta = ELBO().theta_terms(model, theta, "analytic")
    kl_theta = -(lp_theta + ent_theta)
    elbo = ll - kl_z - kl_theta
    return {"neg_elbo": float(-elbo), "log_lik": float(ll), "kl_z": float(kl_z), "kl_theta": float(kl_theta)}


@torch.no_grad()
def reconstruction_mse(model: BayesianDecoder, mu: torch.Tensor, x: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over images and pixels of (Omega(E[z_n]; E[theta]) - x_n)^2 (pixel probabilities for the
    Bernoulli likelihood)."""
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        total += float((model.reconstruct(mu[rows]) - x[rows]).pow(2).sum())
    return total / x.numel()


@torch.no_grad()
def collapse_diagnostics(mu: torch.Tensor, log_sigma: torch.Tensor) -> dict[str, float]:
    """Mean KL(q(z_n) || p(z_n)) per image (nats) and the number of active latent units (dimensions
    whose posterior mean varies across images with variance > 0.01)."""
    kl = dens.kl_normal_to_centered(mu, log_sigma).sum(-1).mean()
    variance = mu.var(0, unbiased=True) if mu.shape[0] > 1 else torch.zeros(mu.shape[1])
    return {"kl_z_per_image": float(kl), "active_units": int((variance > ACTIVE_UNIT_THRESHOLD).sum())}


def legacy_objective_value(model, family, x, num_data, num_samples, generator) -> float:
    """The legacy-2024 objective on the full data in one batch (labelled: not an ELBO). With every image
    in the batch the ``batch`` and ``all`` local-term schemes coincide."""
    from .objectives import objective_terms

    config = ObjectiveConfig(kind="legacy-2024", estimator="mc", local_terms="batch", num_samples=num_samples)
    refine_needed = family.refines_locally
    with torch.no_grad() if not refine_needed else torch.enable_grad():
        idx = torch.arange(x.shape[0], device=x.device)
        terms = objective_terms(model, family, x, idx, num_data=num_data, config=config, generator=generator)
    return float(terms.value.detach())  # SA-VI refines with gradients on: the value may carry a graph
