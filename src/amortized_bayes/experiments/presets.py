"""The named grids of SPEC §6. Values of ``quick`` were chosen by measurement (see docs/experiments.md)."""

from __future__ import annotations

from .grid import Grid

WIDTHS = [1, 64, 128, 256]
SAVI_64 = {"family": {"name": "semi-amortized", "width": 64}}


def _families(widths: list[int], extra: list[dict] | None = None) -> list[dict]:
    out = [{"family": {"name": "amortized", "width": k}} for k in widths]
    out += [{"family": {"name": "factorized"}}, {"family": {"name": "constant"}}]
    return out + (extra or [])


# The published code's starting point (its vae.ipynb): q(theta)'s means exactly 0 (log sd -2, the
# default), the encoder with PyTorch's Linear init, F-VI's means ~ N(0, 1) and log sds ~ N(-1, 1) per
# image and dimension, constant-VI's ~ N(0, 1) and N(0, 1), and a random 10,000 of the 60,000 training
# images (its first batch of a shuffled loader; here a subset seeded by data.subset_seed, recorded in
# every run's config). Started instead from PyTorch's layer init and zero factors, F-VI sits on the
# symmetric point z = 0 for hundreds of epochs (train MSE 0.898 at epoch 100 on Fashion-MNIST, where
# the published runs are near 0.1).
PUBLISHED_INIT_BASE: dict[str, dict] = {"data": {"subset": "random", "subset_seed": 0}, "model": {"init_loc": "zero"}}
PUBLISHED_INIT_FAMILY = {
    "factorized": {"init_loc_sd": 1.0, "init_log_scale": -1.0, "init_log_scale_sd": 1.0},
    "constant": {"init_loc_sd": 1.0, "init_log_scale": 0.0, "init_log_scale_sd": 1.0},
}


def _paper(datasets: list[str], *, kind: str = "elbo", savi: bool = True, epochs: int = 5000, seeds: int = 10,
           eval_every: int = 50, mse_every: int = 0, published_init: bool = False, name: str,
           description: str) -> Grid:
    base: dict[str, dict] = {
        "data": {"n_train": 10_000, "n_test": 10_000},
        "model": {"latent_dim": 64, "hidden": 256, "depth": 2, "obs_var": 1.0},
        "family": {"depth": 2},
        "objective": {"kind": kind, "estimator": "mc", "local_terms": "all", "num_samples": 1},
        "train": {"epochs": epochs, "batch_size": 1000, "batches": "fixed", "lr": 1e-3,
                  "eval_every": eval_every},
    }
    if mse_every:
        base["train"]["mse_every"] = mse_every
    variants = _families(WIDTHS, [SAVI_64] if savi else None)
    if published_init:
        for section, values in PUBLISHED_INIT_BASE.items():
            base[section].update(values)
        for variant in variants:
            variant["family"].update(PUBLISHED_INIT_FAMILY.get(variant["family"]["name"], {}))
    return Grid(
        name=name,
        description=description,
        base=base,
        axes={"data.dataset": datasets, "train.seed": list(range(seeds))},
        variants=variants,
        tolerance={"metric": "train_mse", "mnist": 0.03, "fashion-mnist": 0.03},
    )


def _small(grid: Grid, name: str, epochs: int, seeds: int, eval_every: int) -> Grid:
    small = grid.with_overrides({"train.epochs": epochs, "train.seed": list(range(seeds)),
                                 "train.eval_every": eval_every})
    small.name = name
    small.description = f"{grid.description} Reduced to {epochs} epochs and {seeds} seeds, runnable on a laptop."
    return small


QUICK = Grid(
    name="quick",
    description=(
        "MNIST, N = 1,000 images binarised at 0.5 with a Bernoulli likelihood, A-VI k = 1, 64, 256, "
        "F-VI, constant-VI and SA-VI (k = 64, K = 5 refinement steps of 0.1), full batch, Adam 3e-3, "
        "1,000 epochs, 2 seeds; q(theta) starts at "
        "log sd -5. Chosen by measurement (docs/experiments.md): with the Gaussian likelihood of variance 1 "
        "(or 0.1) "
        "the posterior of z collapses and every family looks alike, and with q(theta)'s default log sd "
        "-2 the decoder is mostly noise for the first thousand steps."
    ),
    base={
        "data": {"dataset": "mnist", "n_train": 1000, "n_test": 500, "binarize": "threshold"},
        "model": {"likelihood": "bernoulli", "init_log_scale": -5.0},
        "objective": {"estimator": "analytic", "local_terms": "batch"},
        "train": {"epochs": 1000, "batch_size": None, "lr": 3e-3, "eval_every": 50},
    },
    axes={"train.seed": [0, 1]},
    variants=_families([1, 64, 256], [SAVI_64]),
    tolerance={"metric": "train_mse", "mnist": 0.04},
)

PAPER = _paper(["fashion-mnist", "mnist"], name="paper",
               description="The published experiment (SPEC §6) with the correct ELBO, both datasets, plus "
               "SA-VI (k = 64, K = 5) beside A-VI and F-VI.")
PAPER_MNIST = _paper(["mnist"], name="paper-mnist",
                     description="The published experiment on MNIST with the correct ELBO, plus SA-VI (k = 64, K = 5).")
PAPER_FASHION = _paper(["fashion-mnist"], name="paper-fashion-mnist",
                       description="The published experiment on Fashion-MNIST with the correct ELBO, plus SA-VI "
                       "(k = 64, K = 5).")
# Full evaluations (test-time inference of F-VI and constant-VI on all 10,000 test images: ~30 s each
# here) every 250 epochs; the train MSE, which the study's claims are about, after every epoch as the
# published code records it.
REPLICATE = _paper(["fashion-mnist", "mnist"], kind="legacy-2024", savi=False, eval_every=250, mse_every=1,
                   published_init=True, name="replicate-2024",
                   description="The published experiment with the published code's objective (legacy-2024, "
                   "not an ELBO) and its starting point (q(theta) means 0, F-VI and constant-VI factors "
                   "drawn at random, a seeded random 10,000 training images), for number-for-number "
                   "replication.")

def _when_and_why(regime: dict[str, dict], description: str) -> Grid:
    """The tool's own question (issue 17): the correct ELBO with the standard unbiased minibatch
    estimator (reshuffled batches of 1,000, each image's local terms in its batch, so an F-VI factor
    moves once per epoch), N = 10,000, both datasets, A-VI k = 1, 64, 256, F-VI, constant-VI, and SA-VI
    (k = 64) on Fashion-MNIST only, Adam 1e-3, 5,000 epochs, 2 seeds, all 10,000 test images, in the
    likelihood regime ``regime`` (model and data fields) chosen by results/findings/regime*.toml.
    Datasets are variants rather than an axis, so that SA-VI can be on one of them only; ``--only
    data.dataset=mnist --only train.seed=0`` selects one dataset's seed with the same run ids."""
    base = {
        "data": {"n_train": 10_000, "n_test": 10_000, **regime.get("data", {})},
        "model": {"latent_dim": 64, "hidden": 256, "depth": 2, **regime.get("model", {})},
        "family": {"depth": 2},
        "objective": {"kind": "elbo", "estimator": "mc", "local_terms": "batch", "num_samples": 1},
        "train": {"epochs": 5000, "batch_size": 1000, "batches": "shuffled", "lr": 1e-3, "eval_every": 250,
                  "mse_every": 10},
    }
    variants = []
    for dataset in ("fashion-mnist", "mnist"):
        for family in _families([1, 64, 256], [SAVI_64] if dataset == "fashion-mnist" else None):
            variants.append({**family, "data": {"dataset": dataset}})
    return Grid(name="when-and-why", description=description, base=base, axes={"train.seed": [0, 1]},
                variants=variants, tolerance={"metric": "train_mse"})


# Chosen by measurement (results/findings/regime*.toml, docs/findings.md): with q(theta) started at log
# sd -2, no Gaussian setting used more than one latent unit after 300 epochs (q(theta)'s noise swamps the
# decoder); started at -5, the Gaussian at sigma_x^2 = 0.03 used 44 of 64 units on Fashion-MNIST and 27 on
# MNIST with a train MSE 6x below the mean image's, the most of the settings measured on Fashion-MNIST.
WHEN_AND_WHY_REGIME = {"model": {"obs_var": 0.03, "init_log_scale": -5.0}}
WHEN_AND_WHY = _when_and_why(
    WHEN_AND_WHY_REGIME,
    "The tool's own answer (docs/findings.md): the correct ELBO with the standard minibatch estimator "
    "(reshuffled batches of 1,000, local terms of the batch), N = 10,000, all 10,000 test images, Gaussian "
    "likelihood with sigma_x^2 = 0.03 and q(theta) started at log sd -5 (the regime where the latents are "
    "used, chosen by measurement), A-VI k = 1, 64, 256, F-VI, constant-VI, SA-VI (k = 64, Fashion-MNIST "
    "only), Adam 1e-3, 5,000 epochs, 2 seeds. Tolerance: train MSE 0.02, fixed before the runs.")
WHEN_AND_WHY.tolerance.update({"fashion-mnist": 0.02, "mnist": 0.02})
WHEN_AND_WHY_SMALL = WHEN_AND_WHY.with_overrides({"train.epochs": 100, "train.seed": [0], "train.eval_every": 10,
                                                  "train.mse_every": 1, "data.n_test": 1000})
WHEN_AND_WHY_SMALL.name = "when-and-why-small"
WHEN_AND_WHY_SMALL.description = (WHEN_AND_WHY.description + " Reduced to 100 epochs, one seed and 1,000 test "
                                  "images, runnable on a laptop.")



def _mlp_vs_conv() -> Grid:
    """Issue 20's experiment: the fully connected model against the convolutional one at an equal
    training budget, on Fashion-MNIST, in the regime of the tool's own answer (WHEN_AND_WHY_REGIME,
    the correct ELBO, reshuffled minibatches of 1,000). For each architecture (encoder and decoder
    alike): A-VI k = 16 and 64 (units, or channels), F-VI and constant-VI. The conv decoder has 16
    channels (z -> 32 x 7 x 7 -> 16 x 14 x 14 -> 1 x 28 x 28; its step costs about 5x the MLP's here,
    so the budget is 500 epochs and one seed); 2,000 test images."""
    base = {
        "data": {"dataset": "fashion-mnist", "n_train": 10_000, "n_test": 2_000},
        "model": {"latent_dim": 64, "hidden": 256, "depth": 2, "channels": 16, **WHEN_AND_WHY_REGIME["model"]},
        "family": {"depth": 2},
        "objective": {"kind": "elbo", "estimator": "mc", "local_terms": "batch", "num_samples": 1},
        "train": {"epochs": 500, "batch_size": 1000, "batches": "shuffled", "lr": 1e-3, "eval_every": 50,
                  "mse_every": 5, "seed": 0},
    }
    variants = []
    for architecture in ("conv", "mlp"):  # the slow conv runs first, so that 2 workers finish together
        for family in _families([16, 64]):
            if family["family"]["name"] == "amortized":
                family = {"family": {**family["family"], "architecture": architecture}}
            variants.append({**family, "model": {"architecture": architecture}})
    tolerance = {"metric": "train_mse", "fashion-mnist": 0.03}
    return Grid(name="mlp-vs-conv", base=base, variants=variants, tolerance=tolerance,
                description="Fully connected against convolutional encoder and decoder at an equal budget "
                "(docs/findings.md): Fashion-MNIST, N = 10,000, 2,000 test images, Gaussian likelihood with "
                "sigma_x^2 = 0.03 and q(theta) started at log sd -5, the correct ELBO with reshuffled batches "
                "of 1,000, A-VI k = 16 and 64 (units or channels), F-VI and constant-VI with each decoder, "
                "Adam 1e-3, 500 epochs, one seed. Tolerance: train MSE 0.03, fixed before the runs.")


MLP_VS_CONV = _mlp_vs_conv()
MLP_VS_CONV_SMALL = MLP_VS_CONV.with_overrides({"train.epochs": 30, "data.n_train": 1000, "data.n_test": 200,
                                                "train.eval_every": 10, "train.mse_every": 1})
MLP_VS_CONV_SMALL.name = "mlp-vs-conv-small"
MLP_VS_CONV_SMALL.description = MLP_VS_CONV.description + " Reduced to 1,000 images and 30 epochs for a laptop."

PRESETS: dict[str, Grid] = {g.name: g for g in [
    WHEN_AND_WHY, WHEN_AND_WHY_SMALL, MLP_VS_CONV, MLP_VS_CONV_SMALL,
    QUICK, PAPER, PAPER_MNIST, PAPER_FASHION, REPLICATE,
    _small(PAPER, "paper-small", epochs=100, seeds=2, eval_every=10),
    _small(PAPER_MNIST, "paper-mnist-small", epochs=100, seeds=2, eval_every=10),
    _small(PAPER_FASHION, "paper-fashion-mnist-small", epochs=100, seeds=2, eval_every=10),
    _small(REPLICATE, "replicate-2024-small", epochs=100, seeds=2, eval_every=10),
]}


def get_preset(name: str) -> Grid:
    from ..config import ConfigError

    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
