#!/usr/bin/env bash
# The main job: set up (see scripts/bootstrap.sh), fetch and verify MNIST, then run the `quick`
# experiment into runs/quick (or $AB_OUT). Running it again skips finished runs and resumes
# interrupted ones. Extra arguments go to `amortized-bayes run` (e.g. --workers 1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" ""
out=${AB_OUT:-runs/quick}
"$PY" -m amortized_bayes data fetch mnist
"$PY" -m amortized_bayes run --preset quick --out "$out" "$@"
echo "results: $out (summary table: $out/summary.csv; status: amortized-bayes status $out)"
