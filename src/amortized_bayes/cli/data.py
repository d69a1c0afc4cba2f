"""``amortized-bayes data fetch | verify | info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import DATASETS, describe, get_dataset, resolve, verify_cached
from ..data import user_dataset
from .errors import UserError

CHOICES = (*DATASETS, "all")


def _names(which: str) -> list[str]:
    if user_dataset.is_file_dataset(which):
        raise UserError(f"{which}: a file: dataset is not fetched or cached; `data info {which}` checks and "
                        "describes it")
    return list(DATASETS) if which == "all" else [get_dataset(which).name]


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="fetch, verify and describe the datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", nargs="?", default="all", metavar="DATASET",
                        help=f"{', '.join(CHOICES)} (default: all); for info also file:PATH.npz")
    common.add_argument(
        "--data-dir", type=Path, default=None,
        help="a folder holding the IDX files (raw or .gz), tried before every other source "
        "(default: $AMORTIZED_BAYES_DATA)",
    )

    fetch = data_sub.add_parser("fetch", parents=[common], help="obtain and verify the files, caching them")
    fetch.add_argument("--repair", action="store_true", help="replace cached files that fail verification")
    fetch.set_defaults(handler=cmd_fetch)

    verify = data_sub.add_parser("verify", parents=[common], help="check the cached files; fetch nothing")
    verify.set_defaults(handler=cmd_verify)

    info = data_sub.add_parser("info", parents=[common], help="source, path, size, hash, counts per file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=cmd_info)


def cmd_fetch(args: argparse.Namespace) -> int:
    for name in _names(args.dataset):
        found = resolve(name, data_dir=args.data_dir, repair=args.repair)
        sources = sorted({vf.source for vf in found.values()})
        print(f"{name}: {len(found)} files verified ({'; '.join(sources)})", flush=True)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    rows = verify_cached(_names(args.dataset), data_dir=args.data_dir)
    width = max(len(f"{r.dataset}/{r.file}") for r in rows)
    for r in rows:
        where = f" {r.path}" if r.path else ""
        print(f"{r.status.upper():8s} {r.dataset + '/' + r.file:{width}s}{where}  {r.detail}")
    bad = [r for r in rows if r.status != "ok"]
    print(f"{len(rows) - len(bad)} ok, {sum(r.status == 'missing' for r in bad)} missing, "
          f"{sum(r.status == 'corrupt' for r in bad)} corrupt")
    return 1 if bad else 0


def _file_info(args: argparse.Namespace) -> int:
    name = user_dataset.normalise(args.dataset)
    rows = user_dataset.describe(name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    first = rows[0]
    print(f"\n{user_dataset.label(name)}: your file {first['path']}")
    print(f"  {first['bytes']:,d} B  sha256 {first['sha256']}  images {first['shape']} ({first['dtype']})")
    for row in rows:
        print(f"  {row['split']:6s} {row['count']:7d} images  pixel mean {row['pixel_mean']:.4f}")
    print(f"  use it as: --set data.dataset={name}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if user_dataset.is_file_dataset(args.dataset):
        return _file_info(args)
    rows = [row for name in _names(args.dataset) for row in describe(name, data_dir=args.data_dir)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name in _names(args.dataset):
        spec = get_dataset(name)
        print(f"\n{spec.name}: {spec.title}")
        for row in (r for r in rows if r["dataset"] == name):
            summary = (
                f"labels per class {row['label_histogram']}"
                if row["kind"] == "labels"
                else f"pixel mean {row['pixel_mean']:.4f}"
            )
            print(f"  {row['file']:24s} {row['count']:6d} items  {row['bytes']:>9,d} B  sha256 {row['sha256'][:16]}…")
            print(f"  {'':24s} {summary}")
            print(f"  {'':24s} from {row['source']}  at {row['path']}")
    return 0
