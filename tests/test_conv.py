"""The convolutional decoder and encoder (issue 20): the decoder against the same network built from
torch.nn layers on fixed weights, its likelihoods against torch.distributions, KL(q(theta) || p(theta))
against torch's closed form, a gradient to every kernel and bias, PyTorch's layer init, the config's
refusals and run ids; then conv runs end to end through `run`, `gap`, `report` and `infer`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from amortized_bayes.config import ConfigError, ModelConfig, ObjectiveConfig, RunConfig, family_config
from amortized_bayes.experiments.grid import run_id
from amortized_bayes.families import build_family
from amortized_bayes.likelihoods import get_likelihood
from amortized_bayes.model import BayesianDecoder, ConvNetwork
from amortized_bayes.objectives import ELBO, negative_elbo, objective_terms

LATENT, SIDE = 3, 8
D = SIDE * SIDE


def _decoder(channels: int = 4, depth: int = 2, dtype=torch.float64, **options) -> BayesianDecoder:
    torch.manual_seed(0)
    config = ModelConfig(latent_dim=LATENT, data_dim=D, architecture="conv", channels=channels, depth=depth,
                         **options)
    decoder = BayesianDecoder(config).to(dtype)
    with torch.no_grad():  # a q(theta) with real spread, so that draws differ from the mean
        decoder.theta_log_scale.uniform_(math.log(0.05), math.log(0.4))
    return decoder


def _reference_network(decoder: BayesianDecoder, values: list[torch.Tensor]) -> nn.Sequential:
    """The decoder's network for one draw of theta, built from torch.nn layers with those weights."""
    c = decoder.config
    channels = [c.channels * 2 ** (c.depth - 1 - i) for i in range(c.depth)] + [1]
    side = SIDE // 2 ** c.depth
    linear = nn.Linear(LATENT, channels[0] * side * side).to(values[0].dtype)
    layers: list[nn.Module] = [linear, nn.LeakyReLU(0.2), nn.Unflatten(1, (channels[0], side, side))]
    params = [(linear.weight, linear.bias)]
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        conv = nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1).to(values[0].dtype)
        layers += [conv] + ([nn.LeakyReLU(0.2)] if i < c.depth - 1 else [])
        params.append((conv.weight, conv.bias))
    layers.append(nn.Flatten(1))
    with torch.no_grad():
        for (weight, bias), w, b in zip(params, values[0::2], values[1::2]):
            weight.copy_(w)
            bias.copy_(b)
    return nn.Sequential(*layers)


def _reference_decode(decoder: BayesianDecoder, z: torch.Tensor, theta) -> torch.Tensor:
    """(S, B, D) from torch.nn layers, one draw at a time; z (S, B, d) paired, or any z with one draw."""
    if theta.num_samples == 1:
        net = _reference_network(decoder, [v[0] for v in theta.values])
        return net(z.reshape(-1, LATENT)).view(*z.shape[:-1], D)
    return torch.stack([_reference_network(decoder, [v[s] for v in theta.values])(z[s])
                        for s in range(theta.num_samples)])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_conv_decoder_equals_torch_layers_on_fixed_weights(depth):
    decoder = _decoder(channels=3, depth=depth)
    g = torch.Generator().manual_seed(1)
    paired = decoder.sample(3, g)
    z = torch.randn(3, 5, LATENT, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decoder.decode(z, paired), _reference_decode(decoder, z, paired))
        one = decoder.sample(1, g)  # one draw broadcast over every z
        torch.testing.assert_close(decoder.decode(z, one), _reference_decode(decoder, z, one))
        mean_out = decoder.decode(z[0], decoder.mean())
        assert mean_out.shape == (1, 5, D)
        torch.testing.assert_close(mean_out[0], _reference_decode(decoder, z[0], decoder.mean()))
        x = torch.rand(5, D, generator=g, dtype=torch.float64)
        torch.testing.assert_close(decoder.decode(z, paired, subtract=x), decoder.decode(z, paired) - x)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_conv_likelihoods_match_torch_distributions_in_value_and_gradient(likelihood, num_samples):
    decoder = _decoder(likelihood=likelihood, obs_var=0.3)
    lik = get_likelihood(likelihood)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, D, generator=g, dtype=torch.float64)
    if likelihood == "bernoulli":
        x = (x > 0.5).double()
    z = torch.randn(num_samples, 6, LATENT, generator=g, dtype=torch.float64)
    theta = decoder.sample(num_samples, g)
    with torch.no_grad():
        out = _reference_decode(decoder, z, theta)
    dist = Bernoulli(logits=out) if likelihood == "bernoulli" else Normal(out, math.sqrt(0.3))
    expected = dist.log_prob(x).sum(-1)  # (S, B)
    torch.testing.assert_close(lik.per_image(decoder, x, decoder.decode(z, theta)), expected)
    torch.testing.assert_close(lik.decoded_per_image(decoder, x, z, theta), expected)
    # The training sum: its value, and its gradient to q(theta) equal to that of the plain per-image sum.
    total = lik.decoded_total(decoder, x, z, theta)
    torch.testing.assert_close(total, expected.sum())
    params = (decoder.theta_loc, decoder.theta_log_scale)
    fused = torch.autograd.grad(total, params, retain_graph=True)
    plain = torch.autograd.grad(lik.per_image(decoder, x, decoder.decode(z, theta)).sum(), params)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


def test_kl_of_q_theta_over_the_conv_kernels_equals_torch_closed_form():
    decoder = _decoder(prior_scale=0.7)
    objective = ELBO()
    expected_log_prior, entropy = objective.theta_terms(decoder, decoder.mean(), "analytic")
    expected = sum(kl_divergence(Normal(m, s.exp()), Normal(0.0, 0.7)).sum()
                   for m, s in zip(decoder.loc, decoder.log_scale))
    # KL = E log q - E log p = -(E log p(theta) + H[q(theta)])
    torch.testing.assert_close(-(expected_log_prior + entropy), expected.detach())
    # The per-tensor views are the conv layers' shapes, and cover the flat vector once.
    assert [tuple(t.shape) for t in decoder.loc] == [tuple(s) for s, _ in decoder.network.tensors()]
    assert sum(t.numel() for t in decoder.loc) == decoder.num_params


def _point_mass(likelihood: str, n: int = 20):
    """A conv decoder and F-VI factors with numerically point-mass q: every draw is the mean."""
    decoder = _decoder(likelihood=likelihood, obs_var=0.3, init_log_scale=-30.0).float()
    with torch.no_grad():
        decoder.theta_log_scale.fill_(-30.0)
    family = build_family(family_config("factorized", init_log_scale=-30.0), num_data=n, data_dim=D,
                          latent_dim=LATENT)
    with torch.no_grad():
        family.loc.weight.normal_()
    x = torch.rand(n, D, generator=torch.Generator().manual_seed(3))
    return decoder, family, (x > 0.5).float() if likelihood == "bernoulli" else x


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("scheme", ["batch", "all"])
@pytest.mark.parametrize("num_samples, estimator", [(1, "mc"), (3, "mc"), (2, "analytic")])
def test_the_training_log_likelihood_term_of_a_conv_decoder_at_fixed_draws(likelihood, scheme, num_samples,
                                                                           estimator):
    decoder, family, x = _point_mass(likelihood)
    n, rows = x.shape[0], torch.tensor([1, 4, 9, 15, 19])
    terms = objective_terms(decoder, family, x[rows], rows, num_data=n,
                            config=ObjectiveConfig(local_terms=scheme, num_samples=num_samples, estimator=estimator),
                            generator=torch.Generator().manual_seed(4), x_all=x)
    with torch.no_grad():
        out = _reference_decode(decoder, family.loc.weight[rows].unsqueeze(0), decoder.mean())[0]
    dist = Bernoulli(logits=out) if likelihood == "bernoulli" else Normal(out, math.sqrt(0.3))
    expected = dist.log_prob(x[rows]).sum() * n / len(rows)
    torch.testing.assert_close(terms.log_lik.double(), expected.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("family_name", ["amortized", "semi-amortized", "factorized", "constant"])
def test_every_kernel_and_bias_gets_a_gradient(family_name):
    decoder = _decoder(channels=3).float()
    family = build_family(family_config(family_name, width=4, depth=2, architecture="conv", refine_steps=2),
                          num_data=10, data_dim=D, latent_dim=LATENT)
    x = torch.rand(10, D, generator=torch.Generator().manual_seed(5))
    idx = torch.arange(6)
    loss = negative_elbo(decoder, family, x[idx], idx, num_data=10, config=ObjectiveConfig(num_samples=2),
                         generator=torch.Generator().manual_seed(6))
    loss.backward()
    for flat in (decoder.theta_loc.grad, decoder.theta_log_scale.grad):
        for shape, block in zip(decoder.shapes, flat.split(decoder.sizes)):
            assert torch.isfinite(block).all() and block.abs().sum() > 0, f"no gradient reaches a {shape} tensor"
    for name, p in family.named_parameters():
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{family_name}: no gradient at {name}"
    if family_name in ("amortized", "semi-amortized"):
        assert any(isinstance(m, nn.Conv2d) for m in family.modules())


def test_the_conv_decoders_start_is_pytorchs_layer_init():
    decoder = _decoder(channels=8, depth=2, dtype=torch.float32)
    network = decoder.network
    reference = [nn.Linear(LATENT, network.channels[0] * 4)] + [
        nn.ConvTranspose2d(a, b, 4, 2, 1) for a, b in zip(network.channels[:-1], network.channels[1:])]
    for layer, weight, bias in zip(reference, decoder.loc[0::2], decoder.loc[1::2]):
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = 1 / math.sqrt(fan_in)
        assert weight.shape == layer.weight.shape and bias.shape == layer.bias.shape
        for tensor in (weight, bias):
            assert tensor.abs().max() <= bound
        assert weight.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    zero = BayesianDecoder(ModelConfig(latent_dim=LATENT, data_dim=D, architecture="conv", init_loc="zero"))
    assert zero.theta_loc.abs().max() == 0


def test_conv_configs_are_refused_where_they_cannot_work_and_ids_ignore_unused_fields():
    with pytest.raises(ConfigError, match="model.architecture: the conv decoder needs square images"):
        ModelConfig(data_dim=780, architecture="conv")
    with pytest.raises(ConfigError, match="model.depth: 3 transposed convolutions need an image side divisible by 8"):
        ModelConfig(architecture="conv", depth=3)
    with pytest.raises(ConfigError, match="model.depth: the conv decoder needs at least 1"):
        ModelConfig(architecture="conv", depth=0)
    with pytest.raises(ConfigError, match="model.architecture: unknown decoder architecture 'resnet'"):
        ModelConfig(architecture="resnet")
    with pytest.raises(ConfigError, match="family.depth: the conv encoder needs"):
        RunConfig(family=family_config("amortized", depth=3, architecture="conv"))
    with pytest.raises(ConfigError, match="family.architecture: the conv encoder needs square images"):
        RunConfig(model=ModelConfig(data_dim=780), family=family_config("amortized", architecture="conv"))
    with pytest.raises(ConfigError, match="family.architecture: must be one of"):
        family_config("amortized", architecture="resnet")
    conv = RunConfig(model=ModelConfig(architecture="conv"))
    mlp = RunConfig()
    # A shape field the architecture does not read does not change the run; one it reads does.
    assert run_id(RunConfig(model=ModelConfig(architecture="conv", hidden=17))) == run_id(conv)
    assert run_id(RunConfig(model=ModelConfig(channels=17))) == run_id(mlp)
    assert run_id(RunConfig(model=ModelConfig(architecture="conv", channels=17))) != run_id(conv)
    assert run_id(RunConfig(model=ModelConfig(hidden=17))) != run_id(mlp)
    assert "-avi-k64-convdec-s0-" in run_id(conv)
    assert "-avi-k64-conv-convdec-s0-" in run_id(RunConfig(model=ModelConfig(architecture="conv"),
                                                            family=family_config("amortized", architecture="conv")))
    # The MLP's ids are those of before the architecture existed (the default one adds nothing).
    assert run_id(RunConfig(model=ModelConfig(architecture="mlp"))) == run_id(mlp)


def test_the_conv_network_shapes_on_mnist():
    network = ConvNetwork(ModelConfig(architecture="conv", channels=32, depth=2))
    assert [s for s, _ in network.tensors()] == [(3136, 64), (3136,), (64, 32, 4, 4), (32,), (32, 1, 4, 4), (1,)]


GRID = """name = "conv"
[base.data]
n_train = 60
n_test = 12
[base.model]
latent_dim = 4
architecture = "conv"
channels = 4
[base.train]
epochs = 2
batch_size = 30
eval_every = 2
[base.train.test_inference]
max_steps = 100
window = 20
[[variants]]
family = {name = "amortized", width = 4, architecture = "conv"}
[[variants]]
family = {name = "semi-amortized", width = 4, architecture = "conv", refine_steps = 2}
[[variants]]
family = {name = "factorized"}
[[variants]]
family = {name = "constant"}
[[variants]]
family = {name = "amortized", width = 8}
model = {architecture = "mlp", hidden = 16}
[[variants]]
family = {name = "factorized"}
model = {architecture = "mlp", hidden = 16}
"""


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.processes
def test_conv_runs_go_through_run_gap_report_and_infer(tmp_path):
    grid = tmp_path / "conv.toml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    _cli("run", grid, "--out", out, "--workers", "2", "--threads", "1")
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6
    for run in runs:
        assert json.loads((run / "status.json").read_text())["state"] == "done", run.name
        last = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
        assert math.isfinite(last["neg_elbo"]) and math.isfinite(last["test_mse"]), run.name
    assert sum("convdec" in r.name for r in runs) == 4
    # The gap on a few test images (the train split's code path is test_gap.py's), to keep this test short.
    _cli("gap", out, "--split", "test", "--images", "2", "--iwae-k", "10", "--elbo-samples", "4", "--workers", "2",
         "--max-local-steps", "40")
    for run in runs:
        test = json.loads((run / "gap.json").read_text())["splits"]["test"]
        assert math.isfinite(test["amortization_gap"]["mean"]), run.name
    _cli("report", out)
    md = (out / "report" / "report.md").read_text()
    for label in ("A-VI k=4 conv, conv decoder", "SA-VI k=4 K=2 conv, conv decoder", "F-VI, conv decoder",
                  "constant-VI, conv decoder", "A-VI k=8", "F-VI"):
        assert f"| {label} |" in md, label
    assert (out / "report" / "figures" / "mnist-reconstructions.png").stat().st_size > 5_000
    # Each A-VI is compared with the F-VI of its own decoder.
    from amortized_bayes.analysis import dataset_table, load_results

    table = dataset_table(load_results(out), "mnist")
    pairs = {str(c.avi): str(c.fvi) for c in table.comparisons.values()}
    assert pairs == {"A-VI k=4 conv, conv decoder": "F-VI, conv decoder", "A-VI k=8": "F-VI"}
    # infer on new images, for every conv family: its reconstructions come from the stored model.
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    np.save(tmp_path / "new.npy", images)
    for run in runs:
        if "convdec" not in run.name:
            continue
        target = tmp_path / f"{run.name}.npz"
        with_gap = "-avi-" in run.name or "-fvi-" in run.name  # the per-image gap for an encoder and for F-VI
        _cli("infer", run, tmp_path / "new.npy", "--out", target, "--elbo-samples", "8", "--grid", "0",
             *(["--gap", "--iwae-k", "10", "--max-local-steps", "40"] if with_gap else []))
        result = np.load(target)
        assert result["reconstructions"].shape == (5, 28, 28) and np.isfinite(result["elbo"]).all(), run.name
        assert not with_gap or np.isfinite(result["amortization_gap"]).all(), run.name
        from amortized_bayes.checkpoint import load_fit

        fit = load_fit(run / "model.pt")
        with torch.no_grad():
            expected = fit.model.reconstruct(torch.from_numpy(result["mu"]))
        np.testing.assert_allclose(result["reconstructions"].reshape(5, -1), expected.numpy(), atol=1e-5)
