"""Test-time inference: q(z') for new images with q(theta) frozen (SPEC §4).

Amortized families map images through their encoder (SA-VI refines the output). Families without an
encoder (F-VI: one factor per image; constant-VI: one shared factor) are fitted by Adam on the local
ELBO, with theta drawn from the frozen q(theta), until the stated convergence rule holds: the mean loss
over the last ``window`` steps improves by less than ``rtol`` (relative) on the window before, or
``max_steps`` is reached. Steps and seconds are returned with the result: the cost of not amortizing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Callable

import torch

from .config import LocalInferenceConfig
from .families import VariationalFamily
from .model import BayesianDecoder
from .objectives import elbo_per_image, make_local_elbo


@dataclass
class LocalPosterior:
    """q(z) for M images: ``mu``, ``log_sigma`` (M, d); what it cost (steps of optimisation, seconds)."""

    mu: torch.Tensor
    log_sigma: torch.Tensor
    steps: int
    seconds: float
    converged: bool
    family: VariationalFamily


def local_negative_elbo(model: BayesianDecoder, family: VariationalFamily, x: torch.Tensor,
                        num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """-sum_m ELBO_m over new images with theta ~ q(theta) (not trained here): S draws, closed-form KL."""
    with torch.no_grad():
        theta = model.sample(num_samples, generator)
    mu, log_sigma = family.local_params(x, None)
    return -elbo_per_image(model, x, mu, log_sigma, theta, num_samples, generator).sum()


StepCallback = Callable[[int, float], None]


def fit_local_family(model: BayesianDecoder, family: VariationalFamily, x: torch.Tensor,
                     config: LocalInferenceConfig, generator: torch.Generator | None = None,
                     max_steps: int | None = None, on_step: StepCallback | None = None) -> tuple[int, float, bool]:
    """Optimise ``family``'s parameters (only) on the local ELBO of ``x``. Returns (steps, seconds,
    converged). q(theta) is not modified. ``on_step(steps, loss)`` is called after every step (a
    progress bar); ``loss`` is -sum_m ELBO_m of that step's draw, in nats."""
    params = [p for p in family.parameters()]
    optimiser = torch.optim.Adam(params, lr=config.lr)
    limit = config.max_steps if max_steps is None else max_steps
    window, previous, losses = config.window, None, []
    start = time.perf_counter()
    steps, converged = 0, False
    while steps < limit:
        optimiser.zero_grad(set_to_none=True)
        loss = local_negative_elbo(model, family, x, config.num_samples, generator)
        loss.backward()
        optimiser.step()
        steps += 1
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(steps, losses[-1])
        if len(losses) == window:
            current = sum(losses) / window
            if previous is not None and (previous - current) < config.rtol * abs(previous):
                converged = True
                break
            previous, losses = current, []
    return steps, time.perf_counter() - start, converged


def infer_local(model: BayesianDecoder, family: VariationalFamily, x: torch.Tensor,
                config: LocalInferenceConfig | None = None, generator: torch.Generator | None = None,
                warm_start: VariationalFamily | None = None, on_step: StepCallback | None = None) -> LocalPosterior:
    """q(z) for new images ``x`` (M, D) under any family, with q(theta) frozen.

    ``warm_start``: a family for these same images from an earlier call, to continue from.
    ``on_step``: called after each optimisation step of a family without an encoder (see
    :func:`fit_local_family`); amortized families take no steps.
    """
    config = config or LocalInferenceConfig()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        start = time.perf_counter()
        if family.amortized:
            refine = make_local_elbo(model, 1, generator)
            mu, log_sigma = family.local_params(x, None, refine)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)  # a GPU returns before it has computed: time the work
            return LocalPosterior(mu.detach(), log_sigma.detach(), 0, time.perf_counter() - start, True, family)
        local = warm_start if warm_start is not None else family.for_new_data(x.shape[0])
        steps, seconds, converged = fit_local_family(model, local, x, config, generator, on_step=on_step)
        with torch.no_grad():
            mu, log_sigma = local.local_params(x, None)
        return LocalPosterior(mu.detach().clone(), log_sigma.detach().clone(), steps, seconds, converged, local)
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
