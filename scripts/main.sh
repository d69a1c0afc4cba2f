#!/usr/bin/env bash
# The main job: set up (see scripts/bootstrap.sh), fetch and verify MNIST, then run the `quick`
# experiment into runs/quick (or $AB_OUT). Running it again skips finished runs and resumes
# interrupted ones; then measure the amortization gap of every run and build the report (figures,
# report.md, report.html). Extra arguments go to
# `amortized-bayes run` (e.g. --workers 1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" ""
out=${AB_OUT:-runs/quick}
"$PY" -m amortized_bayes data fetch mnist
# A failed run is recorded and the rest go on; the report covers what finished.
"$PY" -m amortized_bayes run --preset quick --out "$out" "$@" || echo "some runs failed (see above); reporting on the rest" >&2
# The amortization gap of every run on 32 train and 32 test images (skipped where gap.json is current).
"$PY" -m amortized_bayes gap "$out" --images 32
"$PY" -m amortized_bayes report "$out"
echo "results: $out (open $out/report/report.html; summary table: $out/summary.csv)"
