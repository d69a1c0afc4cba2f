"""The Bayesian decoder of SPEC §1 and its mean-field posterior q(theta).

Every weight and bias of the decoder network (the MLP ``d -> H (x depth) -> D``, or the convolutional
network of :class:`ConvNetwork`) has prior N(0, prior_scale^2) and a variational factor N(m, s^2); a
forward pass uses a reparameterised draw theta = m + s * eps (or the posterior mean m). Draws are
vectorised: S draws of theta decode S matching draws of z in one batched matrix product (or grouped
convolution) per layer.

q(theta) is stored as two flat vectors of all P weights and biases (``theta_loc``, ``theta_log_scale``);
``loc`` and ``log_scale`` are per-layer views of them. One flat draw, one closed-form or Monte Carlo
term and one optimiser update over P values cost a handful of kernels instead of a handful per tensor,
which is most of a step's overhead when minibatches are small.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .plugins import Registry

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
    """Decoder parameters to decode with: ``values[i]`` has shape ``(S, *shape_i)`` in the order of the
    network's tensors (:meth:`DecoderNetwork.tensors`; for the MLP W_1, b_1, W_2, b_2, ... with W_l
    (out, in)). ``eps`` holds the standard-normal noise that produced
    them (None for the posterior mean). ``flat`` and ``eps_flat`` (S, P), when given, hold the same
    numbers as one matrix (``values[i]`` are views of ``flat``), for terms summed over all of theta."""

    values: list[torch.Tensor]
    eps: list[torch.Tensor] | None
    flat: torch.Tensor | None = None
    eps_flat: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.values[0].shape[0])


class DecoderNetwork(ABC):
    """The deterministic network Omega(z; theta) of a Bayesian decoder: which tensors theta holds and
    how a draw of them decodes z. The extension point for decoder architectures (``model.architecture``):
    a subclass registered with :func:`register_architecture` says

    - ``name``: its value of ``model.architecture``;
    - ``config_fields``: the :class:`~amortized_bayes.config.ModelConfig` fields of its shape among
      ``SHAPE_FIELDS`` (the others are reset to their defaults in run ids, so that a field it does not
      read cannot split a grid);
    - :meth:`tensors`: the shape and fan-in of every weight and bias, in the order of the flat q(theta);
    - :meth:`decode`: Omega for S draws;
    - :meth:`check`: the configs it refuses, with the field and the reason;

    and, when its last layer is affine in the activations before it (``affine_output``), :meth:`features`
    (the last layer is then the last weight and bias of :meth:`tensors`), which lets the Gaussian
    likelihood fuse that layer with its sum.
    """

    name: ClassVar[str]
    config_fields: ClassVar[frozenset[str]]
    affine_output: ClassVar[bool] = False
    SHAPE_FIELDS: ClassVar[frozenset[str]] = frozenset({"hidden", "depth", "channels"})

    def __init__(self, config: ModelConfig):
        self.config = config

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        """Raise a :class:`~amortized_bayes.config.ConfigError` for a config this network cannot build."""
        return None

    @abstractmethod
    def tensors(self) -> list[tuple[tuple[int, ...], int]]:
        """(shape, fan_in) of every weight and bias, in the flat order of q(theta). ``fan_in`` gives the
        bound of PyTorch's default init of that layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def decode(self, z: torch.Tensor, theta: ThetaDraw) -> torch.Tensor:
        """Omega(z; theta): z (S, B, d) paired with S draws of theta, or (..., B, d) all decoded with a
        single draw (S = 1) -> (S, B, D) or (..., B, D). A network with ``affine_output`` need not
        define it (the decoder applies the last layer to :meth:`features`)."""
        raise NotImplementedError(f"the {self.name} decoder network must define decode")

    def features(self, z: torch.Tensor, theta: ThetaDraw) -> torch.Tensor:
        """The activations entering the affine last layer (only when ``affine_output``)."""
        raise NotImplementedError(f"the {self.name} decoder's last layer is not affine")


ARCHITECTURES: Registry[type[DecoderNetwork]] = Registry("decoder architecture", "model.architecture")


def register_architecture(cls: type[DecoderNetwork]) -> type[DecoderNetwork]:
    """Class decorator: make ``cls`` available as ``model.architecture = cls.name``."""
    from .config import check_safe_name

    check_safe_name(cls.name, f"architecture name of {cls.__name__}")
    ARCHITECTURES[cls.name] = cls
    return cls


def get_architecture(name: str) -> type[DecoderNetwork]:
    """The decoder network registered as ``name`` (looking in the plugins' entry points if needed)."""
    return ARCHITECTURES.lookup(name)


def _single(tensor: torch.Tensor) -> torch.Tensor:
    """A (1, *shape) draw as a (*shape) view: a view, not indexing, so that the backward builds no
    zero-padded gradient."""
    return tensor.view(tensor.shape[1:])


@register_architecture
class MLPNetwork(DecoderNetwork):
    """d -> H (x depth) -> D, LeakyReLU(0.2) after every hidden layer (SPEC §1). ``model.hidden`` is H,
    ``model.depth`` the number of hidden layers."""

    name = "mlp"
    config_fields = frozenset({"hidden", "depth"})
    affine_output = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        sizes = [config.latent_dim] + [config.hidden] * config.depth + [config.data_dim]
        self.layer_sizes = list(zip(sizes[:-1], sizes[1:]))

    def tensors(self):
        return [(shape, fan_in) for fan_in, fan_out in self.layer_sizes
                for shape in ((fan_out, fan_in), (fan_out,))]

    def features(self, z, theta):
        if z.dim() == 2:
            z = z.unsqueeze(0)
        single = theta.values[0].shape[0] == 1
        # One theta for every z: plain matrix products on (S*B, .) rows (mm backward, no batching).
        h = z.reshape(-1, z.shape[-1]) if single else z
        for layer in range(len(self.layer_sizes) - 1):
            weight, bias = theta.values[2 * layer], theta.values[2 * layer + 1]
            if single:
                h = torch.addmm(_single(bias), h, _single(weight).T)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            # In place on the fresh product (one buffer less); its backward needs only the output.
            h = F.leaky_relu_(h, NEGATIVE_SLOPE)
        return h.view(*z.shape[:-1], -1) if single else h


@register_architecture
class ConvNetwork(DecoderNetwork):
    """A linear layer from z to a (C 2^(L-1)) x s x s feature map (s = side / 2^L), then L transposed
    convolutions (kernel 4, stride 2, padding 1: each doubles the side) halving the channels down to C
    and then to the image's one channel, LeakyReLU(0.2) after every layer but the last. C is
    ``model.channels``, L is ``model.depth``; the images must be square with a side divisible by 2^L.
    On 28 x 28 images with C = 32, L = 2: z -> 64 x 7 x 7 -> 32 x 14 x 14 -> 1 x 28 x 28.

    S draws of theta decode their S draws of z as one grouped convolution per layer (group s holds draw
    s's channels): the work of S separate decoders, without a Python loop."""

    name = "conv"
    config_fields = frozenset({"channels", "depth"})
    KERNEL, STRIDE, PADDING = 4, 2, 1

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.check(config)
        self.map_side = math.isqrt(config.data_dim) // 2 ** config.depth
        self.channels = [config.channels * 2 ** (config.depth - 1 - i) for i in range(config.depth)] + [1]

    @classmethod
    def check(cls, config):
        from .config import ConfigError

        side = math.isqrt(config.data_dim)
        if side * side != config.data_dim:
            raise ConfigError(f"model.architecture: the conv decoder needs square images, and data_dim "
                              f"{config.data_dim} is not a square")
        if config.depth < 1:
            raise ConfigError("model.depth: the conv decoder needs at least 1 transposed convolution, got 0")
        if side % 2 ** config.depth:
            raise ConfigError(f"model.depth: {config.depth} transposed convolutions need an image side divisible "
                              f"by {2 ** config.depth}, and the images are {side} x {side}")

    def tensors(self):
        k, d = self.KERNEL, self.config.latent_dim
        first = self.channels[0] * self.map_side ** 2
        out = [((first, d), d), ((first,), d)]
        for c_in, c_out in zip(self.channels[:-1], self.channels[1:]):
            # PyTorch's ConvTranspose2d takes its init bound from weight.size(1) * k * k = c_out * k^2.
            out += [((c_in, c_out, k, k), c_out * k * k), ((c_out,), c_out * k * k)]
        return out

    def decode(self, z, theta):
        draws = theta.num_samples
        if draws == 1:
            rows = z.reshape(-1, z.shape[-1])
            h = torch.addmm(_single(theta.values[1]), rows, _single(theta.values[0]).T)  # (R, F)
            lead = z.shape[:-1] if z.dim() > 2 else (1, z.shape[0])
        else:  # z (S, B, d) paired with the S draws
            if z.dim() == 2:
                z = z.unsqueeze(0).expand(draws, -1, -1)
            lead = z.shape[:-1]
            # (B, S, F): draw s's feature maps become channel group s
            h = torch.baddbmm(theta.values[1].unsqueeze(1), z, theta.values[0].transpose(1, 2)).transpose(0, 1)
        batch = h.shape[0]
        h = F.leaky_relu(h, NEGATIVE_SLOPE).reshape(batch, draws * self.channels[0], self.map_side, self.map_side)
        blocks = len(self.channels) - 1
        for block in range(blocks):
            weight, bias = theta.values[2 + 2 * block], theta.values[3 + 2 * block]
            h = F.conv_transpose2d(h, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1),
                                   stride=self.STRIDE, padding=self.PADDING, groups=draws)
            if block < blocks - 1:
                h = F.leaky_relu_(h, NEGATIVE_SLOPE)
        if draws == 1:
            return h.view(*lead, -1)
        return h.view(batch, draws, -1).transpose(0, 1)


class BayesianDecoder(nn.Module):
    """q(theta) = N(loc, diag exp(log_scale)^2) over every decoder weight and bias, and the network of
    ``config.architecture`` (:class:`DecoderNetwork`) that decodes with a draw of them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.network = get_architecture(config.architecture)(config)
        self.shapes: list[tuple[int, ...]] = []
        locs = []
        for shape, fan_in in self.network.tensors():
            loc = torch.empty(shape)
            if config.init_loc == "default":
                # PyTorch's layer init for both weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
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

    @property
    def affine_output(self) -> bool:
        """Whether the last layer is affine in :meth:`features` (the Gaussian likelihood then fuses them)."""
        return self.network.affine_output

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
        """The activations entering the last layer, for a network with an affine output: (S, B, H) for z
        (S, B, d) paired with S draws of theta (or (B, d), or S=1 theta broadcast over z's leading
        dimension)."""
        return self.network.features(z, theta)

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
        if not self.affine_output:
            out = self.network.decode(z, theta)
            return out if subtract is None else out - subtract
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
