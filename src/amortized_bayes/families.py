"""Variational families for the local latents (SPEC §2), all behind one interface: the extension point.

Given a batch of images ``x`` (B, D) and their row indices ``idx`` (B,), a family returns the means and
log standard deviations of q_n(z_n), each (B, d). A new family is one class, registered with
:func:`register_family`, that says on itself everything the rest of the tool needs: its config class,
its short id and label, whether it has an encoder (``amortized``), whether it refines on the local ELBO,
and how it starts on new images. Nothing else changes; ``examples/hybrid_family.py`` is one written
outside the package. A module that registers families is found by worker, gap and Ray processes through
a grid file's ``plugins`` or an entry point (:mod:`amortized_bayes.plugins`).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import fields
from typing import ClassVar
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, EncoderConfig, FamilyConfig, FreeFactorConfig, ModelConfig, SemiAmortizedConfig
from .plugins import Registry

# (x (B, D), mu (B, d), log_sigma (B, d)) -> per-datapoint local ELBO (B,) with theta held fixed.
LocalELBO = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FAMILIES: Registry[type[VariationalFamily]] = Registry("family", "family.name")


def register_family(cls: type[VariationalFamily]) -> type[VariationalFamily]:
    """Class decorator: make ``cls`` available under ``cls.name`` in configs. The name becomes part of
    run ids, so it must be a safe folder-name fragment (letters, digits, '-', '_', '.')."""
    from .config import check_safe_name

    check_safe_name(cls.name, f"family name of {cls.__name__}")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, FamilyConfig)):
        raise TypeError(f"{cls.__name__}.config_class must be a FamilyConfig subclass")
    if cls.name in FAMILIES and FAMILIES[cls.name].__qualname__ != cls.__qualname__:
        raise ValueError(f"family {cls.name!r} is already registered by {FAMILIES[cls.name].__qualname__}")
    FAMILIES[cls.name] = cls
    return cls


def get_family(name: str) -> type[VariationalFamily]:
    """The family registered as ``name``, looking in the plugins' entry points when it is not (yet)."""
    return FAMILIES.lookup(name)


def registered_families() -> dict[str, type[VariationalFamily]]:
    """Every family: the built-in ones and those of the plugins' entry points."""
    return FAMILIES.everything()


def family_field_names() -> set[str]:
    """The config fields of every registered family (``family.<field>`` keys a grid may set)."""
    return {f.name for cls in registered_families().values() for f in fields(cls.config_class)}


class VariationalFamily(nn.Module, ABC):
    """The local factor q_n(z_n) = N(mu_n, diag sigma_n^2).

    Class attributes, read by the rest of the tool:

    - ``name``: the family's name in configs (``family.name``);
    - ``config_class``: its config dataclass (a :class:`~amortized_bayes.config.FamilyConfig` subclass
      with only the fields it uses: they alone enter the run id);
    - ``amortized``: new images are mapped without optimisation (an encoder). A family that is not
      provides :meth:`for_new_data`, a fresh family for M new images that test-time inference fits with
      q(theta) frozen (every parameter of that family that requires a gradient is fitted);
    - ``refines_locally``: :meth:`local_params` improves its output on the local ELBO it is given as
      ``refine`` (the trainer, the evaluation and test-time inference then pass one);
    - ``rank``: where its rows go in tables (A-VI 0, SA-VI 1, F-VI 2, constant-VI 3).

    and :meth:`short_id` (in run ids) and :meth:`label` (in tables and figures) of a config.
    """

    name: ClassVar[str]
    short_name: ClassVar[str]  # in run ids ("avi"); the name unless the class sets it
    title: ClassVar[str]  # in tables ("A-VI"); the name unless the class sets it
    config_class: ClassVar[type[FamilyConfig]] = FamilyConfig
    amortized: ClassVar[bool]
    refines_locally: ClassVar[bool] = False
    rank: ClassVar[int] = 5

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            # A subclass registered under a new name must not pass for its parent in ids and tables.
            for attribute in ("short_name", "title"):
                if attribute not in cls.__dict__:
                    setattr(cls, attribute, cls.name)

    @classmethod
    def short_id(cls, config: FamilyConfig) -> str:
        """The family's part of a run id: ``avi-k64``, ``fvi``."""
        return cls.short_name

    @classmethod
    def label(cls, config: FamilyConfig) -> str:
        """The family's name in tables, figures and verdicts: ``A-VI k=64``, ``F-VI``."""
        return cls.title

    @classmethod
    def encoder_width(cls, config: FamilyConfig) -> int | None:
        """Units per hidden layer of the encoder, or None for a family without one."""
        return getattr(config, "width", None)

    @classmethod
    def check_model(cls, config: FamilyConfig, model: ModelConfig) -> None:
        """Refuse, with a :class:`~amortized_bayes.config.ConfigError`, a family config that cannot work
        with this decoder's config (images its encoder cannot read, say). Called by ``RunConfig``."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: FamilyConfig, *, num_data: int, data_dim: int, latent_dim: int,
                    sparse: bool = False) -> VariationalFamily:
        """Build from a config. ``sparse``: per-datapoint parameters get sparse gradients (lazy updates)."""

    @abstractmethod
    def local_params(self, x: torch.Tensor, idx: torch.Tensor | None,
                     refine: LocalELBO | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log standard deviations of q_n for the batch, each (B, d). ``idx`` None means the
        rows 0..B-1. ``refine``, when given, is the local ELBO a family may improve its output on."""

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (rows of datapoints in the batch only)."""
        return []

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def for_new_data(self, num_data: int) -> VariationalFamily:
        """A family for ``num_data`` new images (amortized families map them as they are)."""
        if self.amortized:
            return self
        raise NotImplementedError(f"{type(self).__name__} must define for_new_data")


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with LeakyReLU(0.2) between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def conv_encoder(side: int, width: int, depth: int) -> nn.Sequential:
    """(B, side * side) images -> (B, width * (side / 2^depth)^2) features: ``depth`` convolutions of
    ``width`` channels (kernel 4, stride 2, padding 1: each halves the side), LeakyReLU(0.2) between them
    (the encoder applies the last one)."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    for block in range(depth):
        if block > 0:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(1 if block == 0 else width, width, kernel_size=4, stride=2, padding=1))
    layers.append(nn.Flatten(1))
    return nn.Sequential(*layers)


@register_family
class AmortizedFamily(VariationalFamily):
    """A-VI: an encoder, MLP D -> k (x depth) or ``depth`` strided convolutions of k channels, with
    LeakyReLU(0.2), and linear mean and log-sd heads. An MLP of ``depth`` 0 makes both heads linear in x."""

    name = "amortized"
    short_name, title = "avi", "A-VI"
    config_class = EncoderConfig
    amortized = True
    rank = 0

    @classmethod
    def short_id(cls, config):
        return (f"{cls.short_name}-k{config.width}" + (f"-L{config.depth}" if config.depth != 2 else "")
                + ("-conv" if config.architecture == "conv" else ""))

    @classmethod
    def label(cls, config):
        return f"{cls.title} k={config.width}{cls._label_details(config)}"

    @classmethod
    def _label_details(cls, config) -> str:
        """What a label adds after the width: the depth when not 2, then anything a subclass adds, then
        the encoder's architecture when not an MLP."""
        return ((f" L={config.depth}" if config.depth != 2 else "") + cls._label_extra(config)
                + (" conv" if config.architecture == "conv" else ""))

    @classmethod
    def _label_extra(cls, config) -> str:
        return ""

    @classmethod
    def check_model(cls, config, model):
        if config.architecture != "conv":
            return
        side = math.isqrt(model.data_dim)
        if side * side != model.data_dim:
            raise ConfigError(f"family.architecture: the conv encoder needs square images, and model.data_dim "
                              f"{model.data_dim} is not a square")
        if config.depth < 1 or side % 2 ** config.depth:
            raise ConfigError(f"family.depth: the conv encoder needs 1 or more convolutions and an image side "
                              f"divisible by 2^depth; got depth {config.depth} for {side} x {side} images")

    def __init__(self, data_dim: int, latent_dim: int, width: int, depth: int, architecture: str = "mlp"):
        super().__init__()
        self.width, self.depth = width, depth
        self.trunk: nn.Module
        if architecture == "conv":
            side = math.isqrt(data_dim)
            self.trunk = conv_encoder(side, width, depth)
            features = width * (side // 2 ** depth) ** 2
        else:
            self.trunk = mlp([data_dim] + [width] * depth) if depth > 0 else nn.Identity()
            features = width if depth > 0 else data_dim
        self.mean_head = nn.Linear(features, latent_dim)
        self.log_sigma_head = nn.Linear(features, latent_dim)

    @classmethod
    def from_config(cls, config, *, num_data, data_dim, latent_dim, sparse=False):
        return cls(data_dim, latent_dim, config.width, config.depth, config.architecture)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        if self.depth > 0:
            h = F.leaky_relu(h, 0.2)
        return self.mean_head(h), self.log_sigma_head(h)

    def local_params(self, x, idx, refine=None):
        return self.encode(x)


@register_family
class SemiAmortizedFamily(AmortizedFamily):
    """SA-VI (Kim et al. 2018): the encoder's output refined by K gradient-ascent steps of size ``lr``
    on each datapoint's local ELBO (theta at its posterior mean). With ``backprop`` the encoder is
    trained through the unrolled steps; without, the refined output passes the gradient straight to
    the encoder's output (no second-order terms). Each image's step direction is clipped to norm
    ``max_norm`` (0: none)."""

    name = "semi-amortized"
    short_name, title = "savi", "SA-VI"
    config_class = SemiAmortizedConfig
    refines_locally = True
    rank = 1

    @classmethod
    def short_id(cls, config):
        return f"{super().short_id(config)}-K{config.refine_steps}"

    @classmethod
    def _label_extra(cls, config):
        return f" K={config.refine_steps}"

    def __init__(self, data_dim, latent_dim, width, depth, steps: int, lr: float, backprop: bool,
                 max_norm: float = 0.0, architecture: str = "mlp"):
        super().__init__(data_dim, latent_dim, width, depth, architecture)
        self.steps, self.lr, self.backprop, self.max_norm = steps, lr, backprop, max_norm

    @classmethod
    def from_config(cls, config, *, num_data, data_dim, latent_dim, sparse=False):
        return cls(data_dim, latent_dim, config.width, config.depth, config.refine_steps, config.refine_lr,
                   config.refine_backprop, config.refine_max_norm, config.architecture)

    def local_params(self, x, idx, refine=None):
        mu0, log_sigma0 = self.encode(x)
        if refine is None or self.steps == 0:
            return mu0, log_sigma0
        keep_graph = self.backprop and torch.is_grad_enabled()
        with torch.enable_grad():
            if keep_graph:
                mu, log_sigma = mu0, log_sigma0
            else:
                mu = mu0.detach().requires_grad_(True)
                log_sigma = log_sigma0.detach().requires_grad_(True)
            for _ in range(self.steps):
                elbo = refine(x, mu, log_sigma).sum()
                g_mu, g_ls = torch.autograd.grad(elbo, (mu, log_sigma), create_graph=keep_graph)
                if self.max_norm > 0:
                    norm = torch.sqrt((g_mu * g_mu).sum(-1, keepdim=True) + (g_ls * g_ls).sum(-1, keepdim=True))
                    scale = torch.clamp(self.max_norm / (norm + 1e-12), max=1.0)
                    g_mu, g_ls = g_mu * scale, g_ls * scale
                mu, log_sigma = mu + self.lr * g_mu, log_sigma + self.lr * g_ls
        if keep_graph:
            return mu, log_sigma
        # Straight-through: the refined values, with the gradient passed to the encoder's output.
        return mu0 + (mu - mu0).detach(), log_sigma0 + (log_sigma - log_sigma0).detach()


def _free_factor_start(shape: tuple[int, ...], loc_sd: float, log_scale: float, log_scale_sd: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting means and log sigmas of free factors, each of ``shape``: N(0, loc_sd^2) and
    N(log_scale, log_scale_sd^2) elementwise, from the global generator (the trainer seeds it before it
    builds the model); a spread of 0 gives the constant and draws nothing."""
    loc = torch.randn(shape) * loc_sd if loc_sd > 0 else torch.zeros(shape)
    log_sigma = (torch.randn(shape) * log_scale_sd + log_scale if log_scale_sd > 0
                 else torch.full(shape, float(log_scale)))
    return loc, log_sigma


@register_family
class FactorizedFamily(VariationalFamily):
    """F-VI: free (mu_n, log sigma_n) for every datapoint, stored as (N, d) tables. With ``sparse`` the
    tables get sparse gradients, so a lazy optimiser moves only the rows of the batch.

    Training starts each row at mean ~ N(0, ``init_loc_sd``^2) and log sigma ~ N(``init_log_scale``,
    ``init_log_scale_sd``^2); a family for new images (:meth:`for_new_data`, which test-time inference
    fits) starts every row at the centre of that distribution (mean 0, log sigma ``init_log_scale``),
    so that test-time inference draws no random numbers."""

    name = "factorized"
    short_name, title = "fvi", "F-VI"
    config_class = FreeFactorConfig
    amortized = False
    rank = 2

    def __init__(self, num_data: int, latent_dim: int, init_log_scale: float = 0.0, sparse: bool = False,
                 init_loc_sd: float = 0.0, init_log_scale_sd: float = 0.0):
        super().__init__()
        self.init_log_scale, self.sparse = init_log_scale, sparse
        self.loc = nn.Embedding(num_data, latent_dim, sparse=sparse)
        self.log_sigma = nn.Embedding(num_data, latent_dim, sparse=sparse)
        loc, log_sigma = _free_factor_start((num_data, latent_dim), init_loc_sd, init_log_scale, init_log_scale_sd)
        with torch.no_grad():
            self.loc.weight.copy_(loc)
            self.log_sigma.weight.copy_(log_sigma)

    @classmethod
    def from_config(cls, config, *, num_data, data_dim, latent_dim, sparse=False):
        return cls(num_data, latent_dim, config.init_log_scale, sparse, config.init_loc_sd, config.init_log_scale_sd)

    @property
    def num_data(self) -> int:
        return int(self.loc.weight.shape[0])

    def local_params(self, x, idx, refine=None):
        if idx is None:
            if x.shape[0] != self.num_data:
                raise ValueError(f"factorized family has {self.num_data} factors, got {x.shape[0]} images "
                                 "without indices")
            return self.loc.weight, self.log_sigma.weight
        return self.loc(idx), self.log_sigma(idx)

    def sparse_parameters(self):
        return [self.loc.weight, self.log_sigma.weight] if self.sparse else []

    def for_new_data(self, num_data):
        return FactorizedFamily(num_data, self.loc.weight.shape[1], self.init_log_scale).to(self.loc.weight.device)


@register_family
class ConstantFamily(VariationalFamily):
    """Constant-VI: one (mu, log sigma) shared by every datapoint, started at mean ~ N(0,
    ``init_loc_sd``^2) and log sigma ~ N(``init_log_scale``, ``init_log_scale_sd``^2) per dimension."""

    name = "constant"
    short_name, title = "const", "constant-VI"
    config_class = FreeFactorConfig
    amortized = False
    rank = 3

    def __init__(self, latent_dim: int, init_log_scale: float = 0.0, init_loc_sd: float = 0.0,
                 init_log_scale_sd: float = 0.0):
        super().__init__()
        loc, log_sigma = _free_factor_start((latent_dim,), init_loc_sd, init_log_scale, init_log_scale_sd)
        self.loc = nn.Parameter(loc)
        self.log_sigma = nn.Parameter(log_sigma)

    @classmethod
    def from_config(cls, config, *, num_data, data_dim, latent_dim, sparse=False):
        return cls(latent_dim, config.init_log_scale, config.init_loc_sd, config.init_log_scale_sd)

    def local_params(self, x, idx, refine=None):
        b = x.shape[0]
        return self.loc.expand(b, -1), self.log_sigma.expand(b, -1)

    def for_new_data(self, num_data):
        # New images share one factor too; start it from the trained one.
        return copy.deepcopy(self)


def build_family(config: FamilyConfig, *, num_data: int, data_dim: int, latent_dim: int,
                 sparse: bool = False) -> VariationalFamily:
    return get_family(config.name).from_config(config, num_data=num_data, data_dim=data_dim,
                                              latent_dim=latent_dim, sparse=sparse)
