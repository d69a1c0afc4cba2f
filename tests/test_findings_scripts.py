"""The scripts that turn stored results into the tables of docs/findings.md, on values written out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "results" / "findings" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(family: float, q_star: float, curve: dict[int, float]) -> dict:
    return {"elbo_family": {"mean": family}, "elbo_q_star": {"mean": q_star},
            "refinement_curve": [{"steps": k, "elbo_mean": v, "seconds": 0.1 * k} for k, v in curve.items()]}


def test_the_share_of_the_gap_closed_is_the_refinements_rise_over_the_whole_gap():
    gap_curves = _script("gap_curves")
    split = _split(-30.0, 10.0, {0: -30.0, 1: -26.0, 5: -10.0, 50: 11.0})
    assert gap_curves.share_closed(split, 0) == 0.0
    assert gap_curves.share_closed(split, 1) == pytest.approx(0.1)
    assert gap_curves.share_closed(split, 5) == pytest.approx(0.5)
    assert gap_curves.share_closed(split, 50) == pytest.approx(41 / 40)  # past q* by Monte Carlo error
    assert gap_curves.share_closed(split, 10) is None  # no point recorded there
    assert gap_curves.share_closed(_split(5.0, 5.0, {5: 5.0}), 5) is None  # no gap to close
