"""The trainer's behaviour: lazy F-VI updates, test-time inference, determinism, NaN guard, SA-VI,
save/load/infer, and refusal of invalid configs."""

from __future__ import annotations

import math

import pytest
import torch

from amortized_bayes import load_fit, save_fit
from amortized_bayes.config import (
    ConfigError,
    DataConfig,
    family_config,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    LocalInferenceConfig,
    TrainConfig,
)
from amortized_bayes.data import load_split
from amortized_bayes.inference import infer_local, local_negative_elbo
from amortized_bayes.objectives import make_local_elbo, negative_elbo
from amortized_bayes.training import NonFiniteLossError, TrainingData, build, fit, make_optimisers

from . import linear_gaussian as lg

SMALL_MODEL = ModelConfig(latent_dim=8, hidden=32, depth=2)


def config(family="amortized", epochs=3, batch_size=50, n=200, **kw):
    fam_kw = {k: kw.pop(k) for k in list(kw) if k in ("width", "depth", "refine_steps", "refine_lr", "refine_backprop")}
    obj_kw = {k: kw.pop(k) for k in list(kw) if k in ("local_terms", "estimator", "kind", "num_samples")}
    return RunConfig(
        data=DataConfig(n_train=n, n_test=100),
        model=SMALL_MODEL,
        family=family_config(name=family, width=16, **fam_kw),
        objective=ObjectiveConfig(**obj_kw),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, test_inference=LocalInferenceConfig(max_steps=300),
                          **kw),
    )


@pytest.fixture(scope="module")
def mnist():
    train = load_split("mnist", "train", n=200)
    test = load_split("mnist", "test", n=100)
    return TrainingData(train.images, test.images, train.indices)


def test_fvi_rows_outside_the_batch_are_bit_identical_after_each_step(mnist):
    cfg = config("factorized", batch_size=10)
    model, fam = build(cfg, 200)
    opts = make_optimisers(model, fam, cfg)
    g = torch.Generator().manual_seed(0)
    snapshots = [fam.loc.weight.detach().clone(), fam.log_sigma.weight.detach().clone()]
    batches = [torch.arange(0, 10), torch.arange(50, 60), torch.arange(100, 110)]
    touched = torch.zeros(200, dtype=torch.bool)
    for rows in batches:
        before = [fam.loc.weight.detach().clone(), fam.log_sigma.weight.detach().clone()]
        for o in opts:
            o.zero_grad()
        negative_elbo(model, fam, mnist.train[rows], rows, num_data=200, config=cfg.objective, generator=g).backward()
        for o in opts:
            o.step()
        after = [fam.loc.weight.detach(), fam.log_sigma.weight.detach()]
        outside = torch.ones(200, dtype=torch.bool)
        outside[rows] = False
        for b, a in zip(before, after):
            assert torch.equal(a[outside], b[outside])  # bit-identical, momentum notwithstanding
            assert not torch.equal(a[rows], b[rows])
        touched[rows] = True
    for s, a in zip(snapshots, [fam.loc.weight.detach(), fam.log_sigma.weight.detach()]):
        assert torch.equal(a[~touched], s[~touched])


def test_dense_adam_would_have_moved_them(mnist):
    """The previous test can fail: with local_terms='all' (dense gradients, plain Adam) rows outside the
    batch move."""
    cfg = config("factorized", batch_size=10, local_terms="all")
    model, fam = build(cfg, 200)
    assert fam.sparse_parameters() == []
    opts = make_optimisers(model, fam, cfg)
    before = fam.loc.weight.detach().clone()
    negative_elbo(model, fam, mnist.train[:10], torch.arange(10), num_data=200, config=cfg.objective,
                  generator=torch.Generator().manual_seed(0), x_all=mnist.train).backward()
    for o in opts:
        o.step()
    assert not torch.equal(fam.loc.weight.detach()[10:], before[10:])


@pytest.mark.parametrize("family", ["factorized", "constant"])
def test_test_time_inference_improves_heldout_elbo_and_leaves_q_theta_unchanged(mnist, family):
    result = fit(config(family, epochs=2), mnist)
    theta_before = [p.detach().clone() for p in result.model.parameters()]
    fresh = result.family.for_new_data(100)
    g = torch.Generator().manual_seed(1)

    def heldout(fam):
        with torch.no_grad():
            return -sum(float(local_negative_elbo(result.model, fam, mnist.test, 8, g)) for _ in range(5)) / 5

    start = heldout(fresh)
    post = infer_local(result.model, result.family, mnist.test, LocalInferenceConfig(max_steps=400), g)
    assert post.steps > 0 and post.seconds > 0
    assert heldout(post.family) > start + 1.0
    for b, a in zip(theta_before, result.model.parameters()):
        assert torch.equal(a.detach(), b)
    assert all(p.requires_grad for p in result.model.parameters())  # restored after freezing


def test_eval_records_every_metric(mnist):
    result = fit(config("factorized", epochs=2, eval_every=1), mnist)
    evals = result.history.evals
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    for e in evals:
        for key in ("neg_elbo", "train_mse", "test_mse", "kl_z_per_image", "active_units",
                    "test_inference_steps", "test_inference_seconds", "test_neg_elbo_per_image", "wall_time", "step"):
            assert key in e and math.isfinite(e[key])
    assert len(result.history.step) == 2 * 4 and result.history.wall_time == sorted(result.history.wall_time)
    assert evals[-1]["neg_elbo"] < evals[0]["neg_elbo"]
    assert result.meta["torch"] and result.meta["cpu_count"]
    # The values, not only their presence, against what they are defined to be.
    n, d = mnist.train.shape[0], result.config.model.latent_dim
    for e in evals:
        assert e["neg_elbo"] == pytest.approx(-(e["log_lik"] - e["kl_z"] - e["kl_theta"]), rel=1e-5)
        assert e["kl_z_per_image"] == pytest.approx(e["kl_z"] / n, rel=1e-5)
        assert e["step"] == 4 * e["epoch"] and 0 <= e["active_units"] <= d
        assert 1 <= e["test_inference_steps"] <= result.config.train.test_inference.max_steps
    final = evals[-1]
    assert final["wall_time"] == result.history.wall_time[-1]
    # Train MSE at the final factors, recomputed with plain tensor operations.
    with torch.no_grad():
        h = result.family.loc.weight
        locs = result.model.loc
        for layer in range(0, len(locs) - 2, 2):
            h = torch.nn.functional.leaky_relu(h @ locs[layer].T + locs[layer + 1], 0.2)
        recon = h @ locs[-2].T + locs[-1]
    assert final["train_mse"] == pytest.approx(float(((recon - mnist.train) ** 2).mean()), rel=1e-5)


def test_reconstruction_mse_is_the_decoder_at_the_posterior_means(mnist):
    result = fit(config("amortized", epochs=1), mnist)
    with torch.no_grad():
        mu, _ = result.family.encode(mnist.train)
        h = mu
        for i in range(3):
            h = h @ result.model.loc[2 * i].T + result.model.loc[2 * i + 1]
            if i < 2:
                h = torch.nn.functional.leaky_relu(h, 0.2)
        want = float(((h - mnist.train) ** 2).mean())
    assert result.final_eval["train_mse"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("family", ["amortized", "factorized", "semi-amortized"])
def test_same_seed_same_numbers_other_seed_other_numbers(mnist, family):
    a = fit(config(family, epochs=2, refine_steps=2), mnist)
    b = fit(config(family, epochs=2, refine_steps=2), mnist)
    c = fit(config(family, epochs=2, refine_steps=2, seed=1), mnist)
    assert a.history.neg_elbo == b.history.neg_elbo
    assert [e["neg_elbo"] for e in a.history.evals] == [e["neg_elbo"] for e in b.history.evals]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert a.history.neg_elbo != c.history.neg_elbo


def test_nan_stops_with_the_step_named_and_last_good_state_kept(mnist, monkeypatch):
    import amortized_bayes.training as training

    x = mnist.train.clone()
    x[75, 3] = float("nan")  # in the second fixed batch of 50
    cfg = config("amortized", epochs=1, batches="fixed")
    # The evaluation before the first step would see the NaN first (and fail with
    # NonFiniteEvaluationError, tested below): stub it, to test the step's own guard.
    monkeypatch.setattr(training, "evaluate", lambda *args: ({"train_mse": 0.0}, None))
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 1\)") as info:
        fit(cfg, TrainingData(x, None))
    err = info.value
    assert err.step == 2 and err.result.steps_done == 1
    assert all(torch.isfinite(p).all() for p in err.result.model.parameters())
    # The kept state is exactly the state after step 1 of the same run on clean data.
    clean = fit(RunConfig(data=cfg.data, model=cfg.model, family=cfg.family, objective=cfg.objective,
                          train=TrainConfig(epochs=1, batch_size=50, batches="fixed", eval_every=1)),
                TrainingData(mnist.train[:50].repeat(4, 1), None))
    assert err.result.history.neg_elbo[0] == clean.history.neg_elbo[0]
    monkeypatch.undo()
    with pytest.raises(training.NonFiniteEvaluationError, match="epoch 0"):
        fit(cfg, TrainingData(x, None))


def test_semi_amortized_refinement_raises_the_local_elbo_and_trains_the_encoder(mnist):
    model = lg.make(D=8, d=3, obs_var=0.5, seed=2)
    x = model.sample(32, torch.Generator().manual_seed(0))
    decoder = model.decoder().requires_grad_(False)
    for backprop in (True, False):
        cfg = config("semi-amortized", refine_steps=10, refine_lr=0.05, refine_backprop=backprop)
        _, fam = build(RunConfig(data=DataConfig(n_train=32), model=model.model_config(), family=cfg.family), 32)
        refine = make_local_elbo(decoder, 64, torch.Generator().manual_seed(1))
        mu0, ls0 = fam.encode(x)
        mu, ls = fam.local_params(x, None, refine)
        assert float(model.elbo(x, mu, ls).sum().detach()) > float(model.elbo(x, mu0, ls0).sum().detach()) + 1.0
        (mu.sum() + ls.sum()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fam.parameters())


@pytest.mark.parametrize("family", ["amortized", "factorized", "constant", "semi-amortized"])
def test_save_load_and_infer_new_images(mnist, family, tmp_path):
    result = fit(config(family, epochs=1), mnist)
    path = save_fit(result, tmp_path / "model.pt")
    loaded = load_fit(path)
    for p, q in zip(result.model.parameters(), loaded.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(result.family.parameters(), loaded.family.parameters()):
        assert torch.equal(p, q)
    assert loaded.history.neg_elbo == result.history.neg_elbo and loaded.config == result.config
    new = load_split("mnist", "test", n=20).images
    post = loaded.infer(new, torch.Generator().manual_seed(0))
    assert post.mu.shape == (20, 8) and post.log_sigma.shape == (20, 8)
    assert (post.steps > 0) == (family in ("factorized", "constant"))
    if family == "amortized":
        torch.testing.assert_close(post.mu, result.family.encode(new)[0].detach())
    again = loaded.infer(new, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.mu, post.mu)  # same generator, same answer
    if family in ("factorized", "constant"):
        # Test-time inference improved the objective it optimises (the new images' local ELBO, theta
        # drawn from q(theta)) over its own starting point.
        start, fitted = loaded.family.for_new_data(20), loaded.family.for_new_data(20)
        with torch.no_grad():
            if family == "factorized":
                fitted.loc.weight.copy_(post.mu)
                fitted.log_sigma.weight.copy_(post.log_sigma)
            else:
                fitted.loc.copy_(post.mu[0])
                fitted.log_sigma.copy_(post.log_sigma[0])
            before = local_negative_elbo(loaded.model, start, new, 512, torch.Generator().manual_seed(1))
            after = local_negative_elbo(loaded.model, fitted, new, 512, torch.Generator().manual_seed(1))
        assert float(after) < float(before)
        rows_differ = bool((post.mu - post.mu[:1]).abs().max() > 1e-6)
        assert rows_differ == (family == "factorized")  # constant-VI: one factor shared by all images


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: family_config(name="nope"), "family.name"),
        (lambda: family_config(width=0), "family.width"),
        (lambda: DataConfig(n_train=60_001), "data.n_train"),
        (lambda: DataConfig(dataset="cifar"), "data.dataset"),
        (lambda: ObjectiveConfig(kind="legacy-2024", estimator="analytic"), "objective.estimator"),
        (lambda: ModelConfig(obs_var=0), "model.obs_var"),
        (lambda: RunConfig(data=DataConfig(n_train=100), train=TrainConfig(batch_size=101)), "train.batch_size"),
        (lambda: RunConfig.from_dict({"train": {"epoch": 3}}), "train.epoch"),
    ],
)
def test_invalid_configs_are_refused_with_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_config_round_trips_through_dict():
    cfg = config("semi-amortized", refine_steps=3, local_terms="all", kind="legacy-2024")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_weight_decay_is_explicit_and_refused_with_lazy_fvi():
    with pytest.raises(ValueError, match="weight_decay"):
        fit(config("factorized", batch_size=50, weight_decay=1e-4), TrainingData(torch.rand(200, 784)))


@pytest.mark.parametrize("duplicates", [False, True])
def test_lazy_adam_matches_torch_sparse_adam(duplicates):
    """The trainer's LazyAdam against the reference it replaces (torch.optim.SparseAdam): same values,
    same state, over steps with distinct rows (the trainer's batches) and with repeated rows."""
    from amortized_bayes.optim import LazyAdam

    g = torch.Generator().manual_seed(0)
    init = torch.randn(50, 4, generator=g)
    ours, ref = torch.nn.Embedding(50, 4, sparse=True), torch.nn.Embedding(50, 4, sparse=True)
    with torch.no_grad():
        ours.weight.copy_(init)
        ref.weight.copy_(init)
    opt_ours, opt_ref = LazyAdam(ours.parameters(), lr=0.05), torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    for _ in range(6):
        rows = torch.randint(0, 50, (20,), generator=g) if duplicates else torch.randperm(50, generator=g)[:20]
        target = torch.randn(20, 4, generator=g)
        for emb, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            ((emb(rows) - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    s_ours, s_ref = opt_ours.state[ours.weight], opt_ref.state[ref.weight]
    assert s_ours["step"] == s_ref["step"] == 6
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(s_ours[key], s_ref[key], rtol=1e-6, atol=1e-8)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[s_ref["exp_avg"].abs().sum(1) > 0] = False
    assert torch.equal(ours.weight[untouched], init[untouched])


def test_batch_data_views_consecutive_rows_and_gathers_the_rest():
    from amortized_bayes.training import batch_data

    x = torch.arange(60.0).reshape(20, 3)
    whole, idx = batch_data(x, torch.arange(20))
    assert idx is None and whole.data_ptr() == x.data_ptr()
    part, idx = batch_data(x, torch.arange(5, 9))
    assert torch.equal(idx, torch.arange(5, 9)) and torch.equal(part, x[5:9])
    assert part.data_ptr() == x[5].data_ptr()  # a view, no copy
    rows = torch.tensor([4, 1, 7])
    gathered, idx = batch_data(x, rows)
    assert torch.equal(gathered, x[rows]) and torch.equal(idx, rows)


def test_gradient_check_catches_every_non_finite_value_and_only_those():
    from amortized_bayes.training import _all_finite

    def param(grad):
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        return p

    assert _all_finite([param(torch.ones(5)), param(torch.zeros(3, 2))])
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.ones(5)
        g[2] = bad
        assert not _all_finite([param(torch.ones(3)), param(g)])
    # +inf and -inf sum to NaN; huge finite values overflow the sum to inf and must still pass.
    assert not _all_finite([param(torch.tensor([float("inf"), -float("inf")]))])
    assert _all_finite([param(torch.tensor([3e38, 3e38, 3e38]))])
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), (5, 2),
                                     check_invariants=True)
    assert not _all_finite([param(sparse)])
