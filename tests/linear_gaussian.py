"""A linear-Gaussian model, where everything the engine estimates is known in closed form.

x = W z + b + e, z ~ N(0, I_d), e ~ N(0, s2 I_D). The exact posterior of z given x is Gaussian with
precision L = I + W^T W / s2 and mean L^{-1} W^T (x - b) / s2; the best mean-field Gaussian factor has
that mean and variances 1 / diag(L). The best single factor shared by all images (constant-VI) is the
best factor for the average image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from amortized_bayes.config import ModelConfig
from amortized_bayes.model import BayesianDecoder


@dataclass
class LinearGaussian:
    W: torch.Tensor  # (D, d)
    b: torch.Tensor  # (D,)
    obs_var: float

    @property
    def precision(self) -> torch.Tensor:
        d = self.W.shape[1]
        return torch.eye(d, dtype=self.W.dtype) + self.W.T @ self.W / self.obs_var

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.precision, (self.W.T @ (x - self.b).T) / self.obs_var).T

    def meanfield_var(self) -> torch.Tensor:
        return 1.0 / torch.diagonal(self.precision)

    def elbo(self, x, mu, log_sigma) -> torch.Tensor:
        """Exact per-image ELBO of q = N(mu, diag exp(log_sigma)^2) (rows of x, mu, log_sigma)."""
        D = x.shape[-1]
        var = torch.exp(2 * log_sigma)
        resid = x - self.b - mu @ self.W.T
        expected_sq = resid.pow(2).sum(-1) + (var * self.W.pow(2).sum(0)).sum(-1)
        ll = -0.5 * D * math.log(2 * math.pi * self.obs_var) - 0.5 * expected_sq / self.obs_var
        kl = 0.5 * (var + mu**2 - 1 - 2 * log_sigma).sum(-1)
        return ll - kl

    def log_evidence(self, x) -> torch.Tensor:
        """Exact log p(x) per image: x ~ N(b, W W^T + s2 I)."""
        cov = self.W @ self.W.T + self.obs_var * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.W.shape[1], generator=generator, dtype=self.W.dtype)
        e = torch.randn(n, self.W.shape[0], generator=generator, dtype=self.W.dtype)
        return z @ self.W.T + self.b + math.sqrt(self.obs_var) * e

    def model_config(self) -> ModelConfig:
        D, d = self.W.shape
        return ModelConfig(latent_dim=d, hidden=1, depth=0, data_dim=D, obs_var=self.obs_var,
                           init_log_scale=-30.0)

    def decoder(self) -> BayesianDecoder:
        """A decoder whose q(theta) is (numerically) a point mass at (W, b)."""
        model = BayesianDecoder(self.model_config())
        with torch.no_grad():
            model.loc[0].copy_(self.W)
            model.loc[1].copy_(self.b)
        return model


def make(D: int = 6, d: int = 3, obs_var: float = 0.5, seed: int = 0) -> LinearGaussian:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, d, generator=g) * 0.8
    b = torch.randn(D, generator=g) * 0.3
    return LinearGaussian(W, b, obs_var)
