#!/usr/bin/env bash
# Copy the small files of a results folder into the repository: the grid, the summary table, each run's
# config/status/summary.json, evals.jsonl, mse_trace.jsonl (train MSE between evaluations), steps.csv (per-step -ELBO, which the report plots) and gap.json,
# and the report (report.md, figures as PNG). Fitted models (model.pt) stay out.
# usage: bash results/replication/collect.sh RESULTS_DIR DEST_DIR
set -euo pipefail
src=$1 dest=$2
mkdir -p "$dest/runs" "$dest/report/figures"
cp "$src/grid.json" "$src/summary.csv" "$dest/"
for run in "$src"/runs/*/; do
  id=$(basename "$run")
  mkdir -p "$dest/runs/$id"
  for f in config.json status.json summary.json evals.jsonl mse_trace.jsonl steps.csv gap.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/runs/$id/"
  done
done
cp "$src/report/report.md" "$dest/report/"
cp "$src"/report/figures/*.png "$dest/report/figures/"
