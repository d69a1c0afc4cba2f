"""A variational family written outside the package: an encoder plus a free offset per image (AF-VI).

    mu_n        = f_mu(x_n)    + a_n
    log sigma_n = f_sigma(x_n) + b_n

The encoder shares statistical strength across images, as A-VI does; the per-image offsets (a_n, b_n),
started at 0, let each training image's q_n move off the encoder's output, so F-VI's optimum is
reachable and the amortization gap on the training images can close. On new images the offsets start
at 0 (the encoder's output) and test-time inference fits them with the encoder and q(theta) frozen.
It is the "amortized initialisation, then free factors" idea of semi-amortized inference, with the free
part kept for the whole of training instead of re-fitted at each step.

Used by ``examples/hybrid.toml`` (``plugins = ["hybrid_family.py"]``): the worker, gap and Ray processes
import this file from the path recorded in each run's config. Nothing inside ``src/`` names it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from amortized_bayes.config import ConfigError, FamilyConfig
from amortized_bayes.families import AmortizedFamily, VariationalFamily, register_family


@dataclass(frozen=True)
class EncoderPlusOffsetsConfig(FamilyConfig):
    """The encoder's ``width`` (k) and ``depth``; the fields of this family alone enter its run ids."""

    width: int = 64
    depth: int = 2

    def check(self) -> None:
        if not 1 <= self.width <= 65_536:
            raise ConfigError(f"family.width: must be between 1 and 65536, got {self.width}")
        if not 0 <= self.depth <= 64:
            raise ConfigError(f"family.depth: must be between 0 and 64, got {self.depth}")


@register_family
class EncoderPlusOffsets(VariationalFamily):
    """AF-VI: A-VI's encoder (same architecture) plus per-image offset tables a, b of shape (N, d)."""

    name = "encoder-plus-offsets"
    short_name, title = "afvi", "AF-VI"  # in run ids and in tables
    config_class = EncoderPlusOffsetsConfig
    amortized = False  # a new image needs its offsets fitted
    rank = 4

    @classmethod
    def short_id(cls, config):
        return f"{cls.short_name}-k{config.width}" + (f"-L{config.depth}" if config.depth != 2 else "")

    @classmethod
    def label(cls, config):
        return f"{cls.title} k={config.width}"

    @classmethod
    def from_config(cls, config, *, num_data, data_dim, latent_dim, sparse=False):
        return cls(AmortizedFamily(data_dim, latent_dim, config.width, config.depth), num_data, sparse)

    def __init__(self, encoder: AmortizedFamily, num_data: int, sparse: bool = False):
        super().__init__()
        self.encoder, self.sparse = encoder, sparse
        latent_dim = encoder.mean_head.out_features
        self.offset_mu = nn.Embedding(num_data, latent_dim, sparse=sparse)
        self.offset_log_sigma = nn.Embedding(num_data, latent_dim, sparse=sparse)
        with torch.no_grad():  # start on the encoder's output
            self.offset_mu.weight.zero_()
            self.offset_log_sigma.weight.zero_()

    @property
    def num_data(self) -> int:
        return int(self.offset_mu.weight.shape[0])

    def local_params(self, x, idx, refine=None):
        mu, log_sigma = self.encoder.encode(x)
        if idx is None:
            if x.shape[0] != self.num_data:
                raise ValueError(f"{self.name} has offsets for {self.num_data} images, got {x.shape[0]} "
                                 "images without indices")
            return mu + self.offset_mu.weight, log_sigma + self.offset_log_sigma.weight
        return mu + self.offset_mu(idx), log_sigma + self.offset_log_sigma(idx)

    def sparse_parameters(self):
        return [self.offset_mu.weight, self.offset_log_sigma.weight] if self.sparse else []

    def for_new_data(self, num_data):
        # The trained encoder, frozen, and fresh offsets: test-time inference fits only the offsets.
        encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        return EncoderPlusOffsets(encoder, num_data).to(self.offset_mu.weight.device)
