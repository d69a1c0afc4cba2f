"""Log densities and KL divergences used by the objectives, as small pure functions.

All log densities keep their normalising constants (nats). Shapes broadcast; reductions are explicit
in the callers. ``log_sigma`` is the log standard deviation throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LOG_2PI = math.log(2.0 * math.pi)


def normal_log_prob(value: torch.Tensor, loc: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(value; loc, exp(log_sigma)^2)."""
    return -0.5 * LOG_2PI - log_sigma - 0.5 * ((value - loc) * torch.exp(-log_sigma)) ** 2


def normal_log_prob_from_noise(eps: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise log q(v) for v = loc + exp(log_sigma) * eps: the same value as :func:`normal_log_prob`
    at that v, computed without the cancellation (v - loc)."""
    return -0.5 * LOG_2PI - log_sigma - 0.5 * eps**2


def standard_normal_log_prob(value: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Elementwise log N(value; 0, scale^2)."""
    return -0.5 * LOG_2PI - math.log(scale) - 0.5 * (value / scale) ** 2


def _sum_of_squares(v: torch.Tensor) -> torch.Tensor:
    flat = v.reshape(-1)
    return torch.dot(flat, flat)


def standard_normal_log_prob_total(value: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``standard_normal_log_prob(value, scale).sum()`` (a scalar) as one reduction."""
    const = value.numel() * (0.5 * LOG_2PI + math.log(scale))
    return -0.5 * _sum_of_squares(value) / scale**2 - const


def normal_log_prob_from_noise_total(eps: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """``normal_log_prob_from_noise(eps, log_sigma).sum()`` (a scalar) for eps (S, P) and log_sigma
    (P,): two reductions instead of elementwise passes over (S, P)."""
    draws = eps.numel() // log_sigma.numel()
    return -0.5 * LOG_2PI * eps.numel() - draws * log_sigma.sum() - 0.5 * _sum_of_squares(eps)


def kl_normal_to_centered(loc: torch.Tensor, log_sigma: torch.Tensor, prior_scale: float = 1.0) -> torch.Tensor:
    """Elementwise KL( N(loc, exp(log_sigma)^2) || N(0, prior_scale^2) ) in nats."""
    var_ratio = torch.exp(2.0 * log_sigma) / prior_scale**2
    return 0.5 * (var_ratio + loc**2 / prior_scale**2 - 1.0 - torch.log(var_ratio))


def normal_entropy(log_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy of N(., exp(log_sigma)^2): 0.5 log(2 pi e) + log_sigma."""
    return 0.5 * (LOG_2PI + 1.0) + log_sigma


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, obs_var: float) -> torch.Tensor:
    """log N(x; mean, obs_var I) summed over the last dimension (pixels). x: (..., D) -> (...)."""
    d = x.shape[-1]
    sq = (x - mean).pow(2).sum(-1)
    return -0.5 * d * (LOG_2PI + math.log(obs_var)) - 0.5 * sq / obs_var


class _GaussianLogLikelihoodOfResidual(torch.autograd.Function):
    """sum over every image and pixel of log N(0; resid, obs_var): one fused per-image reduction, and a
    backward that turns the residual into its gradient in place (the unfused expression makes about
    seven passes over the (S, B, D) tensor; this is the largest elementwise cost of a step)."""

    @staticmethod
    def forward(ctx, resid, obs_var):
        ctx.save_for_backward(resid)
        ctx.obs_var = obs_var
        sq = torch.linalg.vector_norm(resid, dim=-1).square().sum()  # per-image sums keep float32 accurate
        const = 0.5 * resid.numel() * (LOG_2PI + math.log(obs_var))
        return -0.5 * sq / obs_var - const

    @staticmethod
    def backward(ctx, grad):
        (resid,) = ctx.saved_tensors
        return resid.mul_(-grad / ctx.obs_var), None


def gaussian_log_likelihood_of_residual(resid: torch.Tensor, obs_var: float) -> torch.Tensor:
    """sum of log N(x; mean, obs_var) over every image and pixel, from the residual ``mean - x`` (a
    scalar). The backward overwrites ``resid`` with its gradient: pass a tensor nothing else uses."""
    return _GaussianLogLikelihoodOfResidual.apply(resid, obs_var)


class _GaussianLogLikelihoodOfAffineMean(torch.autograd.Function):
    """sum over every row and pixel of log N(x; h W^T + b, obs_var): the decoder's last layer and the
    likelihood in one node. The residual r = h W^T + b - x is formed inside the product; the backward
    needs only c r with a scalar c = -grad / obs_var, so c goes into the products' scale factor and the
    bias sum instead of a pass that scales r (a 10,000 x 784 tensor at full batch)."""

    @staticmethod
    def forward(ctx, h, weight, bias, x, obs_var):
        resid = (bias - x).addmm_(h, weight.T)  # (M, D): in place on the fresh b - x
        ctx.save_for_backward(h, weight, resid)
        ctx.obs_var = obs_var
        sq = torch.linalg.vector_norm(resid, dim=-1).square().sum()  # per-row sums keep float32 accurate
        return -0.5 * sq / obs_var - 0.5 * resid.numel() * (LOG_2PI + math.log(obs_var))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight, resid = ctx.saved_tensors
        c = -float(grad) / ctx.obs_var
        g_h = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_h = torch.mm(resid, weight).mul_(c)
        if ctx.needs_input_grad[1]:
            g_w = torch.mm(resid.T, h).mul_(c)
        if ctx.needs_input_grad[2]:
            g_b = resid.sum(0).mul_(c)
        return g_h, g_w, g_b, None, None


def gaussian_log_likelihood_of_affine_mean(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                           x: torch.Tensor, obs_var: float) -> torch.Tensor:
    """sum over rows and pixels of log N(x; h W^T + b, obs_var I) (a scalar). h: (M, H), weight: (D, H),
    bias: (D,), x: (M, D). Differentiable once, in h, weight and bias."""
    return _GaussianLogLikelihoodOfAffineMean.apply(h, weight, bias, x, obs_var)


def gaussian_log_likelihood_total(x: torch.Tensor, mean: torch.Tensor, obs_var: float) -> torch.Tensor:
    """``gaussian_log_likelihood(x, mean, obs_var).sum()`` (a scalar) computed in fewer passes; only the
    gradient with respect to ``mean`` is provided. x: (B, D) or broadcastable to mean (S, B, D)."""
    return gaussian_log_likelihood_of_residual(mean - x, obs_var)


class _SquaredNormPerRow(torch.autograd.Function):
    """||r||^2 over the last dimension, with a backward of one pass (2 g r) that is itself differentiable
    (SA-VI differentiates through its refinement gradients; pow and sum make several passes each way)."""

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        return torch.linalg.vector_norm(r, dim=-1).square()

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return r * (2 * grad).unsqueeze(-1)


def gaussian_log_likelihood_of_residual_per_image(resid: torch.Tensor, obs_var: float) -> torch.Tensor:
    """log N(x; mean, obs_var I) per image from the residual ``mean - x``: (..., D) -> (...). Twice
    differentiable, and ``resid`` is left intact."""
    d = resid.shape[-1]
    return -0.5 * _SquaredNormPerRow.apply(resid) / obs_var - 0.5 * d * (LOG_2PI + math.log(obs_var))


def rescale_gaussian_log_likelihood(unit: torch.Tensor, terms: int, log_var: torch.Tensor) -> torch.Tensor:
    """A Gaussian log-likelihood at variance exp(log_var), from the same sum at variance 1 (``unit``)
    over ``terms`` pixel terms: log N at v = (unit + n/2 log 2 pi) / v - n/2 (log 2 pi + log v).
    Differentiable in ``unit`` and ``log_var``, so the fused kernels (which take a fixed variance) serve
    a learned one unchanged."""
    half_n = 0.5 * terms
    return (unit + half_n * LOG_2PI) * torch.exp(-log_var) - half_n * (LOG_2PI + log_var)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension; x in [0, 1] (binary for a
    proper likelihood). (..., D) -> (...)."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


# --- legacy-2024: the published code's terms (SPEC §3). Not densities: constants dropped, and log q
# evaluated with the standard deviation where the variance belongs.


def legacy_log_q(eps: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise -1/2 [log s + (v - m)^2 / s] with s = exp(log_sigma) the sd that drew v = m + s eps."""
    sigma = torch.exp(log_sigma)
    return -0.5 * (log_sigma + (sigma * eps) ** 2 / sigma)


def legacy_log_prior_theta(theta: torch.Tensor) -> torch.Tensor:
    """Elementwise -theta^2 (a N(0, 1/2) prior without its constant)."""
    return -(theta**2)


def legacy_log_prior_z(z: torch.Tensor) -> torch.Tensor:
    """Elementwise -1/2 z^2."""
    return -0.5 * z**2


def legacy_log_likelihood(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """-||x - mean||^2 summed over pixels (sigma^2 = 1/2 without the constant). (..., D) -> (...)."""
    return -(x - mean).pow(2).sum(-1)
