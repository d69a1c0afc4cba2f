#!/usr/bin/env bash
# Set up (see scripts/bootstrap.sh) with the test extras, fetch the data the real-data tests read, run
# the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" "test"
"$PY" -m amortized_bayes data fetch all
# Two pytest workers (pytest-xdist), tests handed out one at a time (the Ray tests, marked as one group,
# to one worker, which starts their cluster once): CI's 2 cores both busy instead of one (the suite's
# tests are mostly single-threaded). AB_TEST_WORKERS=0 runs in one process.
exec "$PY" -m pytest -n "${AB_TEST_WORKERS:-2}" --dist loadgroup "$@"
