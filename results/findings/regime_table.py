"""The regime table of docs/findings.md (issue 17, part 1), from a results folder of
``results/findings/regime.toml``: per dataset, likelihood setting and family, the last evaluation's
active units, KL(q(z) || p(z)) per image, train MSE beside the mean image's, -ELBO per image and, for a
learned sigma_x^2, its value. Nothing is retrained.

    python results/findings/regime_table.py RESULTS_DIR

The report groups runs by family only; here each run is labelled by its likelihood setting, which the
run id does not spell out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from amortized_bayes.experiments.store import ResultStore, read_evals


def setting(config) -> str:
    """The likelihood setting of a run, as the table names it."""
    m = config.model
    if m.likelihood == "bernoulli":
        return f"Bernoulli, binarised ({config.data.binarize})"
    if m.obs_var == "learned":
        return "Gaussian, sigma_x^2 learned"
    return f"Gaussian, sigma_x^2 = {m.obs_var:g}"


def mean_image_mse(dataset: str, n_train: int, binarize: str) -> float:
    """MSE of the per-pixel mean of the training images (the best constant prediction), on the same
    images the runs train on (first ``n_train``, binarised as they are)."""
    from amortized_bayes.data import load_split

    x = load_split(dataset, "train", n=n_train, binarize=binarize).images
    return float(((x - x.mean(0, keepdim=True)) ** 2).mean())


def rows(root: Path) -> list[dict]:
    out, baseline = [], {}
    for record in ResultStore(root).records():
        if record.state != "done":
            continue
        c = record.config
        evals = read_evals(record.path)
        last = evals[-1]
        key = (c.data.dataset, c.data.n_train, c.data.binarize)
        if key not in baseline:
            baseline[key] = mean_image_mse(*key)
        n = c.data.n_train or 60_000
        out.append({
            "dataset": c.data.dataset, "setting": setting(c),
            "family": f"A-VI k={c.family.width}" if c.family.name == "amortized" else
                      {"factorized": "F-VI", "constant": "constant-VI"}.get(c.family.name, c.family.name),
            "epoch": last["epoch"], "active_units": last["active_units"], "kl_z_per_image": last["kl_z_per_image"],
            "train_mse": last["train_mse"], "mean_image_mse": baseline[key],
            "neg_elbo_per_image": last["neg_elbo"] / n, "obs_var": last.get("obs_var", math.nan),
        })
    return sorted(out, key=lambda r: (r["dataset"], r["setting"], r["family"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("| dataset | likelihood | family | epoch | active units (of d) | KL(q(z)||p) per image | train MSE | "
          "mean image's MSE | -ELBO/image | learned sigma_x^2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows(args.folder):
        var = "-" if math.isnan(r["obs_var"]) else f"{r['obs_var']:.4f}"
        print(f"| {r['dataset']} | {r['setting']} | {r['family']} | {r['epoch']} | {r['active_units']} | "
              f"{r['kl_z_per_image']:.2f} | {r['train_mse']:.4f} | {r['mean_image_mse']:.4f} | "
              f"{r['neg_elbo_per_image']:.2f} | {var} |")


if __name__ == "__main__":
    main()
