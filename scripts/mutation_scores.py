"""The mutation score per module from mutmut's result files (mutants/**/*.py.meta), as a Markdown table,
and the surviving mutants' names (``--survivors``). Run from the repository root after
``scripts/mutation.sh`` (or ``mutmut run``); nothing is re-run.

Score = killed / (killed + survived + timeout + suspicious): mutants no test reaches ("no tests") are
counted apart, since they say which code no selected test calls, not how strict the tests are.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

# mutmut 3.8's exit codes of a mutant's test run (mutmut/stats.py), grouped as this table counts them.
STATUS = {1: "killed", 3: "killed", 37: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def status(code: int | None) -> str:
    return STATUS.get(code, "suspicious")


def exit_codes(meta: Path, attempts: int = 20) -> dict[str, int | None]:
    """{mutant name: exit code} from one meta file. A running mutmut rewrites the file in place after
    each mutant, so a read can catch it half-written: read again until it parses (a few ms later)."""
    for _ in range(attempts - 1):
        try:
            return json.loads(meta.read_text())["exit_code_by_key"]
        except json.JSONDecodeError:
            time.sleep(0.05)
    return json.loads(meta.read_text())["exit_code_by_key"]  # the last try raises what it finds


def module_results(root: Path) -> dict[str, Counter]:
    """{module path: Counter of statuses} over every mutated file's meta file under ``root``."""
    out: dict[str, Counter] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = exit_codes(meta)
        out[str(meta.relative_to(root).with_suffix(""))] = Counter(status(c) for c in codes.values())
    return out


def survivors(root: Path, any_state: bool = False) -> list[str]:
    """The names of the mutants mutmut left alive (survived, suspicious, timed out), or with
    ``any_state`` every mutant it generated, whatever its state (checked or not)."""
    names = []
    for meta in sorted(root.rglob("*.py.meta")):
        codes = exit_codes(meta)
        names += [name for name, code in codes.items()
                  if any_state or status(code) in ("survived", "suspicious", "timeout")]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder (default mutants)")
    parser.add_argument("--survivors", action="store_true", help="also list every mutant that survived")
    args = parser.parse_args()
    results = module_results(args.mutants)
    if not results:
        raise SystemExit(f"no mutmut results under {args.mutants}/ (run scripts/mutation.sh first)")
    print("| module | mutants | killed | survived | timeout | no tests | not checked | score |")
    print("|---|---|---|---|---|---|---|---|")
    total: Counter = Counter()
    for module, counts in results.items():
        total += counts
        print(_row(module, counts))
    print(_row("**all**", total))
    if args.survivors:
        print()
        for name in survivors(args.mutants):
            print(name)


def _row(name: str, c: Counter) -> str:
    tested = c["killed"] + c["survived"] + c["timeout"] + c["suspicious"]
    score = f"{c['killed'] / tested:.1%}" if tested else "-"
    return (f"| {name} | {sum(c.values())} | {c['killed']} | {c['survived'] + c['suspicious']} | {c['timeout']} | "
            f"{c['no tests']} | {c['not checked']} | {score} |")


if __name__ == "__main__":
    main()
