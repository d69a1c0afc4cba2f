"""What a fitted model says about new images: q(z), reconstructions, the ELBO and (optionally) the
amortization gap of each image, as ``amortized-bayes infer`` reports them.

q(z) comes from the run's own test-time inference (SPEC §4): the encoder for A-VI and SA-VI, a fit
with q(theta) frozen for F-VI and constant-VI. The ELBO and the gaps are per image, in nats, at
theta = E_q[theta] (the posterior mean), as ``gap`` measures them on train and test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import FittedModel
from .gap import GapConfig, ImageGaps, gaps_per_image, posterior_mean_or_draws
from .inference import LocalPosterior, StepCallback, infer_local
from .objectives import elbo_per_image


# The gap optimises q* for GAP_CHUNK images at a time, as `gap` does for its default 100 images per split:
# the stopping rule reads the chunk's summed loss, and memory stays at S x 100 x D floats per estimate.
GAP_CHUNK = 100


@dataclass
class NewImages:
    """Per image (M leading): ``mu``, ``log_sigma`` (M, d) of q(z); ``reconstructions`` (M, D) in pixel
    space at E[z] and E[theta]; ``elbo`` (M,) nats at E[theta]; ``gaps`` when asked for, measured at
    ``gap_theta``. ``posterior`` keeps the inference's cost (steps, seconds, converged)."""

    mu: torch.Tensor
    log_sigma: torch.Tensor
    reconstructions: torch.Tensor
    elbo: torch.Tensor
    posterior: LocalPosterior
    gaps: ImageGaps | None
    gap_theta: str | None


@torch.no_grad()
def elbo_in_chunks(fitted: FittedModel, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                   num_samples: int, generator: torch.Generator | None, chunk: int = 64) -> torch.Tensor:
    """ELBO_x (M,) at the posterior mean of theta with ``num_samples`` draws of z, ``chunk`` images at a
    time (S x chunk x D floats: 51 MB at S = 256, chunk = 64, D = 784)."""
    theta = fitted.model.mean()
    parts = [elbo_per_image(fitted.model, x[i:i + chunk], mu[i:i + chunk], log_sigma[i:i + chunk], theta,
                            num_samples, generator) for i in range(0, x.shape[0], chunk)]
    return torch.cat(parts)


def infer_new_images(fitted: FittedModel, x: torch.Tensor, *, elbo_samples: int = 256,
                     gap: GapConfig | None = None, seed: int = 0,
                     on_step: StepCallback | None = None) -> NewImages:
    """Everything ``infer`` writes for images ``x`` (M, D) in [0, 1] (or {0, 1} for a Bernoulli run).

    One generator seeded with ``seed`` drives the test-time inference, the ELBO's draws and the gap's, so
    the same images, run and seed give the same numbers. ``gap``: measure the amortization gap (q* by
    local optimisation, log p(x) by IWAE) with these settings (its ``images`` and ``splits`` are unused).
    """
    if x.ndim != 2 or x.shape[1] != fitted.config.model.data_dim:
        raise ValueError(f"images must be (M, {fitted.config.model.data_dim}), got {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    model = fitted.model
    model.requires_grad_(False)
    posterior = infer_local(model, fitted.family, x, fitted.config.train.test_inference, generator, on_step=on_step)
    mu, log_sigma = posterior.mu, posterior.log_sigma
    with torch.no_grad():
        reconstructions = torch.cat([model.reconstruct(mu[i:i + 4096]) for i in range(0, mu.shape[0], 4096)])
    gaps, gap_theta = None, None
    if gap is not None:
        # Before the ELBO's draws, so that up to GAP_CHUNK images draw what `gap` draws for a test split
        # of the same images and seed (a test holds the two to the same numbers).
        thetas, gap_theta = posterior_mean_or_draws(model, gap, generator)
        gaps = _concat([gaps_per_image(model, x[i:i + GAP_CHUNK], mu[i:i + GAP_CHUNK], log_sigma[i:i + GAP_CHUNK],
                                       thetas, gap, generator) for i in range(0, x.shape[0], GAP_CHUNK)])
    elbo = elbo_in_chunks(fitted, x, mu, log_sigma, elbo_samples, generator)
    return NewImages(mu, log_sigma, reconstructions, elbo, posterior, gaps, gap_theta)


def _concat(parts: list[ImageGaps]) -> ImageGaps:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return ImageGaps(cat("elbo_family"), cat("elbo_q_star"), cat("log_px_iwae"), cat("amortization_gap"),
                     cat("approximation_gap"), cat("log_px_ais"), cat("approximation_gap_ais"),
                     [r for p in parts for r in p.per_theta], sum(p.log_sigma_clamped_images for p in parts))
