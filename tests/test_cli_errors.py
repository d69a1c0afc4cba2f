"""One error policy for the command line (issue 18): every user error is one line on stderr starting
with "error:" and exit status 2, for every subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "amortized_bayes", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


CASES = [
    ("run-unknown-preset", ["run", "--preset", "nope"], "unknown preset"),
    ("run-missing-grid", ["run", "missing.toml"], "cannot read"),
    ("run-bad-value", ["run", "--preset", "quick", "--set", "train.epochs=-1", "--out", "o"], "train.epochs"),
    ("run-unknown-field", ["run", "--preset", "quick", "--set", "train.epoch=1", "--out", "o"], "train.epoch"),
    ("run-bad-workers", ["run", "--preset", "quick", "--workers", "0", "--out", "o"], "--workers"),
    ("status-missing", ["status", "nowhere"], "not a results folder"),
    ("status-empty", ["status", "EMPTY"], "no runs"),
    ("report-missing", ["report", "nowhere"], "not a results folder"),
    ("report-empty", ["report", "EMPTY"], "no finished runs"),
    ("gap-missing", ["gap", "nowhere"], "not a results folder"),
    ("gap-empty", ["gap", "EMPTY"], "no finished runs"),
    ("gap-bad-images", ["gap", "EMPTY", "--images", "0"], "--images"),
    ("gap-bad-local-steps", ["gap", "EMPTY", "--max-local-steps", "0"], "--max-local-steps"),
    ("infer-bad-local-steps", ["infer", "EMPTY", "x.npy", "--out", "o", "--max-local-steps", "0"],
     "--max-local-steps"),
    ("data-unknown", ["data", "info", "cifar"], "unknown dataset 'cifar'"),
    ("data-file-fetch", ["data", "fetch", "file:x.npz"], "is not fetched"),
    ("data-file-missing", ["data", "info", "file:/nonexistent/x.npz"], "no such file"),
    ("infer-missing", ["infer", "nowhere", "x.npy", "--out", "o"], "no such run folder"),
    ("infer-results-folder", ["infer", "EMPTY", "x.npy", "--out", "o"], "not a run folder"),
    ("argparse", ["report"], "the following arguments are required"),
]


@pytest.mark.parametrize("name, args, match", CASES, ids=[c[0] for c in CASES])
def test_each_user_error_is_one_line_and_exit_2(tmp_path, name, args, match):
    (tmp_path / "EMPTY").mkdir()
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("amortized-bayes") or lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and match in proc.stderr
    if name != "argparse":  # argparse prints its usage first, as argparse tools do
        assert len(lines) == 1, proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written
