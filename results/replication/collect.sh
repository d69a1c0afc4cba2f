#!/usr/bin/env bash
# Copy the small files of a results folder into the repository: the grid, each run's
# config/status/summary.json, evals.jsonl, mse_trace.jsonl (train MSE between evaluations), steps.csv (per-step -ELBO, which the report plots) and gap.json,
# then build the report of the copied runs there (report.md, figures as PNG). Only finished runs are copied;
# fitted models (model.pt) stay out.
# usage: bash results/replication/collect.sh RESULTS_DIR DEST_DIR
set -euo pipefail
src=$1 dest=$2
mkdir -p "$dest/runs" "$dest/report/figures"
cp "$src/grid.json" "$dest/"
for run in "$src"/runs/*/; do
  id=$(basename "$run")
  # Only finished runs: a running one is said to be running in the document, not stored half-way.
  if ! grep -q '"state": *"done"' "$run/status.json" 2>/dev/null; then
    echo "skipped (not done): $id" >&2
    continue
  fi
  mkdir -p "$dest/runs/$id"
  for f in config.json status.json summary.json evals.jsonl mse_trace.jsonl steps.csv gap.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/runs/$id/"
  done
done
# The summary table of every run stored in DEST_DIR, this batch and earlier ones (the source folder's table
# lists only the runs of that folder, which on a new machine need not be all of them).
"${PY:-python}" -c 'import sys; from amortized_bayes.experiments.store import ResultStore; ResultStore(sys.argv[1]).write_summary_table()' "$dest"
# The report of what was stored (finished runs only), built from the copied files.
rm -f "$dest/.lock"   # the lock file of that rebuild
"${PY:-python}" -m amortized_bayes report "$dest" >/dev/null
rm -f "$dest"/report/figures/*.svg
