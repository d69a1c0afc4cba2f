"""Frozen configuration dataclasses: everything that defines a run, and nothing else.

A run is ``RunConfig(data, model, family, objective, train)``. Every field has the default of
SPEC §1-§4; validation happens in ``__post_init__`` so an invalid config is refused before anything
runs, with the field and the reason.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the reason."""


def _check(condition: bool, name: str, reason: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {reason}")


def _one_of(value: Any, allowed: tuple, name: str) -> None:
    _check(value in allowed, name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


# Run ids and grid names become folder names: letters, digits and . _ + - only, not starting with a
# dot, at most 100 characters (no separator, no '..', nothing a shell or a file system reads specially).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def check_safe_name(value: str, name: str) -> str:
    _check(isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None and ".." not in value, name,
           f"must be 1-100 letters, digits, '.', '_', '+' or '-', not starting with '.' and without '..'; "
           f"got {value!r}")
    return value


def _check_type(value: Any, hint: Any, name: str) -> None:
    """Refuse ``value`` unless it has the type the field declares: bool, int (not bool), a finite float
    (an int is accepted), str, a Literal's values, Optional[...] (None), or a nested config."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        _one_of(value, typing.get_args(hint), name)
        return
    if origin is Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:  # valid when any alternative accepts it
            try:
                _check_type(value, option, name)
                return
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[1])
        raise ConfigError(f"{name}: {' or '.join(errors)}")
    if hint is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
    elif hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"must be a number, got {value!r}")
        _check(math.isfinite(value), name, f"must be finite, got {value!r}")
    elif hint is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
    elif isinstance(hint, type) and is_dataclass(hint):
        _check(isinstance(value, hint), name, f"must be a table of {hint.__name__} fields, got {value!r}")
    elif origin is tuple:  # tuple[X, ...]
        _check(isinstance(value, tuple), name, f"must be a list, got {value!r}")
        for i, item in enumerate(value):
            _check_type(item, typing.get_args(hint)[0], f"{name}[{i}]")


def _check_types(instance: Any, prefix: str) -> None:
    """Every field of a config dataclass against its annotation (see :func:`_check_type`)."""
    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):
        _check_type(getattr(instance, f.name), hints[f.name], f"{prefix}.{f.name}")


def _in_range(value, low, high, name: str) -> None:
    _check(low <= value <= high, name, f"must be between {low} and {high}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which images: ``n_train`` rows of the training split (first or a seeded random subset) and the
    first ``n_test`` of the test split (None: the whole split).

    ``dataset``: ``mnist``, ``fashion-mnist`` (or an alias), or ``file:PATH`` for a user's ``.npz`` of
    ``train`` and ``test`` images (see :mod:`amortized_bayes.data.user_dataset`); for a file, the path is
    made absolute and ``file_sha256`` and ``image_height``/``image_width`` are read from it when not
    given (a stored config keeps the values it was planned with), so the run id follows the contents."""

    dataset: str = "mnist"
    n_train: Optional[int] = 1000
    subset: Literal["first", "random"] = "first"
    subset_seed: int = 0
    n_test: Optional[int] = 1000
    binarize: Literal["none", "threshold", "stochastic"] = "none"
    binarize_seed: int = 0
    file_sha256: Optional[str] = None
    image_height: Optional[int] = None
    image_width: Optional[int] = None

    def __post_init__(self):
        from .data.registry import ALIASES, DATASETS
        from .data import user_dataset

        _check_types(self, "data")
        if user_dataset.is_file_dataset(self.dataset.strip()):
            self._file_dataset()
        else:
            key = self.dataset.strip().lower()
            key = ALIASES.get(key, key)
            _check(key in DATASETS, "data.dataset",
                   f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}, or file:PATH.npz")
            # One spelling per dataset, so that aliases and case cannot make two run ids for the same data.
            object.__setattr__(self, "dataset", key)
            for name in ("file_sha256", "image_height", "image_width"):
                _check(getattr(self, name) is None, f"data.{name}", f"only for a file: dataset, not {key}")
            _check(self.n_train is None or 1 <= self.n_train <= 60_000, "data.n_train",
                   f"must be between 1 and 60000 (the training split's size), got {self.n_train}")
            _check(self.n_test is None or 0 <= self.n_test <= 10_000, "data.n_test",
                   f"must be between 0 and 10000 (the test split's size), got {self.n_test}")
        _in_range(self.subset_seed, 0, 2**32 - 1, "data.subset_seed")
        _in_range(self.binarize_seed, 0, 2**63 - 1, "data.binarize_seed")

    def _file_dataset(self) -> None:
        from .data import user_dataset

        try:
            name = user_dataset.normalise(self.dataset.strip())
        except user_dataset.UserDatasetError as exc:
            raise ConfigError(f"data.dataset: {exc}") from None
        object.__setattr__(self, "dataset", name)
        if self.file_sha256 is None:
            try:
                info = user_dataset.inspect(name)
            except user_dataset.UserDatasetError as exc:
                raise ConfigError(f"data.dataset: {exc}") from None
            object.__setattr__(self, "file_sha256", info.sha256)
            object.__setattr__(self, "image_height", info.shape[0])
            object.__setattr__(self, "image_width", info.shape[1])
            sizes = info.sizes
        else:
            _check(re.fullmatch(r"[0-9a-f]{64}", self.file_sha256) is not None, "data.file_sha256",
                   f"must be 64 lowercase hex digits, got {self.file_sha256!r}")
            _check(self.image_height is not None and self.image_width is not None, "data.image_height",
                   "a file dataset with a recorded SHA-256 needs its image_height and image_width")
            sizes = {"train": 10**8, "test": 10**8}
        for name in ("image_height", "image_width"):
            _in_range(getattr(self, name), 1, 4096, f"data.{name}")
        _check(self.n_train is None or 1 <= self.n_train <= sizes["train"], "data.n_train",
               f"must be between 1 and {sizes['train']} (the file's training images), got {self.n_train}")
        _check(self.n_test is None or 0 <= self.n_test <= sizes["test"], "data.n_test",
               f"must be between 0 and {sizes['test']} (the file's test images), got {self.n_test}")

    @property
    def is_file(self) -> bool:
        return self.file_sha256 is not None

    @property
    def label(self) -> str:
        """The dataset's short name in run ids, tables and figures (``file-<stem>`` for a file)."""
        from .data import user_dataset

        return user_dataset.label(self.dataset) if self.is_file else self.dataset

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of one image: the file's, or 28 x 28 for MNIST and Fashion-MNIST."""
        if self.image_height is None or self.image_width is None:
            return (28, 28)
        return (self.image_height, self.image_width)


@dataclass(frozen=True)
class ModelConfig:
    """The Bayesian decoder (SPEC §1): d -> H x depth -> D, LeakyReLU(0.2), prior N(0, prior_scale^2 I)
    on every weight and bias, q(theta) = N(m, diag s^2) with log s initialised at ``init_log_scale``.

    ``architecture``: a registered decoder network (:mod:`amortized_bayes.model`): "mlp" (``hidden``
    units in each of ``depth`` hidden layers) or "conv" (a linear layer to a feature map, then ``depth``
    transposed convolutions from ``channels`` x 2^(depth-1) channels down to ``channels`` and the image;
    square images only). A shape field the architecture does not read does not enter the run id.

    ``obs_var`` is sigma_x^2 of the Gaussian likelihood (ignored for ``bernoulli``), or "learned": one
    scalar fitted as a point estimate (type-II maximum likelihood) inside the same objective, from 1, and
    recorded at each evaluation.
    ``init_loc``: "default" (PyTorch's Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))) or "zero".
    """

    latent_dim: int = 64
    hidden: int = 256
    depth: int = 2
    data_dim: int = 784
    architecture: str = "mlp"  # a registered decoder network (model.py): mlp, conv
    channels: int = 32
    prior_scale: float = 1.0
    likelihood: str = "gaussian"  # a registered likelihood (likelihoods.py): gaussian, bernoulli
    obs_var: Union[float, Literal["learned"]] = 1.0
    init_loc: Literal["default", "zero"] = "default"
    init_log_scale: float = -2.0

    def __post_init__(self):
        from .likelihoods import get_likelihood
        from .model import get_architecture

        _check_types(self, "model")
        get_likelihood(self.likelihood)  # a plugin's likelihood is found through its entry point
        # Upper bounds keep a typo from allocating terabytes: far above any model this tool trains.
        _in_range(self.latent_dim, 1, 4096, "model.latent_dim")
        _in_range(self.hidden, 1, 65_536, "model.hidden")
        _in_range(self.depth, 0, 64, "model.depth")
        _in_range(self.data_dim, 1, 1_000_000, "model.data_dim")
        _check(self.prior_scale > 0, "model.prior_scale", f"must be > 0, got {self.prior_scale}")
        _check(self.obs_var == "learned" or self.obs_var > 0, "model.obs_var",
               f"must be > 0 or 'learned', got {self.obs_var}")
        _in_range(self.init_log_scale, -100.0, 20.0, "model.init_log_scale")
        _in_range(self.channels, 1, 4096, "model.channels")
        get_architecture(self.architecture).check(self)


@dataclass(frozen=True)
class FamilyConfig:
    """The local variational family (SPEC §2): the base of every family's config, which holds only the
    fields that family uses. ``name`` picks the family; build a config with :func:`family_config`
    (``family_config("factorized", init_log_scale=-1.0)``), which returns the family's own class.

    A family registers its config class as ``config_class`` (see
    :func:`amortized_bayes.families.register_family`); a subclass validates its own fields in
    :meth:`check`."""

    name: str = "amortized"

    def __post_init__(self):
        from .families import get_family

        _check_types(self, "family")
        family = get_family(self.name)
        _check(type(self) is family.config_class, "family",
               f"the {self.name} family takes a {family.config_class.__name__}, got a {type(self).__name__} "
               "(build it with family_config)")
        self.check()

    def check(self) -> None:
        """Refuse out-of-range values with a :class:`ConfigError` (types are already checked)."""


@dataclass(frozen=True)
class EncoderConfig(FamilyConfig):
    """A-VI's encoder: ``architecture`` "mlp" (``width`` units, k, in each of ``depth`` hidden layers) or
    "conv" (``depth`` strided convolutions of ``width`` channels each; square images only)."""

    width: int = 64
    depth: int = 2
    architecture: Literal["mlp", "conv"] = "mlp"

    def check(self) -> None:
        _in_range(self.width, 1, 65_536, "family.width")
        _in_range(self.depth, 0, 64, "family.depth")


@dataclass(frozen=True)
class SemiAmortizedConfig(EncoderConfig):
    """SA-VI: the encoder's, and ``refine_*``: the K refinement steps, their step size, whether
    gradients flow back through them into the encoder, and the clipping of each image's step."""

    refine_steps: int = 5
    # 0.1: on MNIST (sigma_x^2 = 1, d = 64, H = 256) five steps of 0.1 raise the local ELBO of a
    # partly trained A-VI by ~30 nats per image, and steps diverged only at 1.0 (measured).
    refine_lr: float = 0.1
    refine_backprop: bool = True
    # Each image's local gradient (mu and log sigma together) is rescaled to at most this norm before a
    # refinement step (0: no clipping), as SA-VAE does: with a Bernoulli likelihood an unclipped step of
    # 0.03 already sent log sigma to infinity within 100 epochs on the quick preset (measured).
    refine_max_norm: float = 5.0

    def check(self) -> None:
        super().check()
        _in_range(self.refine_steps, 0, 10_000, "family.refine_steps")
        _check(self.refine_lr > 0, "family.refine_lr", f"must be > 0, got {self.refine_lr}")
        _check(self.refine_max_norm >= 0, "family.refine_max_norm", f"must be >= 0, got {self.refine_max_norm}")


@dataclass(frozen=True)
class FreeFactorConfig(FamilyConfig):
    """Free factors (F-VI, constant-VI) start at mean ~ N(0, ``init_loc_sd``^2) and
    log sigma ~ N(``init_log_scale``, ``init_log_scale_sd``^2), drawn independently for every image and
    dimension; with both spreads 0 (the default) every factor starts at mean 0 and log sigma
    ``init_log_scale``. The published code (replicate-2024) draws F-VI's means from N(0, 1) and its log
    sigmas from N(-1, 1), and constant-VI's from N(0, 1) and N(0, 1)."""

    init_log_scale: float = 0.0
    init_loc_sd: float = 0.0
    init_log_scale_sd: float = 0.0

    def check(self) -> None:
        _in_range(self.init_log_scale, -100.0, 20.0, "family.init_log_scale")
        _check(self.init_loc_sd >= 0, "family.init_loc_sd", f"must be >= 0, got {self.init_loc_sd}")
        _check(self.init_log_scale_sd >= 0, "family.init_log_scale_sd", f"must be >= 0, got {self.init_log_scale_sd}")


def family_config(name: str = "amortized", **values: Any) -> FamilyConfig:
    """The config of family ``name`` (its own class) with ``values`` for its fields.

    A field that another registered family uses but this one does not (an encoder's ``width`` given to
    F-VI, say) is ignored, so that a grid may cross ``family.name`` with ``family.width``; a field no
    family knows is refused with its name."""
    from .families import family_field_names, get_family

    _check(isinstance(name, str), "family.name", f"must be a string, got {name!r}")
    cls = get_family(name).config_class
    own = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - family_field_names())
    if unknown:
        raise ConfigError(f"family.{unknown[0]}: unknown field (known: {', '.join(sorted(family_field_names()))})")
    return cls(name=name, **{k: v for k, v in values.items() if k in own})


@dataclass(frozen=True)
class ObjectiveConfig:
    """SPEC §3. ``kind``: "elbo" or "legacy-2024" (the published code's objective, not an ELBO).
    ``estimator``: "mc" or "analytic" (closed-form Gaussian KLs). ``local_terms``: "batch" or "all".
    ``num_samples``: S reparameterised draws per step."""

    kind: str = "elbo"  # a registered objective (objectives.py): elbo, legacy-2024
    estimator: Literal["mc", "analytic"] = "mc"
    local_terms: Literal["batch", "all"] = "batch"
    num_samples: int = 1

    def __post_init__(self):
        from .objectives import get_objective

        _check_types(self, "objective")
        get_objective(self.kind)
        _in_range(self.num_samples, 1, 100_000, "objective.num_samples")
        _check(not (self.kind == "legacy-2024" and self.estimator == "analytic"), "objective.estimator",
               "legacy-2024 is defined by its Monte Carlo terms; use estimator='mc'")


@dataclass(frozen=True)
class LocalInferenceConfig:
    """How F-VI and constant-VI fit q(z') for new images with q(theta) frozen: Adam(lr) on the local
    ELBO (``num_samples`` draws) until the mean loss over a window of ``window`` steps improves by less
    than ``rtol`` (relative) on the previous window, or ``max_steps``."""

    lr: float = 1e-2
    num_samples: int = 1
    window: int = 50
    rtol: float = 1e-4
    max_steps: int = 2000

    def __post_init__(self):
        _check_types(self, "train.test_inference")
        _check(self.lr > 0, "train.test_inference.lr", f"must be > 0, got {self.lr}")
        _in_range(self.num_samples, 1, 100_000, "train.test_inference.num_samples")
        _in_range(self.window, 1, 1_000_000, "train.test_inference.window")
        _check(self.rtol >= 0, "train.test_inference.rtol", f"must be >= 0, got {self.rtol}")
        _in_range(self.max_steps, 1, 10_000_000, "train.test_inference.max_steps")


@dataclass(frozen=True)
class TrainConfig:
    """The optimiser and the bookkeeping. ``batch_size`` None means full batch. ``batches``:
    "shuffled" each epoch or "fixed" contiguous slices in a fixed order (the paper's).
    ``weight_decay`` > 0 adds an L2 penalty to the variational parameters, which changes the objective:
    it is off by default and recorded with the run.

    ``eval_every``: epochs between full evaluations (every metric of SPEC §4, test-time inference
    included). ``mse_every`` > 0 also records the train MSE at the variational means every that many
    epochs (one encode or lookup and one decode of the N images, ~0.1 s for N = 10,000 here), as the
    published code does after each epoch: epochs to a train-MSE tolerance are then resolved to that
    many epochs without paying for a full evaluation each time. 0: the train MSE only at full
    evaluations."""

    epochs: int = 100
    batch_size: Optional[int] = None
    batches: Literal["shuffled", "fixed"] = "shuffled"
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 1
    mse_every: int = 0
    eval_samples: int = 10
    seed: int = 0
    device: str = "cpu"
    train_decoder: bool = True
    test_inference: LocalInferenceConfig = field(default_factory=LocalInferenceConfig)

    def __post_init__(self):
        _check_types(self, "train")
        _in_range(self.epochs, 0, 10_000_000, "train.epochs")
        _check(self.batch_size is None or 1 <= self.batch_size <= 1_000_000, "train.batch_size",
               f"must be between 1 and 1000000, or None (full batch), got {self.batch_size}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _in_range(self.seed, 0, 2**63 - 1, "train.seed")
        _check(re.fullmatch(r"cpu|mps|cuda(:[0-9]{1,3})?", self.device) is not None, "train.device",
               f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _in_range(self.eval_every, 1, 10_000_000, "train.eval_every")
        _check(self.mse_every >= 0, "train.mse_every", f"must be >= 0 (0: off), got {self.mse_every}")
        _in_range(self.eval_samples, 1, 100_000, "train.eval_samples")


@dataclass(frozen=True)
class RunConfig:
    """One run: data, model, family, objective, training."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    family: FamilyConfig = field(default_factory=lambda: family_config("amortized"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Modules to import before this config is read (families, likelihoods or objectives defined outside
    # the package): file paths (made absolute by the grid file that names them) or dotted module names.
    # Not part of the run's identity (its id): the family's name is.
    plugins: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.plugins, list):
            object.__setattr__(self, "plugins", tuple(self.plugins))
        _check_types(self, "config")
        from .families import get_family

        if self.data.is_file:
            pixels = self.data.image_shape[0] * self.data.image_shape[1]
            if self.model.data_dim == ModelConfig().data_dim and pixels != self.model.data_dim:
                # The model follows the file's image size unless data_dim was set by hand.
                object.__setattr__(self, "model", replace(self.model, data_dim=pixels))
            _check(self.model.data_dim == pixels, "model.data_dim",
                   f"must be {pixels} (the file's {self.data.image_shape[0]}x{self.data.image_shape[1]} images), "
                   f"got {self.model.data_dim}")
        get_family(self.family.name).check_model(self.family, self.model)
        n = self.data.n_train
        if n is not None and self.train.batch_size is not None:
            _check(self.train.batch_size <= n, "train.batch_size",
                   f"{self.train.batch_size} is larger than data.n_train={n}")

    def to_dict(self) -> dict:
        """Plain JSON types: tables, lists, strings, numbers, booleans, None."""
        return {**asdict(self), "plugins": list(self.plugins)}

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused with their name. The modules named in
        ``plugins`` are imported first, so that the families they register can be read (in worker, gap
        and Ray processes as in the one that planned the run)."""
        if isinstance(raw, dict) and raw.get("plugins"):
            from .plugins import import_plugins

            import_plugins(raw["plugins"])
        return _build(cls, raw, "")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {raw!r}")
    if cls is FamilyConfig:
        return family_config(**raw)
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{prefix}{sorted(unknown)[0]}: unknown field (known: {', '.join(known)})")
    kwargs = {}
    for name, value in raw.items():
        sub = _NESTED.get((cls, name))
        kwargs[name] = _build(sub, value, f"{prefix}{name}.") if sub else value
    return cls(**kwargs)


_NESTED = {
    (RunConfig, "data"): DataConfig,
    (RunConfig, "model"): ModelConfig,
    (RunConfig, "family"): FamilyConfig,
    (RunConfig, "objective"): ObjectiveConfig,
    (RunConfig, "train"): TrainConfig,
    (TrainConfig, "test_inference"): LocalInferenceConfig,
}

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "FamilyConfig", "EncoderConfig", "SemiAmortizedConfig",
    "FreeFactorConfig", "family_config", "ObjectiveConfig", "LocalInferenceConfig", "TrainConfig", "RunConfig",
    "replace",
]
