"""Re-test surviving mutants against the work tree's tests, without mutmut's bookkeeping.

A mutmut run tests each mutant with the tests of the commit it started from, and adding tests makes
its next run collect its statistics again and re-test far more than the new tests reach. Tests written
for the survivors of a run are checked here instead: each named mutant (default: every survivor in
``mutants/``) is switched on (``MUTANT_UNDER_TEST``) in mutmut's mutated copy of the source
(``mutants/src``) while pytest runs the given test files of this work tree, stopping at the first
failure. The mutated copy must be of the same source as the work tree's functions the tests call
(re-run ``mutmut run`` after changing a mutated module). Prints one line per mutant: killed (by which
test) or survives.

    python scripts/mutation_recheck.py tests/test_gap.py                     # every survivor, one file
    python scripts/mutation_recheck.py tests/test_gap.py -k ais --only 'amortized_bayes.gap.x_ais*'
    python scripts/mutation_recheck.py tests/test_gap.py --any-state --only 'amortized_bayes.gap.x__stats*'

``--any-state`` takes every generated mutant the glob matches, checked or not: after ``mutmut run`` was
stopped once its mutants were generated, it checks new tests against a function's mutants without
waiting for the whole run.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_scores import survivors  # noqa: E402


def recheck(name: str, tests: list[str], mutants: Path, extra: list[str]) -> str:
    """``killed by TEST``, ``survives`` or ``error: ...`` for mutant ``name`` (empty: none) against ``tests``."""
    env = {**os.environ, "PYTHONPATH": "src"}
    env.pop("MUTANT_UNDER_TEST", None)
    if name:
        env["MUTANT_UNDER_TEST"] = name
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not processes",
               *[str(Path(t).resolve()) for t in tests], *extra]
    proc = subprocess.run(command, cwd=mutants, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return "survives"
    if proc.returncode == 1:
        failed = re.search(r"^FAILED (\S+)", proc.stdout, re.MULTILINE)
        return f"killed by {failed.group(1).split('/tests/')[-1] if failed else 'a test'}"
    if proc.returncode == 5:
        return "error: no test selected"
    return f"error: pytest exit status {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="+", help="test files of this work tree to run against each mutant")
    parser.add_argument("--only", default="*", help="a glob of mutant names (default: every survivor)")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder (default mutants)")
    parser.add_argument("--any-state", action="store_true",
                        help="every mutant the glob matches, not only survivors (e.g. none checked yet)")
    parser.add_argument("-k", default=None, help="pytest's -k expression, to run some tests of the files only")
    args = parser.parse_args()
    names = [n for n in survivors(args.mutants, args.any_state) if fnmatch.fnmatchcase(n, args.only)]
    if not names:
        which = "mutant" if args.any_state else "surviving mutant"
        raise SystemExit(f"no {which} matches {args.only!r} under {args.mutants}/")
    extra = ["-k", args.k] if args.k else []
    # The tests must pass on the unmutated copy, or every mutant would look killed.
    baseline = recheck("", args.tests, args.mutants, extra)
    if baseline != "survives":
        raise SystemExit(f"the tests do not pass on the unmutated source in {args.mutants}/src ({baseline})")
    killed = 0
    for name in names:
        verdict = recheck(name, args.tests, args.mutants, extra)
        killed += verdict.startswith("killed")
        print(f"{name}: {verdict}", flush=True)
    print(f"{killed} of {len(names)} killed")


if __name__ == "__main__":
    main()
