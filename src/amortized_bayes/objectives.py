"""Unbiased minibatch estimates of the full-data ELBO (SPEC §3), and the legacy-2024 objective.

ELBO(q) = E_q[log p(x, z, theta)] - E_q[log q(theta, z)], split into five terms, each reported at
full-data scale in nats:

* ``log_lik``   sum_n E log p(x_n | z_n, theta)   (batch rows, scaled by N/B)
* ``log_prior_z`` + ``entropy_z``: sum_n E[log p(z_n) - log q(z_n)] = -sum_n KL(q_n || p)
  (``batch``: batch rows scaled by N/B; ``all``: every row, every step)
* ``log_prior_theta`` + ``entropy_theta``: E[log p(theta) - log q(theta)] = -KL(q(theta) || p(theta)),
  counted once per step.

With ``estimator="mc"`` every term is a Monte Carlo average over the S draws; with ``"analytic"`` the
two KL terms are in closed form (their split into prior and entropy parts is reported too). For the
``legacy-2024`` objective the same machinery evaluates the published code's terms instead; its value is
not an ELBO.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import densities as dens
from .config import ObjectiveConfig
from .families import LocalELBO, VariationalFamily
from .likelihoods import Legacy2024Likelihood, Likelihood, get_likelihood
from .model import BayesianDecoder, ThetaDraw
from .plugins import Registry


@dataclass
class ObjectiveTerms:
    """The five terms of the objective (scalars, nats, full-data scale). ``value`` is their sum: the
    ELBO estimate (or the legacy objective's value)."""

    log_lik: torch.Tensor
    log_prior_z: torch.Tensor
    entropy_z: torch.Tensor
    log_prior_theta: torch.Tensor
    entropy_theta: torch.Tensor

    @property
    def value(self) -> torch.Tensor:
        return self.log_lik + self.log_prior_z + self.entropy_z + self.log_prior_theta + self.entropy_theta


def likelihood_of(model: BayesianDecoder) -> Likelihood:
    """The model's likelihood object (``model.likelihood``)."""
    return get_likelihood(model.config.likelihood)


class _ReparameterisedMonteCarlo(torch.autograd.Function):
    """S reparameterised draws v = loc + exp(log_scale) * eps (loc, log_scale: any shape; eps (S, *shape))
    together with their Monte Carlo terms summed over the draws: sum log N(v; 0, scale^2) and
    sum -log q(v). The backward is one pass: the prior's gradient -v / scale^2 joins the incoming one
    before the chain rule through the reparameterisation (the separate expressions cost about ten
    passes over the draws). Used for theta (shape (P,)) and for the local z (shape (B, d))."""

    @staticmethod
    def forward(ctx, loc, log_scale, eps, scale):
        step = torch.exp(log_scale) * eps
        draws = step + loc
        flat_v, flat_eps = draws.reshape(-1), eps.reshape(-1)
        n = draws.numel()
        log_prior = -0.5 * torch.dot(flat_v, flat_v) / scale**2 - n * (0.5 * dens.LOG_2PI + math.log(scale))
        neg_log_q = eps.shape[0] * log_scale.sum() + 0.5 * torch.dot(flat_eps, flat_eps) + 0.5 * dens.LOG_2PI * n
        ctx.save_for_backward(draws, step)
        ctx.scale = scale
        return draws, log_prior, neg_log_q

    @staticmethod
    def backward(ctx, g_draws, g_prior, g_neg_log_q):
        draws, step = ctx.saved_tensors
        S, shape = draws.shape[0], draws.shape[1:]
        prior_part = draws * (-g_prior / ctx.scale**2)
        g = prior_part if g_draws is None else prior_part.add_(g_draws)
        if S == 1:
            return g.view(shape), torch.addcmul(g_neg_log_q, g, step).view(shape), None, None
        return g.sum(0), (g * step).sum(0).add_(g_neg_log_q * S), None, None


def reparameterised_with_terms(loc: torch.Tensor, log_scale: torch.Tensor, eps: torch.Tensor,
                               prior_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v = loc + exp(log_scale) * eps (S, *shape), E log N(v; 0, prior_scale^2), E[-log q(v)]): the draws
    and their mc terms averaged over the S draws (summed over every other dimension), in one node."""
    draws, log_prior, neg_log_q = _ReparameterisedMonteCarlo.apply(loc, log_scale, eps, prior_scale)
    S = eps.shape[0]
    return draws, log_prior / S, neg_log_q / S


def sample_theta_with_terms(model: BayesianDecoder, num_samples: int, generator: torch.Generator | None
                            ) -> tuple[ThetaDraw, torch.Tensor, torch.Tensor]:
    """S draws of q(theta) (the same draws as ``model.sample`` with this generator state) and the mc
    estimates (E log p(theta), E[-log q(theta)]) of :func:`theta_terms`."""
    eps = model.theta_noise(num_samples, generator)
    flat, log_prior, entropy = reparameterised_with_terms(model.theta_loc, model.theta_log_scale, eps,
                                                          model.config.prior_scale)
    return model.draw(flat, eps), log_prior, entropy


def draw_z(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """S reparameterised draws z = mu + sigma * eps. (B, d) -> z, eps: (S, B, d)."""
    eps = torch.randn((num_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(log_sigma) * eps, eps


def elbo_per_image(model: BayesianDecoder, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                   theta: ThetaDraw, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ELBO_x(q) = E_q(z)[log p(x | z, theta) + log p(z) - log q(z)] per image (B,): S reparameterised
    draws of z (paired with theta's S draws, or all decoded with a single theta) and the closed-form KL."""
    z, _ = draw_z(mu, log_sigma, num_samples, generator)
    ll = likelihood_of(model).decoded_per_image(model, x, z, theta).mean(0)
    return ll - dens.kl_normal_to_centered(mu, log_sigma).sum(-1)


def make_local_elbo(model: BayesianDecoder, num_samples: int = 1, generator: torch.Generator | None = None,
                    theta: ThetaDraw | None = None) -> LocalELBO:
    """:func:`elbo_per_image` as a function of (x, mu, log_sigma), theta fixed (default: the posterior
    mean, taken when called so that it follows training)."""

    def local_elbo(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        th = theta if theta is not None else model.mean()
        return elbo_per_image(model, x, mu, log_sigma, th, num_samples, generator)

    return local_elbo


class Objective(ABC):
    """What a training step maximises, as the five :class:`ObjectiveTerms`. A subclass says which
    likelihood it uses and how it scores draws of z and theta by Monte Carlo; the closed-form KL terms
    (``estimator="analytic"``), the minibatch scaling and the drawing are shared. ``fused_mc``: its Monte
    Carlo terms are log N densities, which one fused autograd node computes with the draws
    (:func:`reparameterised_with_terms`, tested against the plain terms in tests/test_objectives.py)."""

    kind: ClassVar[str]
    fused_mc: ClassVar[bool] = False

    @abstractmethod
    def likelihood(self, model: BayesianDecoder) -> Likelihood:
        """The likelihood whose log p(x | z, theta) this objective sums."""

    @abstractmethod
    def mc_local_terms(self, z: torch.Tensor, eps: torch.Tensor,
                       log_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum log p(z), sum -log q(z)) over S draws z = mu + sigma eps (S, B, d), averaged over S."""

    @abstractmethod
    def mc_theta_terms(self, values: torch.Tensor, eps: torch.Tensor, log_scale: torch.Tensor,
                       prior_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(E log p(theta), E[-log q(theta)]) from S flat draws ``values`` (S, P) and their noise."""

    def local_terms(self, mu: torch.Tensor, log_sigma: torch.Tensor, z: torch.Tensor, eps: torch.Tensor,
                    estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_n E log p(z_n), sum_n E[-log q(z_n)]) over the given rows, averaged over the S draws.
        mu, log_sigma: (B, d); z, eps: (S, B, d)."""
        if estimator == "analytic":
            neg_kl = -dens.kl_normal_to_centered(mu, log_sigma).sum()
            entropy = dens.normal_entropy(log_sigma).sum()
            return neg_kl - entropy, entropy
        return self.mc_local_terms(z, eps, log_sigma)

    def theta_terms(self, model: BayesianDecoder, theta: ThetaDraw,
                    estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(E log p(theta), E[-log q(theta)]) estimated from ``theta`` (mc) or in closed form (analytic)."""
        scale = model.config.prior_scale
        loc, log_scale = model.theta_loc, model.theta_log_scale
        if estimator == "analytic":
            neg_kl = -dens.kl_normal_to_centered(loc, log_scale, scale).sum()
            entropy = dens.normal_entropy(log_scale).sum()
            return neg_kl - entropy, entropy
        S = theta.num_samples
        values = theta.flat if theta.flat is not None else torch.cat([v.reshape(S, -1) for v in theta.values], 1)
        if theta.eps_flat is not None:
            eps = theta.eps_flat
        else:
            assert theta.eps is not None, "theta_terms needs the noise of a reparameterised draw"
            eps = torch.cat([e.reshape(S, -1) for e in theta.eps], 1)
        return self.mc_theta_terms(values, eps, log_scale, scale)

    def draw_z_with_terms(self, mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
                          generator: torch.Generator | None, estimator: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (S, B, d) as :func:`draw_z` draws it, and :meth:`local_terms` of the rows (one fused autograd
        node for the Monte Carlo terms where ``fused_mc``)."""
        if estimator == "mc" and self.fused_mc:
            eps = torch.randn((num_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            return reparameterised_with_terms(mu, log_sigma, eps)
        z, eps = draw_z(mu, log_sigma, num_samples, generator)
        return (z, *self.local_terms(mu, log_sigma, z, eps, estimator))

    def terms(self, model: BayesianDecoder, family: VariationalFamily, x_batch: torch.Tensor,
              idx_batch: torch.Tensor | None, *, num_data: int, config: ObjectiveConfig,
              generator: torch.Generator | None = None, x_all: torch.Tensor | None = None) -> ObjectiveTerms:
        """An unbiased estimate of the full-data objective from one minibatch.

        x_batch: (B, D) images, idx_batch: (B,) their rows in the training set (None: rows 0..B-1 and
        B must equal ``num_data``). ``x_all`` (N, D) is needed for ``local_terms="all"`` (the encoder runs
        on every image each step).
        """
        S, B = config.num_samples, x_batch.shape[0]
        fused_theta = config.estimator == "mc" and self.fused_mc
        if fused_theta:
            theta, log_prior_theta, entropy_theta = sample_theta_with_terms(model, S, generator)
        else:
            theta = model.sample(S, generator)
        refine = make_local_elbo(model, 1, generator) if family.refines_locally else None
        if config.local_terms == "all":
            if x_all is None or x_all.shape[0] != num_data:
                raise ValueError("local_terms='all' needs x_all with every one of the num_data images")
            all_idx = torch.arange(num_data, device=x_batch.device)
            mu_all, ls_all = family.local_params(x_all, all_idx, refine)
            z_all, log_prior_z, entropy_z = self.draw_z_with_terms(mu_all, ls_all, S, generator, config.estimator)
            rows = idx_batch if idx_batch is not None else all_idx[:B]
            z = z_all[:, rows]
        else:
            mu, ls = family.local_params(x_batch, idx_batch, refine)
            z, lp, ent = self.draw_z_with_terms(mu, ls, S, generator, config.estimator)
            log_prior_z, entropy_z = lp * (num_data / B), ent * (num_data / B)
        ll = self.likelihood(model).decoded_total(model, x_batch, z, theta) / S * (num_data / B)
        if not fused_theta:
            log_prior_theta, entropy_theta = self.theta_terms(model, theta, config.estimator)
        return ObjectiveTerms(ll, log_prior_z, entropy_z, log_prior_theta, entropy_theta)


OBJECTIVES: Registry[Objective] = Registry("objective", "objective.kind")
get_objective = OBJECTIVES.lookup


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available as ``objective.kind = cls.kind``."""
    OBJECTIVES[cls.kind] = cls()
    return cls


@register_objective
class ELBO(Objective):
    """The evidence lower bound of SPEC §3: every term a proper log density."""

    kind = "elbo"
    fused_mc = True

    def likelihood(self, model):
        return likelihood_of(model)

    def mc_local_terms(self, z, eps, log_sigma):
        S = z.shape[0]
        return dens.standard_normal_log_prob(z).sum() / S, -dens.normal_log_prob_from_noise(eps, log_sigma).sum() / S

    def mc_theta_terms(self, values, eps, log_scale, prior_scale):
        S = values.shape[0]
        prior = dens.standard_normal_log_prob_total(values, prior_scale) / S
        log_q = dens.normal_log_prob_from_noise_total(eps, log_scale) / S
        return prior, -log_q


@register_objective
class Legacy2024(Objective):
    """The published code's objective (SPEC §3), for number-for-number replication: its likelihood,
    priors and log q drop constants and put the standard deviation where the variance belongs. Not an
    ELBO; defined by its Monte Carlo terms only."""

    kind = "legacy-2024"
    _likelihood = Legacy2024Likelihood()

    def likelihood(self, model):
        return self._likelihood

    def mc_local_terms(self, z, eps, log_sigma):
        S = z.shape[0]
        return dens.legacy_log_prior_z(z).sum() / S, -dens.legacy_log_q(eps, log_sigma).sum() / S

    def mc_theta_terms(self, values, eps, log_scale, prior_scale):
        S = values.shape[0]
        prior = dens.legacy_log_prior_theta(values).sum() / S
        log_q = dens.legacy_log_q(eps, log_scale).sum() / S
        return prior, -log_q


def objective_terms(model: BayesianDecoder, family: VariationalFamily, x_batch: torch.Tensor,
                    idx_batch: torch.Tensor | None, *, num_data: int, config: ObjectiveConfig,
                    generator: torch.Generator | None = None, x_all: torch.Tensor | None = None) -> ObjectiveTerms:
    """:meth:`Objective.terms` of the objective ``config.kind``."""
    return get_objective(config.kind).terms(model, family, x_batch, idx_batch, num_data=num_data, config=config,
                                            generator=generator, x_all=x_all)


def negative_elbo(model, family, x_batch, idx_batch, *, num_data, config, generator=None, x_all=None) -> torch.Tensor:
    """The loss the trainer minimises: minus :func:`objective_terms`' value (a scalar, nats)."""
    return -objective_terms(model, family, x_batch, idx_batch, num_data=num_data, config=config,
                            generator=generator, x_all=x_all).value
