"""``amortized-bayes report DIR``: figures and an HTML/Markdown report from stored results."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="figures, report.md and a self-contained report.html from a results folder")
    report.add_argument("out", type=Path, help="a results folder (as written by `run`)")
    report.add_argument("--images", type=int, default=8, help="images per reconstruction row (default 8)")
    report.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    from ..report import build_report

    paths = build_report(args.out, reconstructions_count=args.images)
    print(f"report: {paths['html']} (Markdown: {paths['markdown']}; figures: {paths['figures']})")
    return 0
