"""``amortized-bayes report DIR``: figures and an HTML/Markdown report from stored results."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="figures, report.md and a self-contained report.html from a results folder")
    report.add_argument("out", type=Path, help="a results folder (as written by `run`)")
    report.add_argument("--images", type=int, default=8, help="images per reconstruction row (default 8)")
    report.add_argument("--tolerance", type=_tolerance, default=None, metavar="[METRIC=]VALUE",
                        help="judge every dataset against METRIC <= VALUE instead of the grid's tolerance; METRIC "
                             "train_mse (default) or test_mse. Written to OUT/report-METRIC-VALUE unless --report-dir")
    report.add_argument("--report-dir", type=Path, default=None,
                        help="where to write the report (default OUT/report)")
    report.set_defaults(handler=cmd_report)


def _tolerance(text: str) -> tuple[str, float]:
    from ..analysis import TOLERANCE_METRICS

    metric, _, value = text.rpartition("=")
    metric = metric or "train_mse"
    if metric not in TOLERANCE_METRICS:
        raise argparse.ArgumentTypeError(f"metric must be one of {', '.join(TOLERANCE_METRICS)}, got {metric!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return metric, number


def cmd_report(args) -> int:
    from ..experiments.lifecycle import RunState
    from ..experiments.store import ResultStore
    from ..report import build_report
    from .errors import UserError

    if not args.out.is_dir():
        raise UserError(f"{args.out} is not a results folder")
    if not any(r.state == RunState.DONE for r in ResultStore(args.out).records()):
        raise UserError(f"no finished runs in {args.out}: nothing to report")
    if args.images < 1:
        raise UserError("--images must be >= 1")
    out = args.report_dir
    if out is None and args.tolerance is not None:
        out = args.out / f"report-{args.tolerance[0]}-{args.tolerance[1]:g}"
    paths = build_report(args.out, reconstructions_count=args.images, tolerance=args.tolerance, out=out)
    print(f"report: {paths['html']} (Markdown: {paths['markdown']}; figures: {paths['figures']})")
    return 0
