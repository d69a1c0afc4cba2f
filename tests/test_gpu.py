"""The GPU path gives the CPU's numbers. Skipped where CUDA is absent (CI has no GPU); on a GPU machine
run ``pytest tests/test_gpu.py``.

Each device draws its own random numbers, so to compare a step at equal noise every ``torch.randn`` of
the step is taken from one seeded CPU stream and moved to the step's device."""

from __future__ import annotations

import math

import pytest
import torch

from amortized_bayes.config import DataConfig, family_config, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
from amortized_bayes.inference import infer_local
from amortized_bayes.training import TrainingData, batch_data, build, fit, make_optimisers, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = "cuda"
N, D = 48, 784
FAMILIES = {
    "amortized": family_config(name="amortized", width=16, depth=1),
    "factorized": family_config(name="factorized"),
    "constant": family_config(name="constant"),
    "semi-amortized": family_config(name="semi-amortized", width=16, depth=1, refine_steps=2),
}


@pytest.fixture(autouse=True)
def full_precision_matmul():
    # TF32 products would differ from the CPU's in the third digit.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _config(family: str, batch_size: int | None, device: str, **train) -> RunConfig:
    return RunConfig(data=DataConfig(n_train=N, n_test=0),
                     model=ModelConfig(latent_dim=4, hidden=32, depth=2, init_log_scale=-3.0),
                     family=FAMILIES[family], objective=ObjectiveConfig(estimator="mc", num_samples=2),
                     train=TrainConfig(batch_size=batch_size, device=device, **train))


def _images() -> torch.Tensor:
    return torch.rand(N, D, generator=torch.Generator().manual_seed(3))


def _steps_at_shared_noise(monkeypatch, family: str, batch_size: int | None, device: str, steps: int = 3):
    """Losses and final parameters (on the CPU) of ``steps`` trainer steps on ``device``."""
    stream = torch.Generator().manual_seed(11)
    cpu_randn = torch.randn

    def shared_randn(*size, generator=None, device=None, dtype=None, **kwargs):
        return cpu_randn(*size, generator=stream, dtype=dtype, **kwargs).to(device)

    monkeypatch.setattr(torch, "randn", shared_randn)
    config = _config(family, batch_size, device)
    model, fam = build(config, N)
    model, fam = model.to(device), fam.to(device)
    optimisers = make_optimisers(model, fam, config)
    params = [p for opt in optimisers for g in opt.param_groups for p in g["params"]]
    x = _images().to(device)
    rows = [torch.arange(0, N, device=device)] if batch_size is None else \
        [torch.tensor([5, 0, 17, 33, 2, 40, 9, 21], device=device), torch.arange(8, 16, device=device)]
    losses = []
    for i in range(steps):
        xb, idx = batch_data(x, rows[i % len(rows)])
        loss, bad = train_step(model, fam, optimisers, params, xb, idx, num_data=N, objective=config.objective,
                               generator=torch.Generator(device=device).manual_seed(0))
        assert bad is None
        losses.append(loss)
    monkeypatch.undo()
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({f"family.{k}": v.detach().cpu() for k, v in fam.state_dict().items()})
    return losses, state


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch_size", [None, 8])
def test_training_steps_on_the_gpu_match_the_cpu(monkeypatch, family, batch_size):
    cpu_losses, cpu_state = _steps_at_shared_noise(monkeypatch, family, batch_size, "cpu")
    gpu_losses, gpu_state = _steps_at_shared_noise(monkeypatch, family, batch_size, GPU)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-5)
    assert cpu_state.keys() == gpu_state.keys()
    lr = _config(family, batch_size, "cpu").train.lr
    for name, value in cpu_state.items():
        # Adam's first steps move a parameter by about lr whatever the size of its gradient, so an entry
        # whose gradient is at rounding level may go either way on either device: allow a handful of
        # those (never more than the 3 steps' worth of lr), and require the rest to agree closely.
        close = torch.isclose(gpu_state[name], value, rtol=1e-4, atol=2e-5)
        assert float(close.float().mean()) >= 0.999, f"{name}: {int((~close).sum())} entries differ"
        assert float((gpu_state[name] - value).abs().max()) <= 3 * 2 * lr, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fit_and_test_time_inference_run_on_the_gpu(family):
    config = _config(family, 16, GPU, epochs=3, eval_every=3)
    result = fit(config, TrainingData(_images(), _images()[:8]))
    assert result.history.evals, "no evaluation recorded"
    assert all(math.isfinite(v) for v in result.history.neg_elbo)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    post = infer_local(result.model, result.family, _images()[:8].to(GPU),
                       generator=torch.Generator(GPU).manual_seed(0))
    assert post.mu.device.type == "cuda" and post.mu.shape == (8, 4)
    assert torch.isfinite(post.mu).all() and torch.isfinite(post.log_sigma).all()
