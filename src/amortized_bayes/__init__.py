"""amortized-bayes: when does amortized VI reach factorized VI in Bayesian deep generative models,
how much faster is it, and how large is the amortization gap?

The Python API::

    from amortized_bayes import RunConfig, DataConfig, family_config, TrainConfig, fit, save_fit, load_fit
    result = fit(RunConfig(family=family_config(name="amortized", width=64), train=TrainConfig(epochs=20)))
    save_fit(result, "model.pt")
    posterior = load_fit("model.pt").infer(new_images)   # q(z) for new images, any family
"""

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "config", "DataConfig": "config", "ModelConfig": "config", "FamilyConfig": "config",
    "family_config": "config", "EncoderConfig": "config", "SemiAmortizedConfig": "config",
    "FreeFactorConfig": "config", "register_family": "families", "VariationalFamily": "families",
    "ObjectiveConfig": "config", "TrainConfig": "config", "LocalInferenceConfig": "config",
    "ConfigError": "config", "fit": "training", "FitResult": "training", "NonFiniteLossError": "training",
    "save_fit": "checkpoint", "load_fit": "checkpoint", "FittedModel": "checkpoint",
    "infer_local": "inference", "negative_elbo": "objectives",
}


def __getattr__(name: str):
    # Lazy, so that `amortized-bayes data ...` does not pay for importing the engine.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
