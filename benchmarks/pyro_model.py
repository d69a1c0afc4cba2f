"""The same Bayesian VAE written idiomatically in Pyro, as a user of Pyro would write it: the peer
implementation for ``benchmarks/speed.py``. Needs the ``bench`` extra (``pip install pyro-ppl``); the
tool itself never imports Pyro.

Model: z_n ~ N(0, I_d); theta: every weight and bias of the decoder MLP d -> H (x depth) -> D
(LeakyReLU 0.2), or of the convolutional decoder (a linear layer to a feature map, then transposed
convolutions; ``ConvDecoder``), with prior N(0, prior_scale^2), declared with ``PyroSample`` on a
``PyroModule``; x_n ~ N(decoder(z_n), obs_var I). Guide: ``AutoNormal`` for theta (mean-field Gaussian)
and, for z, a hand-written local guide: an encoder network (A-VI; MLP or convolutional), one free
Gaussian per datapoint (F-VI), or one shared Gaussian (constant-VI). Subsampling through
``pyro.plate(..., subsample=idx)``, so the likelihood and z terms are scaled by N/B as in the tool's
``local_terms="batch"``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn
from torch.distributions import constraints


class Decoder(PyroModule):
    def __init__(self, sizes: list[int], prior_scale: float):
        super().__init__()
        self.layers = PyroModule[nn.ModuleList]([PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        for layer, (a, b) in zip(self.layers, zip(sizes[:-1], sizes[1:])):
            layer.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([b, a]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([b]).to_event(1))

    def forward(self, z):
        h = z
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = nn.functional.leaky_relu(h, 0.2)
            h = layer(h)
        return h


class ConvDecoder(PyroModule):
    """Linear d -> (C 2^(L-1)) x s x s, then L transposed convolutions (kernel 4, stride 2, padding 1)
    halving the channels down to C and then to 1, LeakyReLU(0.2) between layers: the tool's "conv"."""

    def __init__(self, latent_dim: int, channels: int, depth: int, side: int, prior_scale: float):
        super().__init__()
        widths = [channels * 2 ** (depth - 1 - i) for i in range(depth)] + [1]
        self.map_shape = (widths[0], side // 2**depth, side // 2**depth)
        layers = [PyroModule[nn.Linear](latent_dim, math.prod(self.map_shape))]
        layers += [PyroModule[nn.ConvTranspose2d](a, b, 4, stride=2, padding=1)
                   for a, b in zip(widths[:-1], widths[1:])]
        self.layers = PyroModule[nn.ModuleList](layers)
        for layer in self.layers:
            prior = dist.Normal(0.0, prior_scale).expand(layer.weight.shape)
            layer.weight = PyroSample(prior.to_event(layer.weight.dim()))
            layer.bias = PyroSample(dist.Normal(0.0, prior_scale).expand(layer.bias.shape).to_event(1))

    def forward(self, z):
        h = self.layers[0](z).view(-1, *self.map_shape)
        for layer in self.layers[1:]:
            h = layer(nn.functional.leaky_relu(h, 0.2))
        return h.flatten(1)


class BayesianVAE(PyroModule):
    def __init__(self, num_data: int, latent_dim: int = 64, hidden: int = 256, depth: int = 2, data_dim: int = 784,
                 obs_var: float = 1.0, prior_scale: float = 1.0, name: str = "", architecture: str = "mlp",
                 channels: int = 32):
        # ``name`` prefixes every site and parameter: Pyro's parameter store is global, so models that
        # live side by side in one process need distinct names.
        super().__init__(name)
        self.num_data, self.latent_dim, self.obs_sd = num_data, latent_dim, math.sqrt(obs_var)
        self.data_dim = data_dim
        if architecture == "conv":
            self.decoder = ConvDecoder(latent_dim, channels, depth, math.isqrt(data_dim), prior_scale)
        else:
            self.decoder = Decoder([latent_dim] + [hidden] * depth + [data_dim], prior_scale)

    def forward(self, x, idx):
        data = pyro.plate("data", self.num_data, subsample=idx)
        with data:
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
        loc = self.decoder(z)  # theta is global: sampled outside the data plate
        with data:
            pyro.sample("x", dist.Normal(loc, self.obs_sd).to_event(1), obs=x)


class EncoderGuide(PyroModule):
    """A-VI: an encoder trunk, LeakyReLU(0.2), linear mean and log-sd heads; the layer names are the
    tool's, so that its parameters can be copied across. The trunk is an MLP D -> k (x depth) or, with
    ``conv``, ``depth`` convolutions of k channels (kernel 4, stride 2, padding 1)."""

    def __init__(self, num_data: int, data_dim: int, latent_dim: int, width: int, depth: int = 2,
                 conv: bool = False):
        super().__init__()
        self.num_data = num_data
        if conv:
            side = math.isqrt(data_dim)
            layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
            for i in range(depth):
                layers += [nn.LeakyReLU(0.2)] if i > 0 else []
                layers.append(nn.Conv2d(1 if i == 0 else width, width, 4, stride=2, padding=1))
            layers.append(nn.Flatten(1))
            features = width * (side // 2**depth) ** 2
        else:
            layers = []
            for i, (a, b) in enumerate(zip([data_dim] + [width] * (depth - 1), [width] * depth)):
                layers += [nn.LeakyReLU(0.2)] if i > 0 else []
                layers.append(nn.Linear(a, b))
            features = width
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Linear(features, latent_dim)
        self.log_sigma_head = nn.Linear(features, latent_dim)

    def forward(self, x, idx):
        h = nn.functional.leaky_relu(self.trunk(x), 0.2)
        with pyro.plate("data", self.num_data, subsample=idx):
            pyro.sample("z", dist.Normal(self.mean_head(h), self.log_sigma_head(h).exp()).to_event(1))


class FactorGuide(PyroModule):
    """F-VI: a free Gaussian per datapoint (N, d)."""

    def __init__(self, num_data: int, latent_dim: int):
        super().__init__()
        self.num_data = num_data
        self.loc = PyroParam(torch.zeros(num_data, latent_dim))
        self.scale = PyroParam(torch.ones(num_data, latent_dim), constraint=constraints.positive)

    def forward(self, x, idx):
        with pyro.plate("data", self.num_data, subsample=idx):
            pyro.sample("z", dist.Normal(self.loc[idx], self.scale[idx]).to_event(1))


class ConstantGuide(PyroModule):
    """constant-VI: one Gaussian shared by every datapoint."""

    def __init__(self, num_data: int, latent_dim: int):
        super().__init__()
        self.num_data = num_data
        self.loc = PyroParam(torch.zeros(latent_dim))
        self.scale = PyroParam(torch.ones(latent_dim), constraint=constraints.positive)

    def forward(self, x, idx):
        with pyro.plate("data", self.num_data, subsample=idx) as rows:
            shape = (len(rows), self.loc.shape[0])
            pyro.sample("z", dist.Normal(self.loc.expand(shape), self.scale.expand(shape)).to_event(1))


class Guide(PyroModule):
    """AutoNormal over theta (on the model with only the decoder's sites exposed) followed by the
    family's hand-written local guide for z."""

    def __init__(self, model: BayesianVAE, local: PyroModule, init_scale: float):
        super().__init__(model._pyro_name + "guide" if model._pyro_name else "")
        prefix = model._pyro_name + "." if model._pyro_name else ""
        theta_only = poutine.block(model, expose_fn=lambda msg: msg["name"].startswith(prefix + "decoder."))
        self.theta = AutoNormal(theta_only, init_scale=init_scale)
        self.local = local

    def forward(self, x, idx):
        self.theta(x, idx)
        self.local(x, idx)


def make_guide(model: BayesianVAE, family: str, width: int = 64, init_scale: float = math.exp(-2.0),
               encoder: str = "mlp") -> Guide:
    n, d = model.num_data, model.latent_dim
    if family == "amortized":
        local = EncoderGuide(n, model.data_dim, d, width, conv=encoder == "conv")
    elif family == "factorized":
        local = FactorGuide(n, d)
    elif family == "constant":
        local = ConstantGuide(n, d)
    else:
        raise ValueError(f"no Pyro guide for family {family!r}")
    return Guide(model, local, init_scale)


def make_svi(model, guide, lr: float = 1e-3) -> SVI:
    return SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())


def copy_into_tool(guide, family, tool_model, tool_family) -> None:
    """Set the tool's q(theta) and local family to the Pyro guide's current values (same parameters,
    so both implementations compute the same ELBO)."""
    auto, local = guide.theta, guide.local
    n_layers = len(tool_model.loc) // 2
    with torch.no_grad():
        for layer in range(n_layers):
            for j, kind in enumerate(("weight", "bias")):
                prefix = guide._pyro_name[: -len("guide")] + "." if guide._pyro_name else ""
                loc, scale = auto._get_loc_and_scale(f"{prefix}decoder.layers.{layer}.{kind}")
                tool_model.loc[2 * layer + j].copy_(loc.reshape(tool_model.loc[2 * layer + j].shape))
                tool_model.log_scale[2 * layer + j].copy_(scale.log().reshape(tool_model.loc[2 * layer + j].shape))
        if family == "amortized":
            tool_family.load_state_dict({k: v.detach() for k, v in local.state_dict().items()})
        elif family == "factorized":
            tool_family.loc.weight.copy_(local.loc)
            tool_family.log_sigma.weight.copy_(local.scale.log())
        elif family == "constant":
            tool_family.loc.copy_(local.loc)
            tool_family.log_sigma.copy_(local.scale.log())
