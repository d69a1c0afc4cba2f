"""What a few local steps buy back of the amortization gap (docs/findings.md §3), from the gap.json files
of a results folder (``amortized-bayes gap DIR`` writes them; nothing is recomputed): per run and split,
the amortization gap, the share of it that K refinement steps close (Adam on the image's own ELBO,
started at the family's q, as the gap's refinement curve records it), and what fitting q(z) from the prior
costs until it reaches the family's ELBO (what F-VI pays for an image it has never seen).

    python results/findings/gap_curves.py RESULTS_DIR

The share closed after K steps is (ELBO after K - ELBO at the family's q) / (ELBO at q* - ELBO at the
family's q), each the mean over the split's images; 1 is the whole gap, and the refinement can pass 1
only through the Monte Carlo error of the ELBO estimates. The seconds are those of the whole split's
images optimised together (one batch), divided by their number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amortized_bayes.analysis import method_of
from amortized_bayes.experiments.store import ResultStore

STEPS = (1, 5, 10, 50, 200)
FAMILY_ORDER = {"amortized": 0, "semi-amortized": 1, "factorized": 2, "constant": 3}  # the report's order


def share_closed(split: dict, steps: int) -> float | None:
    """The mean share of the amortization gap that ``steps`` refinement steps close (None when the curve
    has no point at ``steps`` or there is no gap to close)."""
    start = split["elbo_family"]["mean"]
    gap = split["elbo_q_star"]["mean"] - start
    point = next((p for p in split["refinement_curve"] if p["steps"] == steps), None)
    if point is None or gap <= 0:
        return None
    return (point["elbo_mean"] - start) / gap


def rows(root: Path) -> list[dict]:
    out = []
    for record in ResultStore(root).records():
        path = record.path / "gap.json"
        if not path.is_file():
            continue
        gap = json.loads(path.read_text())
        for name, split in gap["splits"].items():
            images = split["images"]
            scratch = split.get("scratch_to_family_elbo")
            out.append({
                "dataset": record.config.data.label, "method": str(method_of(record.config)),
                "order": (FAMILY_ORDER.get(record.config.family.name, len(FAMILY_ORDER)),
                          getattr(record.config.family, "width", 0)),
                "seed": record.config.train.seed, "split": name,
                "gap": split["amortization_gap"]["mean"], "gap_se": split["amortization_gap"]["se"],
                "shares": {k: share_closed(split, k) for k in STEPS},
                "scratch_steps": scratch["steps"] if scratch else None,
                "scratch_ms_per_image": 1000 * scratch["seconds"] / images if scratch else None,
                "q_star_ms_per_image": 1000 * split["q_star_cost_from_prior"]["seconds"] / images,
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    table = rows(args.results)
    if not table:
        raise SystemExit(f"no gap.json under {args.results}/runs (run `amortized-bayes gap` first)")
    print("| dataset | method | seed | split | amortization gap (nats) | "
          + " | ".join(f"closed by {k} step{'s' * (k > 1)}" for k in STEPS)
          + " | from the prior to the family's ELBO: steps, ms per image | q* from the prior, ms per image |")
    print("|" + "---|" * (7 + len(STEPS)))
    for r in sorted(table, key=lambda r: (r["dataset"], r["order"], r["method"], r["seed"], r["split"] != "train")):
        shares = " | ".join("-" if s is None else f"{100 * s:.0f}%" for s in r["shares"].values())
        scratch = ("not reached" if r["scratch_steps"] is None
                   else f"{r['scratch_steps']:.0f}, {r['scratch_ms_per_image']:.0f}")
        print(f"| {r['dataset']} | {r['method']} | {r['seed']} | {r['split']} | {r['gap']:.1f} ± {r['gap_se']:.1f} | "
              f"{shares} | {scratch} | {r['q_star_ms_per_image']:.0f} |")


if __name__ == "__main__":
    main()
