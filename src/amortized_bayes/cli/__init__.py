"""The ``amortized-bayes`` command. Each subcommand lives in its own module and registers itself.

Error policy: a user error (a bad config or argument, an unknown preset, a missing or empty results
folder, missing data) prints one line, ``error: ...``, on stderr and exits 2, as argparse does for its
own errors; anything else is an internal error and keeps its traceback (exit 1)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import ConfigError
from ..data.errors import DataError
from .errors import UserError
from . import data as data_cmd
from . import gap as gap_cmd
from . import infer as infer_cmd
from . import report as report_cmd
from . import run as run_cmd

COMMANDS = (data_cmd, run_cmd, report_cmd, gap_cmd, infer_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amortized-bayes",
        description="Amortized vs factorized variational inference in Bayesian VAEs: "
        "train, measure, compare, report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (DataError, ConfigError, UserError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as command-line tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
