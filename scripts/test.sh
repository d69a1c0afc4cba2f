#!/usr/bin/env bash
# Set up (see scripts/bootstrap.sh) with the test extras, fetch the data the real-data tests read, run
# the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" "test"
"$PY" -m amortized_bayes data fetch all
exec "$PY" -m pytest "$@"
