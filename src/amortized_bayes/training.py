"""The trainer: Adam on the negative ELBO, per-step and per-eval records, NaN guard (SPEC §3-§4).

``fit(config)`` loads the data through the data layer, builds the decoder and the family, and trains.
Per step it records the minibatch estimate of -ELBO and the cumulative training wall time (evaluation
excluded). Every ``eval_every`` epochs (and before the first) it records the full-data -ELBO, train and
test reconstruction MSE, posterior-collapse diagnostics, and for families without an encoder the cost
of fitting the test images' q(z') with q(theta) frozen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

from .config import RunConfig
from .data.atomic import atomic_torch_save
from .evaluation import (
    collapse_diagnostics,
    full_data_negative_elbo,
    legacy_objective_value,
    local_posterior,
    reconstruction_mse,
)
from .families import VariationalFamily, build_family
from .inference import infer_local
from .meta import machine_description
from .model import BayesianDecoder
from .objectives import negative_elbo
from .optim import LazyAdam, adam


class NonFiniteEvaluationError(FloatingPointError):
    """An evaluation produced a NaN or Inf (the full-data -ELBO, an MSE, or the test images' fitted
    q(z) when test-time inference diverged): the run fails loudly instead of finishing with NaN
    metrics. The message names the metric and the epoch."""


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN or Inf. ``step`` names the step; ``result`` holds the run as it
    was after the last good step (its parameters were not updated with the bad gradient)."""

    def __init__(self, message: str, step: int, result: FitResult):
        super().__init__(message)
        self.step, self.result = step, result


@dataclass
class History:
    """Per-step records (lists of equal length), per-eval records (a list of dicts), and the train-MSE
    trace (``train.mse_every``): dicts with epoch, step, wall_time (training seconds) and train_mse,
    one per traced epoch, full evaluations included (their value copied, not recomputed)."""

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    neg_elbo: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    mse_trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "neg_elbo": self.neg_elbo,
                "wall_time": self.wall_time, "evals": self.evals, "mse_trace": self.mse_trace}

    @classmethod
    def from_dict(cls, raw: dict) -> History:
        return cls(**raw)


@dataclass
class FitResult:
    """A trained model: q(theta) (``model``), the local family, the record of training, and (for
    families without an encoder) the test images' fitted family."""

    config: RunConfig
    model: BayesianDecoder
    family: VariationalFamily
    history: History
    meta: dict
    test_family: VariationalFamily | None = None
    train_indices: torch.Tensor | None = None
    steps_done: int = 0
    epochs_done: int = 0

    @property
    def final_eval(self) -> dict | None:
        return self.history.evals[-1] if self.history.evals else None


@dataclass
class TrainingData:
    """Training images (N, D) with their row indices in the split, and test images (M, D)."""

    train: torch.Tensor
    test: torch.Tensor | None = None
    train_indices: torch.Tensor | None = None


def load_training_data(config: RunConfig) -> TrainingData:
    from .data import load_run_split

    train = load_run_split(config.data, "train")
    test = load_run_split(config.data, "test").images if config.data.n_test != 0 else None
    return TrainingData(train.images, test, train.indices)


def build(config: RunConfig, num_data: int) -> tuple[BayesianDecoder, VariationalFamily]:
    """The decoder and family of ``config``, initialised from ``config.train.seed`` without touching
    the global random state."""
    sparse = (config.objective.local_terms == "batch" and config.train.batch_size is not None
              and config.train.batch_size < num_data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = BayesianDecoder(config.model)
        family = build_family(config.family, num_data=num_data, data_dim=config.model.data_dim,
                              latent_dim=config.model.latent_dim, sparse=sparse)
    return model, family


def batch_schedule(num_data: int, batch_size: int | None, order: str,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """The batches of one epoch, as index tensors: contiguous slices in order ("fixed") or a fresh
    permutation cut into slices ("shuffled"). The last batch may be smaller."""
    if batch_size is None or batch_size >= num_data:
        return [torch.arange(num_data)]
    perm = torch.randperm(num_data, generator=generator) if order == "shuffled" else torch.arange(num_data)
    return list(perm.split(batch_size))


def make_optimisers(model, family, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam over dense parameters; lazy (sparse) Adam over F-VI's per-datapoint rows, so a step moves
    only the rows of the batch."""
    t = config.train
    dense = list(family.dense_parameters())
    if t.train_decoder:
        dense += list(model.parameters())
    optimisers: list[torch.optim.Optimizer] = []
    if dense:
        optimisers.append(adam(dense, lr=t.lr, weight_decay=t.weight_decay))
    sparse = family.sparse_parameters()
    if sparse:
        if t.weight_decay:
            raise ValueError("train.weight_decay: not supported with lazy F-VI updates (objective.local_terms="
                             "'batch' with minibatches); use local_terms='all' or no weight decay")
        optimisers.append(LazyAdam(sparse, lr=t.lr))
    return optimisers


def batch_data(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images of a batch and the indices to pass to the objective. Consecutive rows are a view of
    ``x`` (no copy), and every row in order needs no indices at all (rows 0..N-1); other batches are
    gathered: ``x[rows]``, ``rows``."""
    m = rows.numel()
    if m > 0:
        first = int(rows[0])
        if bool((rows == torch.arange(first, first + m, device=rows.device)).all()):
            return x[first:first + m], (None if m == x.shape[0] else rows)
    return torch.index_select(x, 0, rows), rows  # a row gather; x[rows] is ~3x slower on CPU


def train_step(model: BayesianDecoder, family: VariationalFamily, optimisers: list[torch.optim.Optimizer],
               params: list[torch.nn.Parameter], x_batch: torch.Tensor, idx_batch: torch.Tensor | None, *,
               num_data: int, objective, generator: torch.Generator,
               x_all: torch.Tensor | None = None, loss_fn: Callable | None = None) -> tuple[float, str | None]:
    """One step of the trainer: the -ELBO estimate on the batch, its gradient, one update of every
    optimiser. Returns (the loss in nats, None), or (loss, "loss" | "gradient") without updating
    anything when the loss or a gradient of ``params`` is not finite. ``loss_fn`` replaces
    :func:`negative_elbo` (same signature), e.g. by a compiled version of it."""
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    loss = (loss_fn or negative_elbo)(model, family, x_batch, idx_batch, num_data=num_data, config=objective,
                                      generator=generator, x_all=x_all)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, "loss"
    loss.backward()
    if not _all_finite(params):
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        return value, "gradient"
    for opt in optimisers:
        opt.step()
    return value, None


def _all_finite(params) -> bool:
    """Whether every gradient of ``params`` is finite. A sum is finite only if every term is, so one
    reduction per tensor decides (an elementwise test costs ~25x more); only a non-finite sum (a NaN or
    Inf, or an overflowing sum of finite values) is checked element by element."""
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    if bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _side_generator(device, seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator of its own for a measurement at ``epoch`` (``stream`` names which), so that the
    measurement draws nothing from the training generator: adding or dropping it leaves every other
    number of the run as it was."""
    state = np.random.SeedSequence((seed, epoch, stream)).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


TEST_ELBO_STREAM = 1


def evaluate(model, family, data: TrainingData, config: RunConfig, generator: torch.Generator,
             test_family: VariationalFamily | None, epoch: int = 0) -> tuple[dict, VariationalFamily | None]:
    """One evaluation record (SPEC §4) and the test images' family (for warm starts).

    With test images: their q(z') (the encoder, or test-time inference), the test MSE, the cost of
    finding q(z') and ``test_neg_elbo_per_image``, the mean over test images of
    -(E_q[log p(x'|z', theta)] - KL(q(z')||p(z'))) in nats: the local ELBO of a new image, without the
    training set's KL(q(theta)||p(theta)), from a generator of its own (seeded by seed and epoch)."""
    t = config.train
    x = data.train
    idx = torch.arange(x.shape[0], device=x.device)
    mu, log_sigma = local_posterior(model, family, x, idx, generator=generator)
    record = full_data_negative_elbo(model, mu, log_sigma, x, t.eval_samples, generator)
    record["train_mse"] = reconstruction_mse(model, mu, x)
    if model.log_obs_var is not None:
        record["obs_var"] = model.obs_var_value
    record.update(collapse_diagnostics(mu, log_sigma))
    if config.objective.kind == "legacy-2024":
        record["legacy_objective"] = legacy_objective_value(model, family, x, x.shape[0], t.eval_samples, generator)
    if data.test is not None and data.test.shape[0] > 0:
        post = infer_local(model, family, data.test, t.test_inference, generator, warm_start=test_family)
        if not (bool(torch.isfinite(post.mu).all()) and bool(torch.isfinite(post.log_sigma).all())):
            raise NonFiniteEvaluationError(
                f"test-time inference diverged: q(z) of the test images is not finite after {post.steps} steps "
                f"(train.test_inference.lr={t.test_inference.lr}; lower it)")
        record["test_mse"] = reconstruction_mse(model, post.mu, data.test)
        test_terms = full_data_negative_elbo(model, post.mu, post.log_sigma, data.test, t.eval_samples,
                                             _side_generator(data.test.device, t.seed, epoch, TEST_ELBO_STREAM))
        record["test_neg_elbo_per_image"] = -(test_terms["log_lik"] - test_terms["kl_z"]) / data.test.shape[0]
        record["test_inference_steps"] = post.steps
        record["test_inference_seconds"] = post.seconds
        record["test_inference_converged"] = post.converged
        test_family = None if family.amortized else post.family
    return record, test_family


def train_mse_now(model, family, data: TrainingData, config: RunConfig, epoch: int) -> float:
    """The train MSE at the variational means, for the trace between full evaluations. SA-VI's
    refinement draws from its own generator, seeded by (seed, epoch), so that tracing changes neither
    the training noise nor a resumed run's numbers."""
    x = data.train
    idx = torch.arange(x.shape[0], device=x.device)
    generator = torch.Generator(device=x.device).manual_seed(config.train.seed * 1_000_003 + epoch)
    mu, _ = local_posterior(model, family, x, idx, generator=generator)
    return reconstruction_mse(model, mu, x)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often ``fit`` saves its complete state (at the end of an epoch, once
    ``every_seconds`` seconds have passed since the last save, and at the end). If ``path`` exists
    when ``fit`` starts, training resumes from it and ends with the same numbers as an uninterrupted
    run (on the same device)."""

    path: Path
    every_seconds: float = 300.0


def _training_state(result, optimisers, generator, batch_generator, train_seconds) -> dict:
    return {
        "format": 1,
        "config": result.config.to_dict(),
        "model": result.model.state_dict(),
        "family": result.family.state_dict(),
        "optimisers": [opt.state_dict() for opt in optimisers],
        "generator": generator.get_state(),
        "batch_generator": batch_generator.get_state(),
        "history": result.history.to_dict(),
        "steps_done": result.steps_done,
        "epochs_done": result.epochs_done,
        "train_seconds": train_seconds,
        "test_family": None if result.test_family is None else result.test_family.state_dict(),
        "test_family_rows": getattr(result.test_family, "num_data", None),
    }


def fit(config: RunConfig, data: TrainingData | None = None, *, model: BayesianDecoder | None = None,
        family: VariationalFamily | None = None,
        on_eval: Callable[[dict], None] | None = None,
        on_epoch: Callable[[FitResult], None] | None = None,
        checkpoint: Checkpointing | None = None) -> FitResult:
    """Train ``config`` and return its :class:`FitResult`.

    ``data`` defaults to the dataset of ``config.data`` through the data layer. ``model`` and ``family``
    replace the freshly initialised ones (e.g. a decoder with known weights and ``train_decoder=False``).
    ``on_eval`` receives each evaluation record, ``on_epoch`` the result after each epoch.
    ``checkpoint`` saves the full training state periodically and resumes from it (see
    :class:`Checkpointing`). Raises :class:`NonFiniteLossError` (carrying the last good state) if the
    loss or a gradient is not finite.
    """
    t = config.train
    device = torch.device(t.device)
    data = data or load_training_data(config)
    data = TrainingData(data.train.to(device), None if data.test is None else data.test.to(device),
                        data.train_indices)
    n = data.train.shape[0]
    built_model, built_family = build(config, n)
    model = (model or built_model).to(device)
    family = (family or built_family).to(device)
    if not t.train_decoder:
        model.requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    batch_generator = torch.Generator().manual_seed(t.seed + 1)
    optimisers = make_optimisers(model, family, config)
    params = [p for group in optimisers for g in group.param_groups for p in g["params"]]
    history = History()
    result = FitResult(config, model, family, history, machine_description(str(device)),
                       train_indices=data.train_indices)
    x_all = data.train if config.objective.local_terms == "all" else None
    train_seconds, step, first_epoch = 0.0, 0, 1
    if checkpoint is not None and Path(checkpoint.path).exists():
        state = torch.load(checkpoint.path, map_location=device, weights_only=True)
        if RunConfig.from_dict(state["config"]) != config:
            raise ValueError(f"{checkpoint.path}: checkpoint belongs to a different config; refusing to resume")
        model.load_state_dict(state["model"])
        family.load_state_dict(state["family"])
        for opt, opt_state in zip(optimisers, state["optimisers"]):
            opt.load_state_dict(opt_state)
        generator.set_state(state["generator"])
        batch_generator.set_state(state["batch_generator"])
        history = result.history = History.from_dict(state["history"])
        step, train_seconds = state["steps_done"], state["train_seconds"]
        result.steps_done, result.epochs_done = state["steps_done"], state["epochs_done"]
        first_epoch = state["epochs_done"] + 1
        if state["test_family"] is not None:
            result.test_family = family.for_new_data(state["test_family_rows"] or 1)
            result.test_family.load_state_dict(state["test_family"])
    last_save = time.monotonic()

    def trace(epoch: int, train_mse: float) -> None:
        history.mse_trace.append({"epoch": epoch, "step": step, "wall_time": train_seconds, "train_mse": train_mse})

    def do_eval(epoch: int) -> None:
        record, result.test_family = evaluate(model, family, data, config, generator, result.test_family, epoch)
        bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            raise NonFiniteEvaluationError(f"epoch {epoch}: the evaluation gave non-finite {', '.join(bad)}")
        record.update(epoch=epoch, step=step, wall_time=train_seconds)
        history.evals.append(record)
        if t.mse_every:
            trace(epoch, record["train_mse"])
        if on_eval is not None:
            on_eval(record)

    if first_epoch == 1:
        do_eval(0)
    for epoch in range(first_epoch, t.epochs + 1):
        for rows in batch_schedule(n, t.batch_size, t.batches, batch_generator):
            start = time.perf_counter()
            x_batch, idx_batch = batch_data(data.train, rows.to(device))
            loss, bad = train_step(model, family, optimisers, params, x_batch, idx_batch, num_data=n,
                                   objective=config.objective, generator=generator, x_all=x_all)
            if bad == "loss":
                raise NonFiniteLossError(f"step {step + 1} (epoch {epoch}): the -ELBO estimate is {loss}; "
                                         f"parameters kept from step {step}", step + 1, result)
            if bad == "gradient":
                raise NonFiniteLossError(f"step {step + 1} (epoch {epoch}): a gradient is NaN or Inf; "
                                         f"parameters kept from step {step}", step + 1, result)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - start
            step += 1
            history.step.append(step)
            history.epoch.append(epoch)
            history.neg_elbo.append(loss)
            history.wall_time.append(train_seconds)
            result.steps_done = step
        result.epochs_done = epoch
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            do_eval(epoch)
        elif t.mse_every and epoch % t.mse_every == 0:
            trace(epoch, train_mse_now(model, family, data, config, epoch))
        if checkpoint is not None:
            due = time.monotonic() - last_save >= checkpoint.every_seconds or epoch == t.epochs
            if due:
                atomic_torch_save(Path(checkpoint.path),
                                  _training_state(result, optimisers, generator, batch_generator, train_seconds))
                last_save = time.monotonic()
        if on_epoch is not None:
            on_epoch(result)
    return result
