"""``report DIR``: figures, report.md and a self-contained report.html from stored results."""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path

from . import __version__
from .analysis import (Comparison, DatasetTable, MethodRow, TargetRow, dataset_table, describe_ratio, gap_table,
                       load_results, with_tolerance)
from .data.atomic import atomic_write_text
from .plotting import caption, elbo_curves, gap_figure, mse_curves, reconstructions, tolerance_boxes


def _fmt(value, digits=4) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        if math.isinf(value):
            return "never"
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def _ratio_cell(comparison: Comparison | None, key: str) -> str:
    if comparison is None:
        return ""
    return describe_ratio(getattr(comparison, key), getattr(comparison, key + "_ci"), comparison.seeds)


def _speedup_cell(comparison: Comparison | None, key: str) -> str:
    speed = None if comparison is None else getattr(comparison, key)
    return "" if speed is None else speed.describe()


def _time_cell(value: float, lower: float, reached: int, seeds: int) -> str:
    """A median time; where seeds that never got there decide the median, the time it took at least
    (their last evaluation); and how many seeds got there."""
    text = f">= {_fmt(lower, 4)}" if math.isinf(value) and math.isfinite(lower) else _fmt(value, 4)
    return f"{text} ({reached}/{seeds})"


def _reached_cell(row: MethodRow, key: str) -> str:
    return _time_cell(getattr(row, key), getattr(row, key + "_lower"), getattr(row, key + "_reached"), row.seeds)


METRIC_NAMES = {"train_mse": "train MSE", "test_mse": "test MSE", "neg_elbo": "-ELBO/image"}


def target_rows(targets: list[TargetRow]) -> tuple[list[str], list[list[str]]]:
    """The reaching-F-VI table as header and string cells: one row per target and method."""
    head = ["target", "method", "epochs", "seconds", "speed-up vs F-VI (seconds)", "speed-up vs F-VI (epochs)"]
    rows = []
    for t in targets:
        name = f"{METRIC_NAMES[t.metric]} <= {t.target:.5g} (F-VI's final + {100 * t.margin:g}%)"
        seeds = len(t.crossings)
        rows.append([name, str(t.method), _time_cell(t.epochs, t.epochs_lower, t.reached, seeds),
                     _time_cell(t.seconds, t.seconds_lower, t.reached, seeds),
                     "" if t.speedup is None else t.speedup.describe(),
                     "" if t.speedup_epochs is None else t.speedup_epochs.describe()])
    return head, rows


TARGET_NOTE = ("When each method first came within 1% and 5% of F-VI's own final value (the median over F-VI's "
               "seeds of its last evaluation): epochs and training seconds (median over seeds; '>=' where seeds "
               "that never got there decide it), with how many seeds got there. The train MSE is read at every "
               "traced epoch, the -ELBO at the full evaluations only.")


INFERENCE_NOTE = ("Test-time inference: what finding q(z') for the test images cost at the last evaluation, "
                  "per image (all of them at once): one encoder pass for A-VI (SA-VI: with its refinement "
                  "steps); for F-VI and constant-VI, Adam on the local ELBO started from the previous "
                  "evaluation's q(z'), so a new image costs more than this (the gap table's 'from scratch' "
                  "column, and the speed benchmark, measure that).")


def _why(verdict) -> str:
    """The verdict's reason after it: ': reason.' when the claim could not be tested (the reason is what
    is missing), '. Reason' after a verdict."""
    if verdict.verdict == "not testable":
        return f": {verdict.why.rstrip('.')}."
    return f". {verdict.why}"


def _fixed(value: float | None, decimals: int) -> str:
    """A number as its train column prints it (-ELBO 2 decimals, MSE 4); '-' when not recorded."""
    return "-" if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def table_rows(table: DatasetTable) -> tuple[list[str], list[list[str]]]:
    """The summary table as header and string cells (shared by Markdown and HTML). The test images'
    -ELBO and the test ratios get columns when some run recorded its test -ELBO (runs evaluated before
    it was recorded have none)."""
    test = any(math.isfinite(r.test_neg_elbo_per_image) for r in table.rows.values())
    head = ["method", "seeds", "-ELBO/image (nats)", *(["test -ELBO/image (nats)"] if test else []), "train MSE",
            "test MSE", "ms/step", "epochs to tol", "seconds to tol", "test-time inference (ms/image)",
            "-ELBO vs F-VI", "train MSE vs F-VI", *(["test -ELBO vs F-VI", "test MSE vs F-VI"] if test else []),
            "speed-up to tol vs F-VI (seconds)", "speed-up to tol vs F-VI (epochs)"]
    rows = []
    for method, r in table.rows.items():
        c = table.comparisons.get(method)
        rows.append([str(method), str(r.seeds), f"{r.neg_elbo_per_image:.2f}",
                     *([_fixed(r.test_neg_elbo_per_image, 2)] if test else []), f"{r.train_mse:.4f}",
                     _fixed(r.test_mse, 4), f"{1e3 * r.seconds_per_step:.1f}", _reached_cell(r, "epochs_to_tol"),
                     _reached_cell(r, "seconds_to_tol"), _fmt(r.test_inference_ms_per_image, 3),
                     _ratio_cell(c, "elbo_ratio"), _ratio_cell(c, "mse_ratio"),
                     *([_ratio_cell(c, "test_elbo_ratio"), _ratio_cell(c, "test_mse_ratio")] if test else []),
                     _speedup_cell(c, "speedup"), _speedup_cell(c, "speedup_epochs")])
    return head, rows


def _gap_cell(cell: dict | None) -> str:
    if not cell:
        return "-"
    spread = f" [{cell['min']:.2f}, {cell['max']:.2f}]" if cell["max"] > cell["min"] else ""
    return f"{cell['median']:.2f}{spread}"


def _cost_cell(hit) -> str:
    return "not within the curve" if hit is None else f"{hit['steps']:g} steps, {hit['seconds']:.2f} s"


def gap_rows(gaps: dict) -> tuple[list[str], list[list[str]]]:
    """The amortization-gap table as header and string cells: one row per method and split."""
    ais = any("approximation_gap_ais" in c for r in gaps.values() for c in r["splits"].values())
    head = ["method", "split", "runs", "images", "amortization gap", "approximation gap (IWAE)"]
    head += ["approximation gap (AIS)"] if ais else []
    head += ["local steps to close 90% of the gap", "from scratch to the family's ELBO", "q* from the prior (s)"]
    rows = []
    for method, row in gaps.items():
        for split, c in row["splits"].items():
            cells = [str(method), split, str(row["seeds"]), str(c["images"]), _gap_cell(c.get("amortization_gap")),
                     _gap_cell(c.get("approximation_gap"))]
            cells += [_gap_cell(c.get("approximation_gap_ais"))] if ais else []
            cells += [_cost_cell(c["refinement_to_90pct_of_gap"]), _cost_cell(c["scratch_to_family_elbo"]),
                      f"{c['q_star_seconds_from_prior']:.2f}"]
            rows.append(cells)
    return head, rows


GAP_NOTE = ("Nats per image: the median over runs (seeds) of each run's mean over images, with the range over "
            "runs in brackets. Amortization gap = ELBO_x(q*) - ELBO_x(q_family); approximation gap = "
            "log p(x | theta) - ELBO_x(q*), theta = {theta}. Costs are local Adam steps with theta fixed, "
            "for all the images of the split at once; 'from scratch' fits a factorized q from the prior, "
            "which is what F-VI pays for new images. Measured by `amortized-bayes gap`.")


def build_report(root: str | Path, *, reconstructions_count: int = 8, tolerance: tuple[str, float] | None = None,
                 out: str | Path | None = None) -> dict[str, Path]:
    """Build ``root/report/`` (or ``out``): figures (PNG + SVG), report.md, report.html. Returns the main
    paths. ``tolerance`` (metric, value) replaces the grid's tolerance for every dataset."""
    root = Path(root)
    results = load_results(root)
    if not results.groups:
        raise ValueError(f"{root}: no finished runs to report on")
    if tolerance is not None:
        results = with_tolerance(results, *tolerance)
    out = root / "report" if out is None else Path(out)
    figures = out / "figures"
    sections = []
    for dataset in sorted(results.groups):
        table = dataset_table(results, dataset)
        figs = [elbo_curves(results, dataset, figures)[0], mse_curves(results, dataset, figures)[0]]
        if table.tolerance is not None:
            figs.append(tolerance_boxes(results, dataset, figures, table)[0])
        # Reconstructions need the fitted models; a folder kept without them (model.pt left out to save
        # space, as under results/) still gets every table and the other figures.
        if all(runs[0].files.model.exists() for runs in results.groups[dataset].values()):
            figs.append(reconstructions(results, dataset, figures, reconstructions_count)[0])
        else:
            table.note = "Reconstructions left out: this folder does not keep the fitted models (model.pt)."
        gaps = gap_table(results, dataset)
        if gaps:
            figs.append(gap_figure(results, dataset, figures, gaps)[0])
        table.gaps = gaps
        sections.append((dataset, table, figs))
    md = _markdown(results, sections, out)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _html(results, sections))
    return {"markdown": out / "report.md", "html": out / "report.html", "figures": figures}


def _theta(gaps: dict) -> str:
    return next(iter(gaps.values())).get("theta") or "posterior mean"


def _preamble(results) -> list[str]:
    grid = results.grid
    lines = [f"Grid **{grid.get('name', '?')}**: {grid.get('description', '')}",
             f"Built {time.strftime('%Y-%m-%d %H:%M')} by amortized-bayes {__version__} from the stored results in "
             f"`{results.root}`; nothing was retrained. Medians over seeds; intervals are 95% bootstrap "
             "intervals over seeds (coarse with few seeds). Ratios are A-VI / F-VI; the speed-up is F-VI's "
             "training seconds to the tolerance divided by A-VI's."]
    if grid.get("tolerance_overridden"):
        tol = grid["tolerance"]
        lines.append(f"Tolerance set when the report was built: {tol['metric']} <= "
                     f"{next(v for k, v in tol.items() if k != 'metric')} on every dataset (not the grid's).")
    if results.unfinished:
        lines.append(f"Not included (unfinished): {', '.join(results.unfinished)}.")
    return lines


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _markdown(results, sections, out: Path) -> str:
    lines = ["# amortized-bayes report", "", *(_preamble(results)), ""]
    for dataset, table, figs in sections:
        lines += [f"## {dataset}", "", f"Tolerance: {table.metric} <= {table.tolerance}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += _md_table(*table_rows(table))
        lines += ["", INFERENCE_NOTE, "", "### Verdicts", ""]
        for v in table.verdicts:
            lines.append(f"- **{v.claim}**: {v.verdict}{_why(v)}")
        lines.append("")
        if table.targets:
            lines += ["### Reaching F-VI's own final values", "", TARGET_NOTE, ""]
            lines += [*_md_table(*target_rows(table.targets)), ""]
        if table.gaps:
            lines += ["### Amortization gap", "", GAP_NOTE.format(theta=_theta(table.gaps)), ""]
            lines += [*_md_table(*gap_rows(table.gaps)), ""]
        else:
            lines += ["Amortization gap: not measured yet (`amortized-bayes gap DIR`, then `report DIR` again).", ""]
        for fig in figs:
            lines += [f"![{caption(fig)}]({fig.relative_to(out).as_posix()})", "", f"*{caption(fig)}*", ""]
    return "\n".join(lines) + "\n"


def _html(results, sections) -> str:
    def esc(text):
        return html.escape(str(text))

    def html_table(head: list[str], rows: list[list[str]]) -> str:
        return ("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</tbody></table>")

    body = ["<h1>amortized-bayes report</h1>"]
    body += [f"<p>{esc(p).replace('**', '')}</p>" for p in _preamble(results)]
    for dataset, table, figs in sections:
        body.append(f"<h2>{esc(dataset)}</h2><p>Tolerance: {esc(table.metric)} &le; "
                    f"{esc(table.tolerance)}</p>")
        body.append(html_table(*table_rows(table)) + f"<p>{esc(INFERENCE_NOTE)}</p><h3>Verdicts</h3><ul>")
        body += [f"<li><b>{esc(v.claim)}</b>: <i>{esc(v.verdict)}</i>{esc(_why(v))}</li>"
                 for v in table.verdicts]
        body.append("</ul>")
        if table.targets:
            body.append(f"<h3>Reaching F-VI's own final values</h3><p>{esc(TARGET_NOTE)}</p>"
                        + html_table(*target_rows(table.targets)))
        if table.gaps:
            body.append(f"<h3>Amortization gap</h3><p>{esc(GAP_NOTE.format(theta=_theta(table.gaps)))}</p>"
                        + html_table(*gap_rows(table.gaps)))
        for fig in figs:
            data = base64.b64encode(fig.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{esc(caption(fig))}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(caption(fig))}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1.5em 0}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>amortized-bayes report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
