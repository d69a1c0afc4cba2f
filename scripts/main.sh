#!/usr/bin/env bash
# The main job: set up (see scripts/bootstrap.sh), then fetch and verify both datasets and summarise them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" ""
"$PY" -m amortized_bayes data fetch all
"$PY" -m amortized_bayes data info all
