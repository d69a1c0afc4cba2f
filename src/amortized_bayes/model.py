"""The Bayesian decoder of SPEC §1 and its mean-field posterior q(theta).

Every weight and bias of the MLP ``d -> H (x depth) -> D`` has prior N(0, prior_scale^2) and a
variational factor N(m, s^2); a forward pass uses a reparameterised draw theta = m + s * eps (or the
posterior mean m). Draws are vectorised: S draws of theta decode S matching draws of z in one batched
matrix product per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

NEGATIVE_SLOPE = 0.2


@dataclass
class ThetaDraw:
    """Decoder parameters to decode with: ``values[i]`` has shape ``(S, *shape_i)`` in the order
    W_1, b_1, W_2, b_2, ... (W_l: (out, in)). ``eps`` holds the standard-normal noise that produced
    them (None for the posterior mean)."""

    values: list[torch.Tensor]
    eps: list[torch.Tensor] | None

    @property
    def num_samples(self) -> int:
        return int(self.values[0].shape[0])


class BayesianDecoder(nn.Module):
    """q(theta) = N(loc, diag exp(log_scale)^2) over every decoder weight and bias, plus the decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        sizes = [config.latent_dim] + [config.hidden] * config.depth + [config.data_dim]
        self.layer_sizes = list(zip(sizes[:-1], sizes[1:]))
        locs, log_scales = [], []
        for fan_in, fan_out in self.layer_sizes:
            for shape in ((fan_out, fan_in), (fan_out,)):
                loc = torch.empty(shape)
                if config.init_loc == "default":
                    # PyTorch's nn.Linear init for both weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(loc, -bound, bound)
                else:
                    nn.init.zeros_(loc)
                locs.append(nn.Parameter(loc))
                log_scales.append(nn.Parameter(torch.full(shape, float(config.init_log_scale))))
        self.loc = nn.ParameterList(locs)
        self.log_scale = nn.ParameterList(log_scales)

    @property
    def num_params(self) -> int:
        """P, the number of random decoder weights and biases."""
        return sum(p.numel() for p in self.loc)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> ThetaDraw:
        """S reparameterised draws of theta."""
        eps = [
            torch.randn((num_samples, *m.shape), generator=generator, device=m.device, dtype=m.dtype)
            for m in self.loc
        ]
        values = [m + torch.exp(s) * e for m, s, e in zip(self.loc, self.log_scale, eps)]
        return ThetaDraw(values, eps)

    def mean(self) -> ThetaDraw:
        """The posterior mean E_q[theta] as a single 'draw'."""
        return ThetaDraw([m.unsqueeze(0) for m in self.loc], None)

    def decode(self, z: torch.Tensor, theta: ThetaDraw) -> torch.Tensor:
        """Omega(z; theta). z: (S, B, d) paired with S draws of theta (or (B, d), or S=1 theta broadcast
        over z's leading dimension) -> (S, B, D): the Gaussian mean or the Bernoulli logits."""
        if z.dim() == 2:
            z = z.unsqueeze(0)
        h = z
        n_layers = len(self.layer_sizes)
        for layer in range(n_layers):
            weight, bias = theta.values[2 * layer], theta.values[2 * layer + 1]
            if weight.shape[0] == 1:  # one theta for every z: a plain matrix product (and mm backward)
                h = torch.addmm(bias[0], h.reshape(-1, h.shape[-1]), weight[0].T).reshape(*h.shape[:-1], -1)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if layer < n_layers - 1:
                h = F.leaky_relu(h, NEGATIVE_SLOPE)
        return h

    def reconstruct(self, z_mean: torch.Tensor) -> torch.Tensor:
        """Pixel-space reconstruction at the posterior means: Omega(E[z]; E[theta]) (through a sigmoid for
        the Bernoulli likelihood). (B, d) -> (B, D)."""
        out = self.decode(z_mean, self.mean())[0]
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out
