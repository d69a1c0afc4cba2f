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
from .objectives import draw_z, log_likelihood


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


def elbo_per_image(model: BayesianDecoder, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                   theta: ThetaDraw, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ELBO_x for each image (M,), with S reparameterised draws and the closed-form KL to N(0, I)."""
    z, _ = draw_z(mu, log_sigma, num_samples, generator)
    ll = log_likelihood(model, x, model.decode(z, theta), legacy=False).mean(0)
    return ll - dens.kl_normal_to_centered(mu, log_sigma).sum(-1)


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
