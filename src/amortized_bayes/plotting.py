"""Figures of SPEC §7 from stored results (no retraining). Each figure is saved as PNG and SVG.

Seeds are aggregated as the median with a band (min to max over seeds), and each seed's own line is
drawn faintly when there are at most five. One colour per method across every figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402
import torch  # noqa: E402

from .analysis import DatasetTable, Method, Results, methods_of  # noqa: E402
from .data.user_dataset import test_split_size  # noqa: E402

FEW_SEEDS = 5
PALETTE = [plt.get_cmap("tab10")(i) for i in range(10)]


def colours(results: Results) -> dict[str, tuple]:
    """One colour per method (its label) across every dataset's figures, in table order."""
    methods = sorted({m for g in results.groups.values() for m, _ in methods_of(g)}, key=lambda m: m.order)
    return {str(m): PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


CAPTIONS = {
    "elbo": "-ELBO per image (the per-step minibatch estimate) against training steps (left) and training "
            "seconds (right): median over seeds, the range shaded, each seed faint.",
    "mse": "Reconstruction MSE at the variational means (log scale) against epochs, on the training images (left) and "
           "the test images (right); the dashed line is the grid's tolerance.",
    "tolerance": "Epochs (left) and training seconds (right) each seed took to first reach the tolerance; a "
                 "cross marks seeds that never reached it within their run.",
    "reconstructions": "Training and test images (first row) and each method's reconstruction of them at the "
                       "variational means.",
    "gap": "Left: the amortization gap ELBO_x(q*) - ELBO_x(q) per method against encoder width (F-VI and "
           "constant-VI as lines), train and test images. Right: how fast local Adam steps close it from "
           "each method's q, and from the prior (what F-VI pays per new image).",
}


def caption(figure: Path) -> str:
    """The sentence saying what a figure shows (its file is ``<dataset>-<kind>.png``)."""
    dataset, _, kind = figure.stem.rpartition("-")
    return f"{dataset}: {CAPTIONS[kind]}" if kind in CAPTIONS else figure.stem


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _band(ax, x, ys, colour, label, per_seed: bool):
    ys = np.asarray(ys, dtype=float)
    ax.plot(x, np.median(ys, axis=0), color=colour, label=label, lw=1.8)
    if ys.shape[0] > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=colour, alpha=0.18, lw=0)
        if per_seed and ys.shape[0] <= FEW_SEEDS:
            for y in ys:
                ax.plot(x, y, color=colour, lw=0.5, alpha=0.45)


def _thin(n: int, limit: int = 2000) -> np.ndarray:
    """Indices of at most ``limit`` points, log-spaced so the early steps keep their detail."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, limit).astype(int) - 1)


def elbo_curves(results: Results, dataset: str, out: Path) -> list[Path]:
    """-ELBO per image (per-step minibatch estimate) against steps and against training seconds."""
    col = colours(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    positive = True
    for label, runs in methods_of(results.groups[dataset]):
        length = min(len(r.steps["step"]) for r in runs)
        if length == 0:
            continue
        idx = _thin(length)
        ys = [np.asarray(r.steps["neg_elbo"][:length])[idx] / r.n for r in runs]
        positive &= bool(np.all(np.asarray(ys) > 0))
        steps = np.asarray(runs[0].steps["step"][:length])[idx]
        times = np.median([np.asarray(r.steps["wall_time"][:length])[idx] for r in runs], axis=0)
        _band(a1, steps, ys, col[label], label, True)
        _band(a2, times, ys, col[label], label, True)
    for ax, xlabel in ((a1, "training step"), (a2, "training wall time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log" if positive else "symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("-ELBO per image (nats)")
        ax.grid(alpha=0.3, which="both")
    a1.set_title(f"{dataset}: -ELBO against steps")
    a2.set_title(f"{dataset}: -ELBO against wall time")
    a2.legend(fontsize=8, frameon=False)
    return _save(fig, out, f"{dataset}-elbo")


def mse_curves(results: Results, dataset: str, out: Path) -> list[Path]:
    """Train and test reconstruction MSE against epochs: the evaluation points, and for the train MSE
    every traced epoch where the runs have a trace (``train.mse_every``)."""
    col = colours(results)
    metric, tol = results.tolerance(dataset)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for key, ax in zip(("train_mse", "test_mse"), axes):
        for label, runs in methods_of(results.groups[dataset]):
            curves = [r.curve(key) for r in runs]
            length = min(len(c) for c in curves)
            if length == 0:
                continue
            epochs = [e["epoch"] for e in curves[0][:length]]
            _band(ax, epochs, [[e[key] for e in c[:length]] for c in curves], col[label], label, True)
        if tol is not None and key == metric:
            ax.axhline(tol, color="black", ls="--", lw=0.8, label=f"tolerance {tol}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("reconstruction MSE (per pixel, pixels in [0, 1])")
        ax.set_title(f"{dataset}: {'train' if key == 'train_mse' else 'test'} MSE")
        # Log scale: the MSEs fall from the mean image's (~0.1-0.2) to 0.01 and below, and the end of the
        # runs, where the families differ by 10-50%, is unreadable on a linear axis.
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.02 rather than 2 x 10^-2
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3, which="both")
    axes[1].tick_params(which="both", labelleft=True)  # shared y: the test panel keeps its own tick labels
    axes[1].legend(fontsize=8, frameon=False)
    return _save(fig, out, f"{dataset}-mse")


def tolerance_boxes(results: Results, dataset: str, out: Path, table: DatasetTable) -> list[Path]:
    """Epochs and seconds to tolerance per method; seeds that never reach it are shown as such."""
    col = colours(results)
    labels = list(table.rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for key, ax, unit in (("epochs_to_tol", axes[0], "epochs"), ("seconds_to_tol", axes[1], "training seconds")):
        reached = [[getattr(s, key) for s in table.rows[m].per_seed if getattr(s, key) is not None] for m in labels]
        finite = [v for vals in reached for v in vals]
        top = max(finite) * 1.15 if finite else 1.0
        for i, (m, vals) in enumerate(zip(labels, reached)):
            if vals:
                ax.boxplot([vals], positions=[i], widths=0.5, patch_artist=True,
                           boxprops={"facecolor": col[m], "alpha": 0.5}, medianprops={"color": "black"})
                ax.scatter([i] * len(vals), vals, color=col[m], s=12, zorder=3)
            never = table.rows[m].seeds - len(vals)
            if never:
                ax.scatter([i], [top], marker="x", color=col[m], s=40, zorder=3)
                ax.annotate(f"never\n({never}/{table.rows[m].seeds})", (i, top), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 4), textcoords="offset points")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel(f"{unit} to {table.metric} <= {table.tolerance}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{dataset}: time to tolerance")
    return _save(fig, out, f"{dataset}-tolerance")


def reconstructions(results: Results, dataset: str, out: Path, count: int = 8) -> list[Path]:
    """Originals, then one row per method (its first seed's fitted model), train and test images."""
    from .checkpoint import load_fit
    from .data import load_run_split

    methods = methods_of(results.groups[dataset])
    first = methods[0][1][0].config.data
    # The first images of the run's own training subset: rows 0..count-1 of its F-VI factors.
    # A file dataset may hold fewer images than a row shows: both rows then show as many as both splits have.
    count = min(count, first.n_train or count, test_split_size(first))
    train = load_run_split(first, "train").images[:count]
    test = load_run_split(first, "test", n=count).images
    height, width = first.image_shape
    rows: list[tuple[str, torch.Tensor, torch.Tensor]] = [("original", train, test)]
    for method, runs in methods:
        fitted = load_fit(runs[0].files.model)
        with torch.no_grad():
            mu_train = fitted.family.local_params(train, torch.arange(count), None)[0] \
                if not fitted.family.amortized else fitted.infer(train).mu
        mu_test = fitted.infer(test, torch.Generator().manual_seed(0)).mu
        with torch.no_grad():
            rows.append((str(method), fitted.model.reconstruct(mu_train), fitted.model.reconstruct(mu_test)))
    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * count * 0.55 + 1.5, len(rows) * 0.75 + 0.6))
    for r, (label, tr, te) in enumerate(rows):
        for c, images in enumerate((tr, te)):
            strip = images.clamp(0, 1).reshape(count, height, width).permute(1, 0, 2).reshape(height, count * width)
            ax = axes[r, c]
            ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title("train images" if c == 0 else "test images", fontsize=9)
    fig.suptitle(f"{dataset}: reconstructions Ω(E[z]; E[θ]) (first seed of each method)", fontsize=10)
    return _save(fig, out, f"{dataset}-reconstructions")


def gap_figure(results: Results, dataset: str, out: Path, gaps: dict[Method, dict]) -> list[Path]:
    """Left: the amortization gap (nats per image) against encoder width, train and test; the
    non-amortized families as horizontal reference lines. Right: the test images' (else train) mean
    remaining gap to q* after n local Adam steps, from each method's own q (the refinement curve,
    solid) and from the prior (fitting a factorized q from scratch, dashed; first seed only)."""
    col = colours(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    # A-VI as one line over its widths; another family with an encoder as points at its width; a family
    # without one as a horizontal line.
    amortized = sorted((m for m in gaps if m.family == "amortized" and m.width), key=lambda m: m.width or 0)
    for split, style in (("train", "o--"), ("test", "s-")):
        xs, ys, lo, hi = [], [], [], []
        for m in amortized:
            cell = gaps[m]["splits"].get(split, {}).get("amortization_gap")
            if cell:
                xs.append(m.width)
                ys.append(cell["median"])
                lo.append(cell["median"] - cell["min"])
                hi.append(cell["max"] - cell["median"])
        if xs:
            a1.errorbar(xs, ys, yerr=[lo, hi], fmt=style, color="black", capsize=3, label=f"A-VI, {split}")
        for m, row in gaps.items():
            cell = row["splits"].get(split, {}).get("amortization_gap")
            if not cell or m in amortized:
                continue
            if m.width:
                a1.scatter([m.width], [cell["median"]], marker="o" if split == "train" else "s", color=col[m],
                           zorder=3, label=f"{m}, {split}")
            else:
                a1.axhline(cell["median"], color=col[m], ls="--" if split == "train" else "-", lw=1.2,
                           label=f"{m}, {split}")
    a1.set_xscale("log", base=2)
    a1.set_yscale("symlog", linthresh=1.0)
    a1.set_xlabel("encoder width k")
    a1.set_ylabel("amortization gap (nats per image)")
    a1.set_title(f"{dataset}: ELBO_x(q*) - ELBO_x(q), median over seeds (bars: range)", fontsize=9)
    a1.grid(alpha=0.3, which="both")
    # Legends below the axes: inside, they covered the points they name.
    a1.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    scratch_drawn = False
    for m, runs in methods_of(results.groups.get(dataset, {})):
        run = next((r for r in runs if r.gap), None)
        if run is None or run.gap is None:
            continue
        splits = run.gap["splits"]
        s = splits.get("test") or splits.get("train")
        star = s["elbo_q_star"]["mean"]
        for key, ls in (("refinement_curve", "-"), ("scratch_curve", ":")):
            if key == "scratch_curve" and scratch_drawn:
                continue
            curve = s[key]
            x = np.array([c["steps"] for c in curve], dtype=float)
            y = np.maximum(np.array([star - c["elbo_mean"] for c in curve]), 1e-3)
            a2.plot(x, y, ls, marker=".", color=col[m] if key == "refinement_curve" else "grey",
                    label=m if key == "refinement_curve" else f"from the prior (scratch; {m}'s theta)")
            scratch_drawn |= key == "scratch_curve"
    a2.set_xscale("symlog", linthresh=1.0)
    a2.set_yscale("log")
    a2.set_xlabel("local Adam steps (theta fixed)")
    a2.set_ylabel("ELBO_x(q*) - ELBO_x (nats per image)")
    a2.set_title(f"{dataset}: refinement from each method's q (test images)", fontsize=9)
    a2.grid(alpha=0.3, which="both")
    a2.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    return _save(fig, out, f"{dataset}-gap")

