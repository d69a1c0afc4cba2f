"""examples/tutorial.ipynb runs from top to bottom (in a Jupyter kernel, as a reader would run it) and
prints what its text says it prints: the comparison table, the cost of inference on new images, the
gaps, and its figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tutorial.ipynb"


@pytest.mark.realdata
def test_the_tutorial_notebook_runs_and_prints_its_measurements(tmp_path):
    if os.environ.get("AB_REQUIRE_NOTEBOOK") != "1":
        pytest.importorskip("nbclient")
        pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "the notebook is stored without outputs (they would go stale)"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell's error
    text = "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for o in cell.outputs if o.output_type == "stream")
    figures = sum("image/png" in o.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                  for o in cell.outputs)
    assert "-ELBO/img" in text and "amortized " in text and "factorized " in text
    assert "optimisation steps" in text and text.count("amortization gap") == 2
    assert figures == 2
