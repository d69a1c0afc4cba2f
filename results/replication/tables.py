"""The tables of docs/replication.md, recomputed from the stored results (nothing is retrained).

    python results/replication/tables.py results/replication/paper-e250 results/replication/replicate-2024-e250

For each results folder: the final metrics with A-VI / F-VI ratios (95% bootstrap intervals over
seeds); -ELBO per image and train MSE along training (medians over seeds); epochs and training
seconds to each tolerance in ``--tolerances`` with A-VI's speed-up over F-VI in both (seeds that never
reach a tolerance censored at their last evaluation, as in the report: ``analysis.speedup``); and, where
``amortized-bayes gap`` has measured the runs, the amortization gap per method.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from amortized_bayes.analysis import (AVI, FVI, censored_median, dataset_table, describe_ratio, first_crossing, gap_table,
                                      load_results, methods_of, speedup)

DATASETS = ("mnist", "fashion-mnist")
NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def final_table(results) -> list[str]:
    lines = ["| dataset | method | -ELBO/image | train MSE | test MSE | ms/step | -ELBO vs F-VI (95% CI) | "
             "train MSE vs F-VI (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        if dataset not in results.groups:
            continue
        table = dataset_table(results, dataset)
        for method, row in table.rows.items():
            cmp = table.comparisons.get(method)
            ratios = (f"{describe_ratio(cmp.elbo_ratio, cmp.elbo_ratio_ci, cmp.seeds)} | "
                      f"{describe_ratio(cmp.mse_ratio, cmp.mse_ratio_ci, cmp.seeds)}") if cmp else " | "
            lines.append(f"| {NAMES[dataset]} | {method} | {row.neg_elbo_per_image:.2f} | {row.train_mse:.4f} | "
                         f"{row.test_mse:.4f} | {1e3 * row.seconds_per_step:.1f} | {ratios} |")
    return lines


def _at_epoch(evals: list[dict], epoch: int, key: str) -> float:
    for e in evals:
        if e["epoch"] == epoch:
            return e[key]
    return math.nan


def trajectory_table(results, key: str, scale_by_n: bool, epochs: list[int], digits: int) -> list[str]:
    lines = ["| dataset | method | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|" + "---|" * len(epochs)]
    for dataset in DATASETS:
        for label, runs in methods_of(results.groups.get(dataset, {})):
            cells = []
            for epoch in epochs:
                values = [_at_epoch(r.curve(key), epoch, key) / (r.n if scale_by_n else 1) for r in runs]
                median = float(np.median(values))
                cells.append("-" if math.isnan(median) else f"{median:.{digits}f}")
            lines.append(f"| {NAMES[dataset]} | {label} | " + " | ".join(cells) + " |")
    return lines


def _crossings(runs, tol: float) -> list:
    return [c for c in (first_crossing(r.curve("train_mse"), "train_mse", tol) for r in runs) if c is not None]


def _median_reached(crossings: list, unit: str) -> str:
    reached = sum(c.reached for c in crossings)
    lower, upper = censored_median([getattr(c, unit) for c in crossings], [c.reached for c in crossings])
    # Seeds that never reached the tolerance are censored at their last evaluation: where they decide
    # the median, it is at least the value shown.
    text = f"{upper:.0f}" if math.isfinite(upper) else (f">= {lower:.0f}" if reached < len(crossings) else "-")
    if reached == 0:
        text = f"never (>= {lower:.0f})"
    return f"{text} ({reached}/{len(crossings)})"


def tolerance_table(results, tolerances: list[float]) -> list[str]:
    lines = ["| dataset | train MSE <= | method | epochs to tol (seeds reaching) | seconds to tol | "
             "speed-up vs F-VI, epochs (95% CI) | speed-up vs F-VI, seconds (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        methods = methods_of(results.groups.get(dataset, {}))
        fvi = {m.objective: runs for m, runs in methods if m.family == FVI}  # A-VI against F-VI of its objective
        for tol in tolerances:
            for label, runs in methods:
                cross = _crossings(runs, tol)
                f_cross = _crossings(fvi[label.objective], tol) if label.objective in fvi else []
                if label.family == AVI and f_cross and cross:
                    speed = (f"{speedup(f_cross, cross, 'epochs').describe()} | "
                             f"{speedup(f_cross, cross, 'seconds').describe()}")
                else:
                    speed = " | "
                lines.append(f"| {NAMES[dataset]} | {tol:g} | {label} | {_median_reached(cross, 'epochs')} | "
                             f"{_median_reached(cross, 'seconds')} | {speed} |")
    return lines


def gap_lines(results) -> list[str]:
    tables = {dataset: gap_table(results, dataset) for dataset in DATASETS if dataset in results.groups}
    if not any(tables.values()):
        return []
    lines = ["| dataset | method | amortization gap, train | amortization gap, test | approximation gap "
             "(IWAE), train / test |", "|---|---|---|---|---|"]
    for dataset, table in tables.items():
        for label, row in table.items():
            cells = []
            for split in ("train", "test"):
                g = row["splits"].get(split, {}).get("amortization_gap")
                cells.append(f"{g['median']:.2f} [{g['min']:.2f}, {g['max']:.2f}]" if g else "-")
            approx = [row["splits"].get(split, {}).get("approximation_gap") for split in ("train", "test")]
            approx_text = " / ".join(f"{a['median']:.2f}" if a else "-" for a in approx)
            lines.append(f"| {NAMES[dataset]} | {label} | {cells[0]} | {cells[1]} | {approx_text} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="results folders (as written by `run` or collect.sh)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.07, 0.05, 0.03],
                        help="train-MSE tolerances (default 0.1 0.07 0.05 0.03)")
    parser.add_argument("--every", type=int, default=50, help="epochs between trajectory columns (default 50)")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="the trajectory columns' epochs (instead of --every)")
    args = parser.parse_args()
    for folder in args.folders:
        results = load_results(folder)
        name = results.grid.get("name", folder)
        last = max(e["epoch"] for by in results.groups.values() for runs in by.values() for r in runs for e in r.evals)
        epochs = sorted(set(args.epochs)) if args.epochs else sorted({10, *range(args.every, last + 1, args.every), last})
        print(f"## {name}\n\n### Final metrics (epoch {last})\n")
        print("\n".join(final_table(results)))
        print("\n### -ELBO per image along training\n")
        print("\n".join(trajectory_table(results, "neg_elbo", True, epochs, 2)))
        print("\n### Train MSE along training\n")
        print("\n".join(trajectory_table(results, "train_mse", False, epochs, 4)))
        print("\n### Epochs and seconds to a train-MSE tolerance\n")
        print("\n".join(tolerance_table(results, args.tolerances)))
        gaps = gap_lines(results)
        if gaps:
            print("\n### Amortization gap (nats per image, median over seeds [range])\n")
            print("\n".join(gaps))
        print()


if __name__ == "__main__":
    main()
