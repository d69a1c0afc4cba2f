"""The report from a small stored grid: figures valid and non-blank, numbers equal to a direct
recomputation from the stored metrics, a self-contained HTML page."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

import matplotlib.image as mpimg
import numpy as np
import pytest

from amortized_bayes.analysis import dataset_table, iterations_to_tolerance, load_results

GRID = """
name = "tiny-report"
description = "a tiny grid for the report tests"
tolerance = {metric = "train_mse", mnist = 0.105}
[base.data]
n_train = 200
n_test = 50
[base.model]
latent_dim = 8
hidden = 32
[base.train]
epochs = 6
batch_size = 50
eval_every = 2
[axes]
"train.seed" = [0, 1]
[[variants]]
family = {name = "amortized", width = 16}
[[variants]]
family = {name = "factorized"}
[[variants]]
family = {name = "constant"}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    grid = root / "grid.toml"
    grid.write_text(GRID)
    out = root / "out"
    for args in (["run", grid, "--out", out], ["report", out]):
        proc = subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report.html" in proc.stdout
    return out


@pytest.mark.processes
def test_every_figure_exists_and_is_a_valid_non_blank_image(built):
    figures = built / "report" / "figures"
    names = ["mnist-elbo", "mnist-mse", "mnist-tolerance", "mnist-reconstructions"]
    for name in names:
        image = mpimg.imread(figures / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert float(np.std(image[..., :3])) > 0.02  # not blank
        root = ET.parse(figures / f"{name}.svg").getroot()
        assert root.tag.endswith("svg") and len(list(root.iter())) > 50


def _direct_medians(out, family_name):
    """Recompute, with json and statistics only, the medians the table must show."""
    finals, mses, crossings = [], [], []
    for cfg_path in (out / "runs").glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        if cfg["family"]["name"] != family_name:
            continue
        evals = [json.loads(line) for line in (cfg_path.parent / "evals.jsonl").read_text().splitlines()]
        finals.append(evals[-1]["neg_elbo"] / cfg["data"]["n_train"])
        mses.append(evals[-1]["train_mse"])
        crossing = next((e["wall_time"] for e in evals if e["train_mse"] <= 0.105), math.inf)
        crossings.append(crossing)
    return statistics.median(finals), statistics.median(mses), statistics.median(crossings)


@pytest.mark.processes
@pytest.mark.parametrize("family, label", [("amortized", "A-VI k=16"), ("factorized", "F-VI"),
                                           ("constant", "constant-VI")])
def test_table_numbers_equal_a_direct_computation(built, family, label):
    table = dataset_table(load_results(built), "mnist")
    row = table.rows[label]
    assert row.method.family == family and row.method == label
    elbo, mse, secs = _direct_medians(built, family)
    assert row.neg_elbo_per_image == pytest.approx(elbo, rel=1e-12)
    assert row.train_mse == pytest.approx(mse, rel=1e-12)
    assert row.seconds_to_tol == pytest.approx(secs, rel=1e-12) or (math.isinf(secs) and math.isinf(row.seconds_to_tol))
    md = (built / "report" / "report.md").read_text()
    line = next(row for row in md.splitlines() if row.startswith(f"| {label} |"))
    assert f"{elbo:.2f}" in line and f"{mse:.4f}" in line
    if label.startswith("A-VI"):
        fvi_elbo, fvi_mse, _ = _direct_medians(built, "factorized")
        assert f"{elbo / fvi_elbo:.3f}" in line and f"{mse / fvi_mse:.3f}" in line


@pytest.mark.processes
def test_verdicts_are_computed_and_stated(built):
    md = (built / "report" / "report.md").read_text()
    # No k >= 64 in this grid: the claim is not testable, and the report says what is missing.
    assert "A-VI with k >= 64 reaches F-VI's ELBO and MSE**: not testable: the grid needs F-VI and A-VI" in md
    assert "A-VI is 2-3x faster than F-VI" in md


@pytest.mark.processes
def test_html_is_self_contained(built):
    page = (built / "report" / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]+" src="([^"]+)"', page)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "<table>" in page and "Verdicts" in page


def test_iterations_to_tolerance_and_never():
    evals = [{"epoch": 0, "step": 0, "wall_time": 0.0, "train_mse": 0.2},
             {"epoch": 5, "step": 50, "wall_time": 1.5, "train_mse": 0.05},
             {"epoch": 10, "step": 100, "wall_time": 3.0, "train_mse": 0.01}]
    assert iterations_to_tolerance(evals, "train_mse", 0.06) == {"epoch": 5, "step": 50, "seconds": 1.5}
    assert iterations_to_tolerance(evals, "train_mse", 0.001) is None


@pytest.mark.processes
def test_report_html_renders_in_headless_chromium_without_console_errors(built, tmp_path):
    """Debian's chromium, driven through its chromedriver (`.ci/run` installs both)."""
    import shutil

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        if os.environ.get("AB_REQUIRE_BROWSER") == "1":
            pytest.fail("AB_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (installed by .ci/run)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        browser.get((built / "report" / "report.html").resolve().as_uri())
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        title = browser.title
    finally:
        browser.quit()
    assert title == "amortized-bayes report"
    assert len(sizes) == 4 and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    assert errors == []


@pytest.mark.processes
def test_legacy_objective_rows_are_compared_with_the_legacy_f_vi_row(built):
    """Runs of the legacy-2024 objective carry a suffix in their labels; their A-VI rows must still be
    compared with F-VI of the same objective (and give the same ratios as the unsuffixed table). The
    method is read from each run's config, not from the group's key."""
    from dataclasses import replace

    results = load_results(built)
    plain = dataset_table(results, "mnist")
    for runs in results.groups["mnist"].values():
        for run in runs:
            run.config = replace(run.config, objective=replace(run.config.objective, kind="legacy-2024",
                                                               estimator="mc"))
    legacy = dataset_table(results, "mnist")
    assert set(legacy.comparisons) == {"A-VI k=16 (legacy-2024)"}
    (method,) = legacy.comparisons
    assert (method.family, method.width, method.objective) == ("amortized", 16, "legacy-2024")
    assert legacy.comparisons[method].fvi == "F-VI (legacy-2024)"
    assert legacy.comparisons[method].elbo_ratio == plain.comparisons["A-VI k=16"].elbo_ratio
    assert [v.verdict for v in legacy.verdicts] == ["not testable"] * 2  # k = 16 < 64, as unsuffixed
    assert [v.verdict for v in plain.verdicts] == ["not testable"] * 2


@pytest.mark.processes
def test_report_of_a_folder_kept_without_models(built, tmp_path):
    """results/ keeps runs without model.pt: the report still builds, with every table, minus the
    reconstructions (and says so)."""
    import shutil

    slim = tmp_path / "slim"
    shutil.copytree(built, slim, ignore=shutil.ignore_patterns("model.pt", "report"))
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "report", str(slim)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (slim / "report" / "report.md").read_text()
    assert "Reconstructions left out" in md and "reconstructions.png" not in md
    full = (built / "report" / "report.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert table_lines and table_lines == [line for line in full.splitlines() if line.startswith("| ")]


@pytest.mark.processes
def test_a_tolerance_set_at_report_time_changes_only_the_crossings(built, tmp_path):
    """`report --tolerance`: the crossings are those of the stated tolerance, computed from the stored
    evaluations; every other number is unchanged, and the grid's own report is left alone."""
    from amortized_bayes.analysis import with_tolerance

    results = load_results(built)
    evals = {label: [r.evals for r in runs] for label, runs in results.groups["mnist"].items()}
    # A tolerance some runs meet during training: the largest final train MSE over all runs.
    loose = max(e[-1]["train_mse"] for runs in evals.values() for e in runs)
    table = dataset_table(with_tolerance(results, "train_mse", loose), "mnist")
    for label, row in table.rows.items():
        for seed_row, run_evals in zip(row.per_seed, evals[label]):
            crossing = iterations_to_tolerance(run_evals, "train_mse", loose)
            assert crossing is not None and seed_row.epochs_to_tol == crossing["epoch"]
    base = dataset_table(results, "mnist")
    assert base.tolerance == 0.105 and table.tolerance == loose
    for label in base.rows:
        for key in ("neg_elbo_per_image", "train_mse", "test_mse"):
            assert getattr(table.rows[label], key) == getattr(base.rows[label], key)
    with pytest.raises(ValueError, match="metric"):
        with_tolerance(results, "neg_elbo", 1.0)

    before = (built / "report" / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "amortized_bayes", "report", str(built), "--tolerance",
                           f"test_mse={loose}", "--report-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"test_mse <= {loose} on every dataset (not the grid's)" in md
    assert (built / "report" / "report.md").read_text() == before
    bad = subprocess.run([sys.executable, "-m", "amortized_bayes", "report", str(built), "--tolerance", "x=0.1"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "metric must be one of" in bad.stderr
