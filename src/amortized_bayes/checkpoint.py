"""Save and load fitted models: q(theta), the family, the config and the record of training.

A checkpoint is one ``torch.save`` file holding plain tensors, numbers and strings (loadable with
``weights_only=True``): nothing in it runs code when loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data.atomic import atomic_torch_save
from .families import VariationalFamily, build_family
from .inference import LocalPosterior, infer_local
from .model import BayesianDecoder
from .training import FitResult, History

FORMAT_VERSION = 1


@dataclass
class FittedModel:
    """A loaded model: everything needed to infer q(z) for new images and to decode."""

    config: RunConfig
    model: BayesianDecoder
    family: VariationalFamily
    history: History
    meta: dict

    def infer(self, images: torch.Tensor, generator: torch.Generator | None = None) -> LocalPosterior:
        """q(z) for new images (M, D) in [0, 1]: the encoder for amortized families; for the others a fit
        with q(theta) frozen under ``config.train.test_inference``."""
        return infer_local(self.model, self.family, images, self.config.train.test_inference, generator)


def save_fit(result: FitResult, path: str | Path) -> Path:
    """Write ``result`` to ``path`` atomically (a crash mid-write leaves any previous file intact)."""
    num_data = getattr(result.family, "num_data", None)
    payload = {
        "format": FORMAT_VERSION,
        "config": result.config.to_dict(),
        "num_data": int(num_data) if num_data is not None else None,
        "model": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "family": {k: v.detach().cpu() for k, v in result.family.state_dict().items()},
        "history": result.history.to_dict(),
        "meta": result.meta,
        "steps_done": result.steps_done,
        "epochs_done": result.epochs_done,
    }
    path = Path(path)
    atomic_torch_save(path, payload)
    return path


def load_fit(path: str | Path, device: str = "cpu") -> FittedModel:
    """Load a checkpoint written by :func:`save_fit`."""
    payload = torch.load(Path(path), map_location=device, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format')!r}, expected {FORMAT_VERSION}")
    config = RunConfig.from_dict(payload["config"])
    model = BayesianDecoder(config.model)
    model.load_state_dict(payload["model"])
    num_data = payload["num_data"] or config.data.n_train or 1
    family = build_family(config.family, num_data=num_data, data_dim=config.model.data_dim,
                          latent_dim=config.model.latent_dim)
    family.load_state_dict(payload["family"])
    return FittedModel(config, model.to(device), family.to(device), History.from_dict(payload["history"]),
                       payload["meta"])
