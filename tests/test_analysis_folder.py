"""The report's numbers from a results folder written out by hand (issue 21): load_results reads exactly
the finished runs, dataset_table's medians, ratios, crossings and speed-ups, with_tolerance, and
gap_table's medians, ranges and step counts, each against a value computed here from the numbers
written, in process (the report's own tests go through the command line, which a mutant cannot reach)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from amortized_bayes.analysis import dataset_table, gap_table, load_results, with_tolerance
from amortized_bayes.config import RunConfig, TrainConfig, family_config
from amortized_bayes.experiments.grid import run_id

N = 1000  # the default data.n_train
# Per method and seed: train MSE at epochs 0..4, the wall time of each epoch's end, the final -ELBO.
AVI = {0: [0.20, 0.08, 0.04, 0.03, 0.03], 1: [0.20, 0.09, 0.06, 0.045, 0.03], 2: [0.20, 0.07, 0.05, 0.04, 0.035]}
FVI = {0: [0.20, 0.15, 0.09, 0.05, 0.04], 1: [0.20, 0.12, 0.10, 0.08, 0.06], 2: [0.20, 0.10, 0.08, 0.06, 0.055]}
AVI_WALL, FVI_WALL = [0.0, 2.0, 4.0, 6.0, 8.0], [0.0, 1.0, 2.0, 3.0, 4.0]
AVI_ELBO = {0: 101_000.0, 1: 102_000.0, 2: 104_000.0}
FVI_ELBO = {0: 100_000.0, 1: 100_500.0, 2: 99_000.0}
AVI_STEP, FVI_STEP = {0: 0.020, 1: 0.022, 2: 0.021}, {0: 0.010, 1: 0.011, 2: 0.012}
# (amortization gap, approximation gap, steps and seconds to close 90% of the gap: None if never)
GAPS = {("amortized", 0): (5.0, 1.0, 30, 0.3), ("amortized", 1): (7.0, 1.5, 50, 0.5),
        ("amortized", 2): (6.0, 1.2, 40, 0.4), ("factorized", 0): (1.0, 0.2, 10, 0.1),
        ("factorized", 1): (3.0, 0.4, None, None), ("factorized", 2): (2.0, 0.3, 20, 0.2)}


def _config(family: str, seed: int) -> RunConfig:
    return RunConfig(family=family_config(family, width=64), train=TrainConfig(seed=seed))


def _write_run(root, family: str, seed: int, mse: list[float], wall: list[float], neg_elbo: float,
               step_seconds: float, done: bool = True) -> None:
    config = _config(family, seed)
    path = root / "runs" / run_id(config)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    (path / "status.json").write_text(json.dumps({"state": "done" if done else "running"}))
    evals = [{"epoch": e, "step": 10 * e, "wall_time": wall[e], "train_mse": m, "test_mse": m + 0.01,
              "neg_elbo": neg_elbo + 1000.0 * (4 - e), "test_neg_elbo_per_image": (neg_elbo + 1000.0 * (4 - e)) / N + 3}
             for e, m in enumerate(mse)]
    (path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (path / "steps.csv").write_text("step,epoch,neg_elbo,wall_time\n" + "".join(
        f"{s},{s // 10},{neg_elbo},{step_seconds * s}\n" for s in range(1, 41)))
    if done:
        (path / "summary.json").write_text(json.dumps({
            "final": evals[-1], "complete": True, "steps": 40, "epochs": 4, "train_seconds": wall[-1],
            "seconds_per_step": step_seconds, "neg_elbo_per_image": neg_elbo / N}))
        amort, approx, steps, seconds = GAPS[(family, seed)]
        hit = None if steps is None else {"steps": steps, "seconds": seconds}
        split = {"images": 16, "amortization_gap": {"mean": amort, "se": 0.1 * amort},
                 "approximation_gap": {"mean": approx, "se": 0.05},
                 "refinement_to_90pct_of_gap": hit, "scratch_to_family_elbo": {"steps": 100 + seed, "seconds": 1.0},
                 "q_star_cost_from_prior": {"steps": 500, "seconds": 2.0 + seed}}
        gap = {"family": family, "theta": "posterior mean",
               "splits": {"train": split, "test": {**split, "amortization_gap": {"mean": amort + 1, "se": 0.2}}}}
        (path / "gap.json").write_text(json.dumps(gap))


@pytest.fixture
def folder(tmp_path):
    grid = {"name": "hand", "tolerance": {"metric": "train_mse", "mnist": 0.05}}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    for seed in (0, 1, 2):
        _write_run(tmp_path, "amortized", seed, AVI[seed], AVI_WALL, AVI_ELBO[seed], AVI_STEP[seed])
        _write_run(tmp_path, "factorized", seed, FVI[seed], FVI_WALL, FVI_ELBO[seed], FVI_STEP[seed])
    _write_run(tmp_path, "constant", 0, FVI[0], FVI_WALL, 0.0, 0.01, done=False)  # running: not in the tables
    return tmp_path


def _first(mse: list[float], wall: list[float], tol: float) -> tuple[int, float] | None:
    for epoch, value in enumerate(mse):
        if value <= tol:
            return epoch, wall[epoch]
    return None


def test_load_results_reads_the_finished_runs_grouped_and_sorted_by_seed(folder):
    results = load_results(folder)
    assert set(results.groups) == {"mnist"}
    groups = results.groups["mnist"]
    assert sorted(groups) == ["A-VI k=64", "F-VI"]
    for runs in groups.values():
        assert [r.seed for r in runs] == [0, 1, 2]
        assert all(len(r.evals) == 5 and r.gap is not None and len(r.steps["step"]) == 40 for r in runs)
    (unfinished,) = results.unfinished
    assert "const" in unfinished and "interrupted" in unfinished
    assert results.tolerance("mnist") == ("train_mse", 0.05)
    assert results.tolerance("fashion-mnist") == ("train_mse", None)


def test_the_table_numbers_are_the_hand_computed_medians_ratios_and_speed_ups(folder):
    table = dataset_table(load_results(folder), "mnist")
    rows = {str(m): r for m, r in table.rows.items()}
    avi, fvi = rows["A-VI k=64"], rows["F-VI"]
    assert avi.neg_elbo_per_image == pytest.approx(statistics.median(AVI_ELBO.values()) / N)
    assert fvi.neg_elbo_per_image == pytest.approx(statistics.median(FVI_ELBO.values()) / N)
    assert avi.train_mse == pytest.approx(statistics.median(m[-1] for m in AVI.values()))
    assert fvi.test_mse == pytest.approx(statistics.median(m[-1] + 0.01 for m in FVI.values()))
    assert avi.seconds_per_step == pytest.approx(statistics.median(AVI_STEP.values()))
    # Crossings of 0.05: A-VI at epochs 2, 3, 2 (seconds 4, 6, 4); F-VI at 3 (3 s), then never twice
    # within the 4 epochs (4 s) the runs lasted.
    a = [_first(AVI[s], AVI_WALL, 0.05) for s in (0, 1, 2)]
    f = [_first(FVI[s], FVI_WALL, 0.05) for s in (0, 1, 2)]
    assert a == [(2, 4.0), (3, 6.0), (2, 4.0)] and f == [(3, 3.0), None, None]
    assert avi.epochs_to_tol == 2 and avi.seconds_to_tol == 4.0 and avi.epochs_to_tol_reached == 3
    assert avi.epochs_to_tol_lower == 2 and avi.seconds_to_tol_lower == 4.0
    # F-VI: two of three seeds never reached it, so its median is censored: at least 4 epochs (4 s),
    # infinitely late when the seeds that never reached it count as never.
    assert fvi.epochs_to_tol_reached == 1 and fvi.epochs_to_tol_lower == 4 and fvi.seconds_to_tol_lower == 4.0
    assert math.isinf(fvi.epochs_to_tol) and math.isinf(fvi.seconds_to_tol)
    c = table.comparisons[next(m for m in table.comparisons)]
    assert str(c.avi) == "A-VI k=64" and str(c.fvi) == "F-VI" and c.seeds == 3
    assert c.elbo_ratio == pytest.approx(statistics.median(AVI_ELBO.values()) / statistics.median(FVI_ELBO.values()))
    assert c.mse_ratio == pytest.approx(avi.train_mse / fvi.train_mse)
    lo, hi = c.elbo_ratio_ci
    assert lo < c.elbo_ratio < hi
    # On the test images: -ELBO per image 3 nats above the training one here, test MSE 0.01 above.
    assert avi.test_neg_elbo_per_image == pytest.approx(statistics.median(AVI_ELBO.values()) / N + 3)
    assert c.test_elbo_ratio == pytest.approx((statistics.median(AVI_ELBO.values()) / N + 3)
                                              / (statistics.median(FVI_ELBO.values()) / N + 3))
    assert c.test_mse_ratio == pytest.approx(statistics.median(m[-1] + 0.01 for m in AVI.values())
                                             / statistics.median(m[-1] + 0.01 for m in FVI.values()))
    for ratio, (low, high) in ((c.test_elbo_ratio, c.test_elbo_ratio_ci), (c.test_mse_ratio, c.test_mse_ratio_ci)):
        assert low < ratio < high
    assert c.step_time_ratio == pytest.approx(avi.seconds_per_step / fvi.seconds_per_step)
    # Speed-up in epochs: F-VI's censored median (at least 4) over A-VI's 2: at least 2x, unbounded above;
    # in seconds at least 4 / 4 = 1x.
    assert c.speedup_epochs.low == pytest.approx(4 / 2) and math.isinf(c.speedup_epochs.high)
    assert not c.speedup_epochs.exact and c.speedup_epochs.describe().startswith("at least 2.00x")
    assert c.speedup.low == pytest.approx(4.0 / 4.0) and math.isinf(c.speedup.high)


def test_a_tolerance_set_afterwards_moves_only_the_crossings(folder):
    results = load_results(folder)
    looser = with_tolerance(results, "train_mse", 0.1)
    assert looser.tolerance("mnist") == ("train_mse", 0.1) and results.tolerance("mnist") == ("train_mse", 0.05)
    before, after = dataset_table(results, "mnist"), dataset_table(looser, "mnist")
    rows = {str(m): r for m, r in after.rows.items()}
    # 0.1: A-VI at epochs 1, 1, 1 (2 s each); F-VI at 2, 2, 1 (2, 2, 1 s): all reached, so exact.
    assert [_first(FVI[s], FVI_WALL, 0.1) for s in (0, 1, 2)] == [(2, 2.0), (2, 2.0), (1, 1.0)]
    assert rows["A-VI k=64"].epochs_to_tol == 1 and rows["F-VI"].epochs_to_tol == 2
    assert rows["F-VI"].seconds_to_tol == 2.0 and rows["F-VI"].epochs_to_tol_reached == 3
    c = next(iter(after.comparisons.values()))
    assert c.speedup_epochs.exact and c.speedup_epochs.low == pytest.approx(2.0)
    assert c.speedup.low == pytest.approx(2.0 / 2.0)
    for name in ("neg_elbo_per_image", "train_mse", "test_mse", "seconds_per_step"):
        assert getattr(rows["F-VI"], name) == getattr({str(m): r for m, r in before.rows.items()}["F-VI"], name)
    with pytest.raises(ValueError, match=r"^tolerance metric must be one of train_mse, test_mse, got 'neg_elbo'$"):
        with_tolerance(results, "neg_elbo", 0.1)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="tolerance must be a positive number"):
            with_tolerance(results, "train_mse", bad)


def test_gap_table_gives_medians_ranges_and_step_counts_of_the_stored_gaps(folder):
    table = {str(m): row for m, row in gap_table(load_results(folder), "mnist").items()}
    assert set(table) == {"A-VI k=64", "F-VI"}
    for family, label in (("amortized", "A-VI k=64"), ("factorized", "F-VI")):
        row = table[label]
        assert row["seeds"] == 3 and row["theta"] == "posterior mean"
        amort = [GAPS[(family, s)][0] for s in (0, 1, 2)]
        train, test = row["splits"]["train"], row["splits"]["test"]
        assert train["images"] == 16
        assert train["amortization_gap"] == {"median": statistics.median(amort), "min": min(amort),
                                             "max": max(amort), "se": statistics.median(0.1 * a for a in amort)}
        assert test["amortization_gap"]["median"] == statistics.median(a + 1 for a in amort)
        approx = [GAPS[(family, s)][1] for s in (0, 1, 2)]
        assert train["approximation_gap"]["median"] == statistics.median(approx)
        assert train["scratch_to_family_elbo"] == {"steps": 101.0, "seconds": 1.0}
        assert train["q_star_seconds_from_prior"] == 3.0
    assert table["A-VI k=64"]["splits"]["train"]["refinement_to_90pct_of_gap"] == {"steps": 40.0, "seconds": 0.4}
    # One F-VI seed never closed 90% of its gap within the curve: no median is given.
    assert table["F-VI"]["splits"]["train"]["refinement_to_90pct_of_gap"] is None


@pytest.mark.parametrize("family, kind, architecture, label", [
    ("amortized", "elbo", "mlp", "A-VI k=64"),
    ("amortized", "legacy-2024", "mlp", "A-VI k=64 (legacy-2024)"),
    ("amortized", "elbo", "conv", "A-VI k=64, conv decoder"),
    ("factorized", "legacy-2024", "conv", "F-VI (legacy-2024), conv decoder"),
    ("constant", "elbo", "mlp", "constant-VI"),
])
def test_a_runs_method_label_names_its_family_objective_and_decoder(family, kind, architecture, label):
    from amortized_bayes.analysis import method_of
    from amortized_bayes.config import ModelConfig, ObjectiveConfig

    method = method_of(RunConfig(family=family_config(family, width=64), objective=ObjectiveConfig(kind=kind),
                                 model=ModelConfig(architecture=architecture)))
    assert str(method) == label and method.objective == kind and method.decoder == architecture
    assert method.family == family and method.width == (64 if family == "amortized" else None)


def test_a_method_survives_pickling_with_everything_it_carries():
    import pickle

    from amortized_bayes.analysis import method_label
    from amortized_bayes.config import ModelConfig, ObjectiveConfig

    method = method_label(RunConfig(family=family_config("amortized", width=16), model=ModelConfig(architecture="conv"),
                                    objective=ObjectiveConfig(kind="legacy-2024")))
    copy = pickle.loads(pickle.dumps(method))
    assert str(copy) == str(method) == "A-VI k=16 (legacy-2024), conv decoder"
    assert (copy.family, copy.width, copy.objective, copy.rank, copy.decoder) == ("amortized", 16, "legacy-2024", 0,
                                                                                  "conv")
    assert copy.order == method.order


# A second folder with the cases the first does not reach: a method with no gap measured, one measured on
# the test split only, a train-MSE trace between evaluations, a finished run whose evaluations are lost,
# a conv-decoder pair, constant-VI (never compared), and a dataset without a tolerance.
def _write_mixed_run(root, config: RunConfig, evals: list[dict], *, trace=(), gap=None, inference_seconds=None):
    path = root / "runs" / run_id(config)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    (path / "status.json").write_text(json.dumps({"state": "done"}))
    if inference_seconds is not None:
        evals = [{**e, "test_inference_seconds": inference_seconds} for e in evals]
    (path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (path / "steps.csv").write_text("step,epoch,neg_elbo,wall_time\n1,0,1.0,0.01\n")
    (path / "summary.json").write_text(json.dumps({"complete": True, "seconds_per_step": 0.01}))
    if trace:
        (path / "mse_trace.jsonl").write_text("".join(json.dumps(e) + "\n" for e in trace))
    if gap is not None:
        (path / "gap.json").write_text(json.dumps(gap))
    return path


def _evals(mse: list[float], epochs: list[int], neg_elbo: float = 50_000.0) -> list[dict]:
    return [{"epoch": e, "step": 10 * e, "wall_time": float(e), "train_mse": m, "test_mse": m + 0.01,
             "neg_elbo": neg_elbo} for e, m in zip(epochs, mse)]


def _gap_split(images: int, amortization: float) -> dict:
    return {"images": images, "amortization_gap": {"mean": amortization, "se": 0.1},
            "refinement_to_90pct_of_gap": None, "scratch_to_family_elbo": None,
            "q_star_cost_from_prior": {"steps": 10, "seconds": 0.5}}


@pytest.fixture
def mixed(tmp_path):
    from amortized_bayes.config import DataConfig, ModelConfig

    tmp_path = tmp_path / "mixed"  # beside `folder` when a test takes both
    tmp_path.mkdir()

    (tmp_path / "grid.json").write_text(json.dumps({"name": "mixed", "tolerance": {"metric": "train_mse",
                                                                                   "mnist": 0.05}}))

    def config(family, seed=0, width=64, architecture="mlp", dataset="mnist"):
        return RunConfig(family=family_config(family, width=width), train=TrainConfig(seed=seed),
                         model=ModelConfig(architecture=architecture), data=DataConfig(dataset=dataset))

    for seed in (0, 1):
        _write_mixed_run(tmp_path, config("amortized", seed), _evals([0.2, 0.04], [0, 2]),
                         gap={"theta": "posterior mean", "splits": {"train": _gap_split(8, 2.0 + seed)}})
        _write_mixed_run(tmp_path, config("factorized", seed), _evals([0.2, 0.1, 0.07 - 0.01 * seed], [0, 1, 2]),
                         inference_seconds=3.0 + seed)
    # Evaluated at epochs 0, 2, 4 only; its train-MSE trace (every epoch) crosses 0.05 at epoch 3.
    trace = [{"epoch": e, "step": 10 * e, "wall_time": 1.5 * e, "train_mse": m}
             for e, m in enumerate([0.2, 0.1, 0.06, 0.045, 0.04])]
    _write_mixed_run(tmp_path, config("amortized", width=16), _evals([0.2, 0.06, 0.04], [0, 2, 4]), trace=trace,
                     gap={"theta": "cut short"})  # a gap.json without splits: not a measurement
    _write_mixed_run(tmp_path, config("constant"), _evals([0.2, 0.09], [0, 2]),
                     gap={"theta": "posterior mean", "splits": {"test": _gap_split(4, 9.0)}})
    _write_mixed_run(tmp_path, config("amortized", architecture="conv"), _evals([0.2, 0.03], [0, 2]))
    _write_mixed_run(tmp_path, config("factorized", architecture="conv"), [])  # its evals.jsonl lost
    _write_mixed_run(tmp_path, config("amortized", dataset="fashion-mnist"), _evals([0.3, 0.1], [0, 2]))
    _write_mixed_run(tmp_path, config("factorized", dataset="fashion-mnist"), _evals([0.3, 0.2], [0, 2]))
    (tmp_path / "runs" / "leftover").mkdir()  # not a run: ignored
    return tmp_path


def test_load_results_keeps_each_runs_identity_files_and_trace(mixed):
    results = load_results(mixed)
    assert results.root == mixed and results.grid["name"] == "mixed" and set(results.groups) == {
        "mnist", "fashion-mnist"}
    for by_method in results.groups.values():
        for runs in by_method.values():
            for r in runs:
                assert r.path == mixed / "runs" / r.run_id and r.run_id == run_id(r.config)
    (k16,) = results.groups["mnist"]["A-VI k=16"]
    assert [e["epoch"] for e in k16.mse_trace] == [0, 1, 2, 3, 4] and k16.gap is None  # its gap.json cut short
    assert results.groups["mnist"]["F-VI"][0].gap is None


def test_the_train_mse_trace_fills_the_epochs_between_evaluations(mixed):
    from amortized_bayes.analysis import Crossing, first_crossing

    (k16,) = load_results(mixed).groups["mnist"]["A-VI k=16"]
    assert [e["epoch"] for e in k16.curve("train_mse")] == [0, 1, 2, 3, 4]
    # Where an evaluation and the trace share an epoch, the evaluation's record is the one kept.
    assert [e["wall_time"] for e in k16.curve("train_mse")] == [0.0, 1.5, 2.0, 4.5, 4.0]
    assert [e["epoch"] for e in k16.curve("neg_elbo")] == [0, 2, 4]
    assert [e["epoch"] for e in k16.curve("test_mse")] == [0, 2, 4]
    assert first_crossing(k16.curve("train_mse"), "train_mse", 0.05) == Crossing(3.0, 4.5, True)
    row = {str(m): r for m, r in dataset_table(load_results(mixed), "mnist").rows.items()}["A-VI k=16"]
    assert row.epochs_to_tol == 3 and row.seconds_to_tol == 4.5


def test_the_table_compares_each_avi_with_the_fvi_of_its_own_decoder_and_nothing_else(mixed):
    table = dataset_table(load_results(mixed), "mnist")
    rows = {str(m): r for m, r in table.rows.items()}
    assert list(rows) == ["A-VI k=16", "A-VI k=64", "F-VI", "constant-VI", "A-VI k=64, conv decoder",
                          "F-VI, conv decoder"]
    assert all(str(row.method) == label for label, row in rows.items())
    assert {str(a): str(c.fvi) for a, c in table.comparisons.items()} == {
        "A-VI k=16": "F-VI", "A-VI k=64": "F-VI", "A-VI k=64, conv decoder": "F-VI, conv decoder"}
    assert [s.seed for s in rows["A-VI k=64"].per_seed] == [0, 1] and rows["F-VI"].test_inference_seconds == 3.5
    assert [s.test_inference_seconds for s in rows["F-VI"].per_seed] == [3.0, 4.0]
    assert math.isnan(rows["A-VI k=64"].test_inference_seconds)
    # Per image: the seeds' 3.0 and 4.0 s over DataConfig's default 1,000 test images.
    assert [s.test_inference_ms_per_image for s in rows["F-VI"].per_seed] == [3.0, 4.0]
    assert rows["F-VI"].test_inference_ms_per_image == 3.5

    wide = table.comparisons[next(m for m in table.comparisons if str(m) == "A-VI k=64")]
    f_mse = statistics.median([0.07, 0.06])
    assert wide.mse_ratio == pytest.approx(0.04 / f_mse)
    lo, hi = wide.mse_ratio_ci
    assert lo == pytest.approx(0.04 / 0.07) and hi == pytest.approx(0.04 / 0.06)  # the resampled extremes
    # F-VI never reached 0.05 (its runs end at epoch 2, 2 s); A-VI k=64 did at epoch 2: at least 1x.
    assert wide.speedup.unit == "seconds" and wide.speedup_epochs.unit == "epochs"
    assert wide.speedup_epochs.low == pytest.approx(1.0) and math.isinf(wide.speedup_epochs.high)
    # The conv F-VI run lost its evaluations: NaN numbers, no crossing, no speed-up, and no crash.
    conv_fvi = rows["F-VI, conv decoder"]
    assert math.isnan(conv_fvi.train_mse) and math.isnan(conv_fvi.neg_elbo_per_image)
    assert conv_fvi.per_seed[0].crossing is None and conv_fvi.epochs_to_tol_reached == 0
    conv = table.comparisons[next(m for m in table.comparisons if m.decoder == "conv")]
    assert conv.speedup is None and conv.speedup_epochs is None and math.isnan(conv.mse_ratio)


def test_the_number_of_test_images_of_a_run():
    from types import SimpleNamespace

    from amortized_bayes.analysis import RunData
    from amortized_bayes.config import DataConfig

    def n_test(data):
        return RunData("id", None, SimpleNamespace(data=data), 0, {}, [], {}).n_test

    assert n_test(DataConfig(n_test=250)) == 250
    assert n_test(DataConfig(n_test=None)) == 10_000  # the whole MNIST test split
    assert math.isnan(n_test(DataConfig(n_test=0)))
    # A file dataset without n_test whose file is not on this machine: unknown, not an error.
    missing = SimpleNamespace(n_test=None, is_file=True, dataset="file:/nonexistent/x.npz")
    assert math.isnan(n_test(missing))


def test_a_dataset_without_a_tolerance_has_no_crossings_and_no_speed_ups(mixed):
    results = load_results(mixed)
    table = dataset_table(results, "fashion-mnist")
    assert table.tolerance is None and len(table.rows) == 2 and len(table.comparisons) == 1
    assert all(s.crossing is None for row in table.rows.values() for s in row.per_seed)
    assert all(math.isnan(row.epochs_to_tol) and row.epochs_to_tol_reached == 0 for row in table.rows.values())
    (c,) = table.comparisons.values()
    assert c.speedup is None and c.speedup_epochs is None and c.mse_ratio == pytest.approx(0.1 / 0.2)
    empty = dataset_table(results, "kmnist")
    assert empty.rows == {} and empty.comparisons == {} and gap_table(results, "kmnist") == {}


def test_a_tolerance_on_test_mse_is_kept_with_everything_else(mixed):
    results = load_results(mixed)
    on_test = with_tolerance(results, "test_mse", 0.05)
    assert on_test.tolerance("mnist") == ("test_mse", 0.05) and on_test.tolerance("fashion-mnist") == (
        "test_mse", 0.05)
    assert on_test.grid["tolerance_overridden"] is True and "tolerance_overridden" not in results.grid
    assert on_test.root == results.root and on_test.unfinished == results.unfinished == []
    rows = {str(m): r for m, r in dataset_table(on_test, "mnist").rows.items()}
    # Test MSE is the train MSE + 0.01 here: A-VI k=64 at 0.05 by epoch 2; the conv A-VI (0.04) too.
    assert rows["A-VI k=64"].epochs_to_tol == 2 and rows["A-VI k=16"].epochs_to_tol == 4
    assert rows["A-VI k=64, conv decoder"].epochs_to_tol == 2


def test_an_unfinished_run_survives_a_tolerance_set_afterwards(folder):
    results = load_results(folder)
    assert with_tolerance(results, "train_mse", 0.1).unfinished == results.unfinished != []


def test_gap_table_skips_unmeasured_methods_and_splits(mixed):
    table = {str(m): row for m, row in gap_table(load_results(mixed), "mnist").items()}
    assert list(table) == ["A-VI k=64", "constant-VI"]  # k=16's gap.json was cut short; F-VI unmeasured
    assert table["A-VI k=64"]["seeds"] == 2 and list(table["A-VI k=64"]["splits"]) == ["train"]
    assert table["A-VI k=64"]["splits"]["train"]["amortization_gap"]["median"] == 2.5
    const = table["constant-VI"]
    assert const["seeds"] == 1 and const["theta"] == "posterior mean" and list(const["splits"]) == ["test"]
    assert const["splits"]["test"]["images"] == 4 and const["splits"]["test"]["amortization_gap"]["median"] == 9.0
    assert const["splits"]["test"]["refinement_to_90pct_of_gap"] is None


def test_reaching_fvis_own_final_values_hand_computed(folder):
    from amortized_bayes.analysis import fvi_targets

    rows = fvi_targets(load_results(folder), "mnist")
    assert [(r.metric, r.margin, str(r.method)) for r in rows] == [
        (metric, margin, label) for metric in ("train_mse", "neg_elbo") for margin in (0.01, 0.05)
        for label in ("A-VI k=64", "F-VI")]
    by = {(r.metric, r.margin, str(r.method)): r for r in rows}
    # F-VI's final train MSEs 0.04, 0.06, 0.055: median 0.055, so the 1% target is 0.05555. A-VI's seeds
    # get there at epochs 2, 3, 2 (4, 6, 4 s); F-VI's at 3 (3 s), never (0.06 at epoch 4), 4 (4 s).
    avi, fvi = by[("train_mse", 0.01, "A-VI k=64")], by[("train_mse", 0.01, "F-VI")]
    assert avi.target == pytest.approx(0.055 * 1.01) and fvi.target == avi.target
    assert [(c.epochs, c.seconds, c.reached) for c in fvi.crossings] == [(3, 3, True), (4, 4, False), (4, 4, True)]
    assert (avi.epochs, avi.seconds, avi.reached) == (2, 4, 3) and (fvi.epochs, fvi.seconds, fvi.reached) == (4, 4, 2)
    assert fvi.speedup is None and fvi.speedup_epochs is None
    assert avi.speedup_epochs.exact and avi.speedup_epochs.low == pytest.approx(4 / 2)
    assert avi.speedup.exact and avi.speedup.low == pytest.approx(4 / 4)
    assert by[("train_mse", 0.05, "A-VI k=64")].target == pytest.approx(0.055 * 1.05)
    # -ELBO per image: F-VI's finals 100, 100.5, 99, median 100; 1% target 101 (101,000 over N = 1,000).
    # F-VI reaches it at epochs 3, 4, 2 (median 3); A-VI only seed 0, at epoch 4 (8 s): at most 3/4 as fast.
    avi, fvi = by[("neg_elbo", 0.01, "A-VI k=64")], by[("neg_elbo", 0.01, "F-VI")]
    assert avi.target == pytest.approx(101.0) and (fvi.epochs, fvi.seconds) == (3, 3)
    assert math.isinf(avi.epochs) and avi.epochs_lower == 4 and avi.seconds_lower == 8 and avi.reached == 1
    assert avi.speedup_epochs.low == 0 and avi.speedup_epochs.high == pytest.approx(3 / 4)
    # 5%: 105 per image; F-VI is there at its first evaluation, A-VI at epochs 0, 1, 3 (0, 2, 6 s).
    avi5 = by[("neg_elbo", 0.05, "A-VI k=64")]
    assert avi5.target == pytest.approx(105.0) and (avi5.epochs, avi5.seconds) == (1, 2)
    assert by[("neg_elbo", 0.05, "F-VI")].epochs == 0


def test_a_negative_final_elbo_target_is_loosened_not_tightened(mixed):
    from amortized_bayes.analysis import fvi_targets

    # The fashion-mnist pair: -ELBO 50,000 per run over N = 1,000 images: 50 per image.
    rows = {(r.metric, r.margin, str(r.method)): r for r in fvi_targets(load_results(mixed), "fashion-mnist")}
    assert rows[("neg_elbo", 0.05, "F-VI")].target == pytest.approx(52.5)
    for path in (mixed / "runs").glob("fashion-mnist-*"):
        evals = [json.loads(line) for line in (path / "evals.jsonl").read_text().splitlines()]
        (path / "evals.jsonl").write_text("".join(json.dumps({**e, "neg_elbo": -e["neg_elbo"]}) + "\n"
                                                  for e in evals))
    rows = {(r.metric, r.margin, str(r.method)): r for r in fvi_targets(load_results(mixed), "fashion-mnist")}
    assert rows[("neg_elbo", 0.05, "F-VI")].target == pytest.approx(-47.5)
    # The conv F-VI lost its evaluations: no target for the conv pair, and no error.
    assert {str(r.method) for r in fvi_targets(load_results(mixed), "mnist")} == {
        "A-VI k=16", "A-VI k=64", "F-VI", "constant-VI"}


def test_the_report_prints_the_reaching_fvi_table(folder):
    from amortized_bayes.report import build_report

    for gap in (folder / "runs").glob("*/gap.json"):  # the gap figure needs curves this folder does not have
        gap.unlink()
    md = build_report(folder)["markdown"].read_text()
    assert "### Reaching F-VI's own final values" in md
    lines = md.splitlines()
    row = next(line for line in lines if line.startswith("| train MSE <= 0.05555 (F-VI's final + 1%) | A-VI k=64 |"))
    assert row.split(" | ")[2:4] == ["2 (3/3)", "4 (3/3)"] and "1.00x" in row and "2.00x" in row
    fvi = next(line for line in lines if line.startswith("| train MSE <= 0.05555 (F-VI's final + 1%) | F-VI |"))
    assert fvi.split(" | ")[2:4] == ["4 (2/3)", "4 (2/3)"]
    head = next(line for line in lines if line.startswith("| method | seeds |")).split(" | ")
    avi = next(line for line in lines if line.startswith("| A-VI k=64 | 3 |")).split(" | ")
    assert head[3] == "test -ELBO/image (nats)" and avi[3] == f"{102 + 3:.2f}"  # as the train column
    rows = dataset_table(load_results(folder), "mnist").rows
    avi_row = next(r for m, r in rows.items() if str(m) == "A-VI k=64")
    assert avi[head.index("test MSE")] == f"{avi_row.test_mse:.4f}"  # as the train MSE
    assert avi[head.index("test -ELBO vs F-VI")].startswith(f"{105 / 103:.3f} (95% CI")
    elbo = next(line for line in lines if line.startswith("| -ELBO/image <= 101 (F-VI's final + 1%) | A-VI k=64 |"))
    assert elbo.split(" | ")[2:4] == [">= 4 (1/3)", ">= 8 (1/3)"] and "at most 0.75x" in elbo


def test_runs_without_a_test_elbo_get_no_test_elbo_columns(mixed):
    from amortized_bayes.report import table_rows

    head, rows = table_rows(dataset_table(load_results(mixed), "mnist"))
    assert "test -ELBO/image (nats)" not in head and "test MSE vs F-VI" not in head
    assert all(len(r) == len(head) for r in rows)


def test_the_verdicts_say_exactly_what_was_compared(folder, mixed):
    from amortized_bayes.analysis import describe_ratio, verdicts

    table = dataset_table(load_results(folder), "mnist")
    assert (table.dataset, table.metric, table.tolerance) == ("mnist", "train_mse", 0.05)
    (c,) = table.comparisons.values()
    elbo, speed = table.verdicts
    assert elbo.claim == "A-VI with k >= 64 reaches F-VI's ELBO and MSE"
    assert elbo.why == (f"A-VI k=64: -ELBO vs F-VI {describe_ratio(c.elbo_ratio, c.elbo_ratio_ci, 3)}, train MSE "
                        f"{c.mse_ratio:.2f}x F-VI's. 'Reaches' means -ELBO within 1% of F-VI's (the interval's "
                        "lower end of 1 + (A - F)/|F| at most 1.01; A/F for a positive F) and train MSE within 10%.")
    assert speed.claim == "A-VI is 2-3x faster than F-VI"
    assert speed.why == (f"A-VI k=64: speed-up over F-VI in training seconds to train_mse <= 0.05: "
                         f"{c.speedup.describe()}.")
    # Without a wide A-VI (only k=16 compared) neither claim can be judged, and the reason is given.
    mixed_table = dataset_table(load_results(mixed), "mnist")
    narrow = {m: c for m, c in mixed_table.comparisons.items() if m.width == 16}
    why = "the grid needs F-VI and A-VI with k >= 64"
    assert verdicts(mixed_table.rows, narrow, "train_mse", 0.05) == [
        type(elbo)("A-VI with k >= 64 reaches F-VI's ELBO and MSE", "not testable", why),
        type(elbo)("A-VI is 2-3x faster than F-VI", "not testable", why)]
    fashion = dataset_table(load_results(mixed), "fashion-mnist")
    assert fashion.verdicts[1] == type(elbo)("A-VI is 2-3x faster than F-VI", "not testable",
                                             "the grid states no tolerance for this dataset")
    assert fashion.verdicts[0].verdict.endswith(" on one seed (no interval)")


def test_the_elbo_verdict_reads_the_intervals_lower_end_and_counts_only_the_compared_seeds(mixed):
    import dataclasses

    from amortized_bayes.analysis import verdicts

    table = dataset_table(load_results(mixed), "mnist")
    mlp_rows = {m: r for m, r in table.rows.items() if m.decoder == "mlp"}  # k=64 and F-VI: 2 seeds each
    (wide,) = [m for m in table.comparisons if m.width == 64 and m.decoder == "mlp"]
    # Within 1% by the interval's lower end (0.99), though not by its upper end (1.05): supported.
    c = dataclasses.replace(table.comparisons[wide], elbo_ratio=1.0, elbo_ratio_ci=(0.99, 1.05), mse_ratio=1.0)
    elbo = verdicts(mlp_rows, {wide: c}, "train_mse", 0.05)[0]
    # A-VI k=16 and constant-VI have one seed each, but the verdict does not rest on them.
    assert elbo.verdict == "supported"
    assert verdicts(mlp_rows, {wide: dataclasses.replace(c, elbo_ratio_ci=(1.02, 1.05))}, "train_mse",
                    0.05)[0].verdict == "not supported"
    # An F-VI of one seed is one the verdict rests on.
    one_fvi = {m: (dataclasses.replace(r, per_seed=r.per_seed[:1]) if m.family == "factorized" else r)
               for m, r in mlp_rows.items()}
    assert verdicts(one_fvi, {wide: c}, "train_mse", 0.05)[0].verdict == "supported on one seed (no interval)"


def test_negative_elbos_compare_by_their_difference_relative_to_fvi(mixed):
    """With a Gaussian likelihood of small variance a -ELBO can be negative: A-VI at -429 nats per image
    against F-VI at -54 has the far higher ELBO. The comparison reads 1 + (A - F)/|F| (A/F when F > 0),
    below 1 here, and the ELBO verdict calls it reached."""
    from amortized_bayes.analysis import signed_ratio

    assert signed_ratio(-429.0, -54.0) == pytest.approx(1 + (-429 + 54) / 54)
    # -50 is a higher -ELBO than -54 (a lower ELBO): above 1, as 770 against 766 would be.
    assert signed_ratio(-50.0, -54.0) == pytest.approx(1 + 4 / 54) and signed_ratio(-60.0, -54.0) < 1.0
    assert signed_ratio(766.0, 767.0) == 766.0 / 767.0
    assert signed_ratio(-321.0, 49.0) == -321.0 / 49.0 and math.isinf(signed_ratio(1.0, 0.0))
    for path, per_image, test_per_image in (("fashion-mnist-avi-*", -429.0, -435.0),
                                            ("fashion-mnist-fvi-*", -54.0, -349.0)):
        (run,) = (mixed / "runs").glob(path)
        evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
        (run / "evals.jsonl").write_text("".join(
            json.dumps({**e, "neg_elbo": per_image * N, "test_neg_elbo_per_image": test_per_image}) + "\n"
            for e in evals))
    table = dataset_table(load_results(mixed), "fashion-mnist")
    (c,) = table.comparisons.values()
    assert c.elbo_ratio == pytest.approx(1 + (-429 + 54) / 54) and c.elbo_ratio_ci == pytest.approx((c.elbo_ratio,) * 2)
    # The test images' -ELBOs compare the same way, interval included (a plain ratio would be 1.25).
    assert c.test_elbo_ratio == pytest.approx(1 + (-435 + 349) / 349)
    assert c.test_elbo_ratio_ci == pytest.approx((c.test_elbo_ratio,) * 2)
    assert table.verdicts[0].verdict == "supported on one seed (no interval)"


def test_signed_ratio_is_exactly_the_plain_ratio_for_a_positive_reference_and_infinite_at_zero():
    """For F-VI's -ELBO > 0 the comparison is A/F itself, bit for bit (0.3/0.1 is 2.9999999999999996,
    while 1 + (0.3 - 0.1)/0.1 rounds to 3.0), so tables of positive -ELBOs read as before; a zero
    reference gives inf whatever the numerator's sign, element by element, with no warning printed."""
    import warnings

    from amortized_bayes.analysis import signed_ratio

    assert signed_ratio(0.3, 0.1) == 0.3 / 0.1 and signed_ratio(2.0, 1.0) == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero and 0/0 warnings would raise here
        out = signed_ratio([1.0, -1.0, 0.0, -429.0, 0.3], [0.0, 0.0, 0.0, -54.0, 0.1])
    assert isinstance(out, np.ndarray) and out.shape == (5,)
    assert np.isinf(out[:3]).all() and (out[:3] > 0).all()
    assert out[3] == 1 + (-429.0 + 54.0) / 54.0 and out[4] == 0.3 / 0.1


def test_a_speed_up_says_what_censoring_leaves_of_it_and_its_interval_only_when_there_is_one():
    """Every form of SpeedUp.describe, with one seed each (no interval: said so) and with several."""
    from amortized_bayes.analysis import SpeedUp

    one, many = (1, 1), (3, 2)
    inf = math.inf
    cases = [
        (SpeedUp(2.5, 2.5, (2.0, 3.0), seeds=many), "2.50x (95% CI 2.00-3.00)"),
        (SpeedUp(2.5, 2.5, (2.5, 2.5), seeds=one), "2.50x (one seed each, no interval)"),
        (SpeedUp(4.0, inf, (3.0, inf), seeds=many), "at least 4.00x (95% CI from 3.00)"),
        (SpeedUp(4.0, inf, (4.0, inf), seeds=one), "at least 4.00x (one seed each, no interval)"),
        (SpeedUp(0.0, 0.8, (0.0, 0.9), seeds=many), "at most 0.80x (95% CI to 0.90)"),
        (SpeedUp(0.0, 0.8, (0.0, 0.8), seeds=one), "at most 0.80x (one seed each, no interval)"),
        (SpeedUp(1.5, 3.0, (1.2, 3.5), seeds=many), "1.50x to 3.00x (95% CI 1.20-3.50)"),
        (SpeedUp(1.5, 3.0, (1.5, 3.0), seeds=one), "1.50x to 3.00x (one seed each, no interval)"),
        (SpeedUp(0.0, inf, (0.0, inf), seeds=many), "unknown (neither median reached it)"),
    ]
    for speedup, text in cases:
        assert speedup.describe() == text



def test_reaching_fvi_reads_on_past_a_method_without_a_target_or_a_curve(mixed):
    """Methods are read in table order (the MLP pair before the conv pair): one without a target (its
    decoder's F-VI has no final value) or without a curve (its evaluations lost) is left out, and the
    methods after it are still read."""
    from amortized_bayes.analysis import fvi_targets

    groups = load_results(mixed).groups["mnist"]
    for run in groups["F-VI"]:
        (run.path / "evals.jsonl").write_text("")  # the MLP pair, first in table order, loses its target
    (conv_avi,) = groups["A-VI k=64, conv decoder"]
    (conv_avi.path / "evals.jsonl").write_text("")  # read before the conv F-VI, now without a curve
    (conv_fvi,) = groups["F-VI, conv decoder"]
    (conv_fvi.path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _evals([0.2, 0.05], [0, 2])))
    rows = fvi_targets(load_results(mixed), "mnist")
    assert [(r.metric, r.margin, str(r.method)) for r in rows] == [
        (metric, margin, "F-VI, conv decoder") for metric in ("train_mse", "neg_elbo") for margin in (0.01, 0.05)]
    assert rows[0].target == pytest.approx(0.05 * 1.01) and (rows[0].epochs, rows[0].reached) == (2, 1)
    # An F-VI whose last evaluation lacks a metric has no final value of it either: no target.
    for run in groups["F-VI"]:
        evals = [{k: v for k, v in e.items() if k != "train_mse"} for e in _evals([0.2, 0.05], [0, 2])]
        (run.path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    rows = fvi_targets(load_results(mixed), "mnist")
    train_mse_rows = [(r.margin, str(r.method)) for r in rows if r.metric == "train_mse"]
    assert train_mse_rows == [(0.01, "F-VI, conv decoder"), (0.05, "F-VI, conv decoder")]
