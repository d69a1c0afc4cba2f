"""Likelihoods p(x | z, theta) as objects: one class per likelihood, registered by name
(``model.likelihood``), each with a plain per-image value and, where a fused kernel is faster, overrides
of the sums a training step needs. ``tests/test_likelihoods.py`` checks every override of every
registered likelihood against its plain value in float64 (values and gradients).

Shapes: ``x`` (B, D) images, ``out`` (S, B, D) the decoder's output for S draws (the Gaussian's mean,
the Bernoulli's logits), ``z`` (S, B, d) or (1, B, d) latents, ``theta`` a :class:`~amortized_bayes.model.ThetaDraw`.
Values are in nats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from . import densities as dens
from .plugins import Registry

if TYPE_CHECKING:
    from .model import BayesianDecoder, ThetaDraw


class Likelihood(ABC):
    """log p(x | decoder output). Subclasses give :meth:`per_image`; the other methods default to it."""

    name: ClassVar[str]

    @abstractmethod
    def per_image(self, model: BayesianDecoder, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x_b | out_s,b) for every draw and image: (S, B). The plain reference."""

    def total(self, model: BayesianDecoder, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``per_image(...).sum()``: a scalar over draws and images."""
        return self.per_image(model, x, out).sum()

    def decoded_per_image(self, model: BayesianDecoder, x: torch.Tensor, z: torch.Tensor,
                          theta: ThetaDraw) -> torch.Tensor:
        """``per_image`` of ``model.decode(z, theta)``: (S, B)."""
        return self.per_image(model, x, model.decode(z, theta))

    def decoded_total(self, model: BayesianDecoder, x: torch.Tensor, z: torch.Tensor,
                      theta: ThetaDraw) -> torch.Tensor:
        """``total`` of ``model.decode(z, theta)``: the likelihood term of a training step."""
        return self.total(model, x, model.decode(z, theta))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The reconstruction in pixel space from the decoder's output (the mean of p(x | out))."""
        return out


LIKELIHOODS: Registry[Likelihood] = Registry("likelihood", "model.likelihood")
get_likelihood = LIKELIHOODS.lookup


def register_likelihood(cls: type[Likelihood]) -> type[Likelihood]:
    """Class decorator: make ``cls`` available as ``model.likelihood = cls.name``."""
    LIKELIHOODS[cls.name] = cls()
    return cls


@register_likelihood
class GaussianLikelihood(Likelihood):
    """N(x; out, sigma_x^2 I) with every constant kept; sigma_x^2 fixed or learned (the model says which).
    The fused forms form the residual inside the decoder's last product and, with one theta for every z,
    make the last layer and the likelihood one autograd node."""

    name = "gaussian"

    def per_image(self, model, x, out):
        var, log_var = model.gaussian_variance()
        ll = dens.gaussian_log_likelihood(x, out, var)
        return ll if log_var is None else dens.rescale_gaussian_log_likelihood(ll, out.shape[-1], log_var)

    def total(self, model, x, out):
        var, log_var = model.gaussian_variance()
        ll = dens.gaussian_log_likelihood_total(x, out, var)
        return ll if log_var is None else dens.rescale_gaussian_log_likelihood(ll, out.numel(), log_var)

    def decoded_per_image(self, model, x, z, theta):
        resid = model.decode(z, theta, subtract=x)  # the residual formed inside the last product
        var, log_var = model.gaussian_variance()
        ll = dens.gaussian_log_likelihood_of_residual_per_image(resid, var)
        return ll if log_var is None else dens.rescale_gaussian_log_likelihood(ll, resid.shape[-1], log_var)

    def decoded_total(self, model, x, z, theta):
        var, log_var = model.gaussian_variance()
        if theta.num_samples == 1 and model.affine_output:  # one theta for every z: last layer and sum fused
            h = model.features(z, theta)
            weight, bias = model.output_layer(theta)
            rows = x if h.shape[0] == 1 else x.repeat(h.shape[0], 1)
            ll = dens.gaussian_log_likelihood_of_affine_mean(h.reshape(-1, h.shape[-1]), weight, bias, rows, var)
            terms = rows.numel()
        else:
            resid = model.decode(z, theta, subtract=x)
            terms = resid.numel()
            ll = dens.gaussian_log_likelihood_of_residual(resid, var)
        return ll if log_var is None else dens.rescale_gaussian_log_likelihood(ll, terms, log_var)


@register_likelihood
class BernoulliLikelihood(Likelihood):
    """Bernoulli(x; sigmoid(out)) per pixel, on binarised images (x in [0, 1]); ``out`` are logits."""

    name = "bernoulli"

    def per_image(self, model, x, out):
        return dens.bernoulli_log_likelihood(x, out)

    def total(self, model, x, out):
        return -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="sum")

    def mean(self, out):
        return torch.sigmoid(out)


class Legacy2024Likelihood(Likelihood):
    """The published code's reconstruction term, -||x - out||^2 (sigma_x^2 = 1/2 without its constant):
    not a density. Used by the legacy-2024 objective only, so it is not a ``model.likelihood``."""

    name = "legacy-2024"

    def per_image(self, model, x, out):
        return dens.legacy_log_likelihood(x, out)
