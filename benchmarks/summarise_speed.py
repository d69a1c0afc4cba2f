"""Ratios of several runs of ``benchmarks/speed.py`` side by side: how much a ratio moves between runs.

    python benchmarks/summarise_speed.py benchmarks/results/speed-*.json

Each run's ratios are taken within that run (tool / floor and Pyro / tool per family and case, from
the median step times); this prints, per case and family, every run's ratio and their median, and
the peak memory ratio Pyro / tool. Nothing is re-measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def ratios(run: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{case: {family: {"tool/floor": r, "pyro/tool": r, "memory pyro/tool": r}}} of one run."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case, data in run["cases"].items():
        med = {key: statistics.median(times) for key, times in data["seconds"].items()}
        peak = data["peak_bytes"]
        families = [key.split("/", 1)[1] for key in med if key.startswith("tool/")]
        rows: dict[str, dict[str, float]] = {}
        for family in families:
            row = {"tool/floor": med[f"tool/{family}"] / med[f"floor/{family}"]}
            if f"pyro/{family}" in med:
                row["pyro/tool"] = med[f"pyro/{family}"] / med[f"tool/{family}"]
                row["memory pyro/tool"] = peak[f"pyro/{family}"] / peak[f"tool/{family}"]
            rows[family] = row
        out[case] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by speed.py --json")
    args = parser.parse_args()
    runs = [ratios(json.loads(path.read_text())) for path in args.runs]
    print(f"{len(runs)} runs: " + ", ".join(path.name for path in args.runs) + "\n")
    for case in runs[0]:
        print(f"### {case}\n")
        print("| family | tool / floor (each run) | median | Pyro / tool (each run) | median | memory Pyro / tool |")
        print("|---|---|---|---|---|---|")
        for family in runs[0][case]:
            cells = [f"| {family} "]
            for kind in ("tool/floor", "pyro/tool"):
                values = [run[case][family][kind] for run in runs if kind in run[case][family]]
                if values:
                    cells.append(f"| {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} ")
                else:
                    cells.append("| - | - ")
            memory = [run[case][family]["memory pyro/tool"] for run in runs if "memory pyro/tool" in run[case][family]]
            if memory:
                low, high = f"{min(memory):.1f}", f"{max(memory):.1f}"
                cells.append(f"| {low} |" if low == high else f"| {low}-{high} |")
            else:
                cells.append("| - |")
            print("".join(cells))
        print()


if __name__ == "__main__":
    main()
