"""The Bayesian decoder of SPEC §1 and its mean-field posterior q(theta).

Every weight and bias of the MLP ``d -> H (x depth) -> D`` has prior N(0, prior_scale^2) and a
variational factor N(m, s^2); a forward pass uses a reparameterised draw theta = m + s * eps (or the
posterior mean m). Draws are vectorised: S draws of theta decode S matching draws of z in one batched
matrix product per layer.

q(theta) is stored as two flat vectors of all P weights and biases (``theta_loc``, ``theta_log_scale``);
``loc`` and ``log_scale`` are per-layer views of them. One flat draw, one closed-form or Monte Carlo
term and one optimiser update over P values cost a handful of kernels instead of a handful per tensor,
which is most of a step's overhead when minibatches are small.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

NEGATIVE_SLOPE = 0.2


class _Reparameterise(torch.autograd.Function):
    """theta = loc + exp(log_scale) * eps for eps (S, P) and loc, log_scale (P,), with the backward in
    one product: d/d loc = sum_s g, d/d log_scale = sum_s g * (theta - loc) (the noise times the scale,
    kept from the forward)."""

    @staticmethod
    def forward(ctx, loc, log_scale, eps):
        step = torch.exp(log_scale) * eps  # (S, P)
        ctx.save_for_backward(step)
        return step + loc

    @staticmethod
    def backward(ctx, grad):
        (step,) = ctx.saved_tensors
        return grad.sum(0), (grad * step).sum(0), None


@dataclass
class ThetaDraw:
    """Decoder parameters to decode with: ``values[i]`` has shape ``(S, *shape_i)`` in the order
    W_1, b_1, W_2, b_2, ... (W_l: (out, in)). ``eps`` holds the standard-normal noise that produced
    them (None for the posterior mean). ``flat`` and ``eps_flat`` (S, P), when given, hold the same
    numbers as one matrix (``values[i]`` are views of ``flat``), for terms summed over all of theta."""

    values: list[torch.Tensor]
    eps: list[torch.Tensor] | None
    flat: torch.Tensor | None = None
    eps_flat: torch.Tensor | None = None

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
        self.shapes: list[tuple[int, ...]] = []
        locs = []
        for fan_in, fan_out in self.layer_sizes:
            for shape in ((fan_out, fan_in), (fan_out,)):
                loc = torch.empty(shape)
                if config.init_loc == "default":
                    # PyTorch's nn.Linear init for both weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(loc, -bound, bound)
                else:
                    nn.init.zeros_(loc)
                self.shapes.append(shape)
                locs.append(loc.reshape(-1))
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.theta_loc = nn.Parameter(torch.cat(locs))
        self.theta_log_scale = nn.Parameter(torch.full((sum(self.sizes),), float(config.init_log_scale)))
        # sigma_x^2 fitted by type-II maximum likelihood (a point estimate, not a variational factor),
        # from 1; only a model with obs_var = "learned" has it, so others keep their state dicts.
        self.log_obs_var = nn.Parameter(torch.zeros(())) if config.obs_var == "learned" else None
        self._register_load_state_dict_pre_hook(self._from_per_tensor_keys)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views (in the order W_1, b_1, ...) of a (..., P) tensor: (..., *shape_i) each."""
        lead = flat.shape[:-1]
        return [part.view(*lead, *shape) for part, shape in zip(flat.split(self.sizes, dim=-1), self.shapes)]

    @property
    def loc(self) -> list[torch.Tensor]:
        """Per-tensor views of ``theta_loc``: W_1 (H, d), b_1 (H,), ..., b_L (D,)."""
        return self._split(self.theta_loc)

    @property
    def log_scale(self) -> list[torch.Tensor]:
        """Per-tensor views of ``theta_log_scale``, shaped like :attr:`loc`."""
        return self._split(self.theta_log_scale)

    @staticmethod
    def _from_per_tensor_keys(state_dict, prefix, *args) -> None:
        # Checkpoints written before q(theta) was flat hold loc.0, loc.1, ... and log_scale.0, ...
        for name, flat in (("loc", "theta_loc"), ("log_scale", "theta_log_scale")):
            keys = sorted((k for k in state_dict if re.fullmatch(re.escape(prefix + name) + r"\.\d+", k)),
                          key=lambda k: int(k.rsplit(".", 1)[1]))
            if keys and prefix + flat not in state_dict:
                state_dict[prefix + flat] = torch.cat([state_dict.pop(k).reshape(-1) for k in keys])

    def gaussian_variance(self) -> tuple[float, torch.Tensor | None]:
        """(the variance to give the Gaussian kernels, the log variance to rescale them to, or None):
        (obs_var, None) for a fixed sigma_x^2, (1.0, log_obs_var) for a learned one."""
        if self.log_obs_var is None:
            return float(self.config.obs_var), None
        return 1.0, self.log_obs_var

    @property
    def obs_var_value(self) -> float:
        """sigma_x^2 as it is now (fixed, or the current learned value)."""
        return float(self.config.obs_var) if self.log_obs_var is None else float(self.log_obs_var.detach().exp())

    @property
    def num_params(self) -> int:
        """P, the number of random decoder weights and biases."""
        return self.theta_loc.numel()

    def theta_noise(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard-normal noise for S draws of theta, (S, P), from one call of the generator for all
        S x P values (laid out tensor by tensor: W_1's S draws, then b_1's, ...)."""
        loc = self.theta_loc
        noise = torch.randn(num_samples * loc.numel(), generator=generator, device=loc.device, dtype=loc.dtype)
        if num_samples == 1:
            return noise.view(1, -1)
        return torch.cat([block.view(num_samples, -1)
                          for block in noise.split([num_samples * n for n in self.sizes])], dim=1)

    def draw(self, flat: torch.Tensor, eps: torch.Tensor | None) -> ThetaDraw:
        """A :class:`ThetaDraw` of the flat values (S, P) (and their noise)."""
        return ThetaDraw(self._split(flat), None if eps is None else self._split(eps), flat, eps)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> ThetaDraw:
        """S reparameterised draws of theta (noise from :meth:`theta_noise`)."""
        eps = self.theta_noise(num_samples, generator)
        return self.draw(_Reparameterise.apply(self.theta_loc, self.theta_log_scale, eps), eps)

    def mean(self) -> ThetaDraw:
        """The posterior mean E_q[theta] as a single 'draw'."""
        flat = self.theta_loc.unsqueeze(0)
        return ThetaDraw(self._split(flat), None, flat, None)

    def features(self, z: torch.Tensor, theta: ThetaDraw) -> torch.Tensor:
        """The activations entering the last layer: (S, B, H) for z (S, B, d) paired with S draws of theta
        (or (B, d), or S=1 theta broadcast over z's leading dimension)."""
        if z.dim() == 2:
            z = z.unsqueeze(0)
        single = theta.values[0].shape[0] == 1
        # One theta for every z: plain matrix products on (S*B, .) rows (mm backward, no batching).
        h = z.reshape(-1, z.shape[-1]) if single else z
        for layer in range(len(self.layer_sizes) - 1):
            weight, bias = theta.values[2 * layer], theta.values[2 * layer + 1]
            if single:
                # Views, not indexing, so that the backward builds no zero-padded weight gradients.
                h = torch.addmm(bias.view(bias.shape[1:]), h, weight.view(weight.shape[1:]).T)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            # In place on the fresh product (one buffer less); its backward needs only the output.
            h = F.leaky_relu_(h, NEGATIVE_SLOPE)
        return h.view(*z.shape[:-1], -1) if single else h

    def output_layer(self, theta: ThetaDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's weight and bias in ``theta``: (S, D, H) and (S, D), or for a single draw
        (S = 1) views of shape (D, H) and (D,) (views, so that the backward builds no zero-padded
        gradients of indexing)."""
        weight, bias = theta.values[-2], theta.values[-1]
        if weight.shape[0] == 1:
            return weight.view(weight.shape[1:]), bias.view(bias.shape[1:])
        return weight, bias

    def decode(self, z: torch.Tensor, theta: ThetaDraw, subtract: torch.Tensor | None = None) -> torch.Tensor:
        """Omega(z; theta). z: (S, B, d) paired with S draws of theta (or (B, d), or S=1 theta broadcast
        over z's leading dimension) -> (S, B, D): the Gaussian mean or the Bernoulli logits.
        ``subtract`` (B, D): return Omega - subtract instead (a residual), computed inside the last
        layer's product, which saves a pass over the (S, B, D) output."""
        h = self.features(z, theta)  # (S, B, H)
        weight, bias = self.output_layer(theta)
        S, B = h.shape[0], h.shape[1]
        if weight.dim() == 2:  # a single theta for every z
            rows = h.reshape(S * B, -1)
            if subtract is None:
                return torch.addmm(bias, rows, weight.T).view(S, B, -1)
            start = bias - subtract
            if S > 1:
                start = start.repeat(S, 1)
            return start.addmm_(rows, weight.T).view(S, B, -1)  # in place on a fresh tensor: b - x + h W^T
        if subtract is None:
            return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return (bias.unsqueeze(1) - subtract).baddbmm_(h, weight.transpose(1, 2))

    def reconstruct(self, z_mean: torch.Tensor) -> torch.Tensor:
        """Pixel-space reconstruction at the posterior means: Omega(E[z]; E[theta]) (through a sigmoid for
        the Bernoulli likelihood). (B, d) -> (B, D)."""
        from .likelihoods import get_likelihood

        return get_likelihood(self.config.likelihood).mean(self.decode(z_mean, self.mean())[0])
