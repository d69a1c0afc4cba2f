"""``amortized-bayes gap DIR``: amortization and approximation gaps of every finished run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    gap = sub.add_parser("gap", help="amortization gap (nats per image) of every finished run of a results folder")
    gap.add_argument("out", type=Path)
    gap.add_argument("--images", type=int, default=100, help="images per split (default 100)")
    gap.add_argument("--split", choices=("train", "test", "both"), default="both")
    gap.add_argument("--iwae-k", type=int, default=1000, help="IWAE samples for log p(x | theta) (default 1000)")
    gap.add_argument("--elbo-samples", type=int, default=256, help="draws per ELBO_x estimate (default 256)")
    gap.add_argument("--force", action="store_true", help="recompute runs that already have gap.json")
    gap.set_defaults(handler=cmd_gap)


def cmd_gap(args) -> int:
    from ..experiments.store import ResultStore
    from ..gap import GapConfig, measure_run_gap

    if args.iwae_k < 1 or args.images < 1:
        raise SystemExit("error: --iwae-k and --images must be >= 1")
    splits = ("train", "test") if args.split == "both" else (args.split,)
    config = GapConfig(images=args.images, splits=splits, iwae_samples=args.iwae_k, elbo_samples=args.elbo_samples)
    records = [r for r in ResultStore(args.out).records() if r.state == "done"]
    if not records:
        print(f"error: no finished runs in {args.out}")
        return 1
    print(f"{'run':44s} {'split':6s} {'amortization gap':>22s} {'approximation gap':>22s}")
    for rec in records:
        if (rec.path / "gap.json").exists() and not args.force:
            import json

            result = json.loads((rec.path / "gap.json").read_text())
        else:
            result = measure_run_gap(rec.path, config)
        for split, s in result["splits"].items():
            a, b = s["amortization_gap"], s["approximation_gap"]
            print(f"{rec.run_id[:44]:44s} {split:6s} {a['mean']:10.3f} ± {a['se']:<9.3f} {b['mean']:10.3f} ± {b['se']:<9.3f}",
                  flush=True)
    print("nats per image, mean ± standard error over images; theta at its posterior mean; stored as gap.json per run")
    return 0
