#!/usr/bin/env bash
# Mutation testing (docs/mutation.md): mutmut mutates the modules listed under [tool.mutmut] in
# pyproject.toml (those whose mistakes change printed numbers silently) and runs, for each mutant, the
# tests that reach the mutated function; then prints the score per module. Not part of CI: 25-45
# minutes of both cores here with nothing else running. Results are cached in mutants/ (a second run re-tests only what changed);
# delete that folder to start over. Extra arguments go to `mutmut run` (e.g. a mutant-name glob:
# 'amortized_bayes.densities*').
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh "test,mutation"
"$PY" -m amortized_bayes data fetch all
"$PY" -m mutmut run --max-children "${AB_MUTATION_WORKERS:-2}" "$@" || true   # survivors make it exit non-zero
"$PY" scripts/mutation_scores.py
