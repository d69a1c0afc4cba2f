"""From stored results to the numbers a reader needs (SPEC §4, §7): tolerance crossings, seed
aggregates, bootstrap confidence intervals, A-VI vs F-VI ratios and plain-language verdicts.

Everything here reads the result store and computes; nothing trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import RunConfig
from .experiments.lifecycle import RunPaths, RunState
from .experiments.store import ResultStore, read_evals, read_json, read_mse_trace, read_steps

BOOTSTRAP_RESAMPLES = 2000
ELBO_MARGIN = 0.01  # "reaches F-VI's ELBO": -ELBO within 1% of F-VI's
MSE_MARGIN = 0.10   # "reaches F-VI's MSE": train MSE within 10% of F-VI's


def iterations_to_tolerance(evals: list[dict], metric: str, tol: float) -> dict | None:
    """The first evaluation at which ``metric`` <= ``tol``: its epoch, step and training seconds.
    None when it is never reached."""
    for e in evals:
        value = e.get(metric)
        if value is not None and value <= tol:
            return {"epoch": e["epoch"], "step": e["step"], "seconds": e["wall_time"]}
    return None


class Method(str):
    """The curve a run belongs to, read from its config: the family (its registered name, its title
    and its encoder's width, None without one), the objective, and where it goes in tables. It *is* its
    label (``"A-VI k=64"``, ``"F-VI (legacy-2024)"``), so it keys tables and names figure legends, but
    nothing is ever parsed back from that text."""

    family: str
    width: int | None
    objective: str
    rank: int
    decoder: str

    def __new__(cls, label: str, *, family: str, width: int | None, objective: str, rank: int,
                decoder: str) -> Method:
        method = super().__new__(cls, label)
        method.family, method.width, method.objective, method.rank = family, width, objective, rank
        method.decoder = decoder
        return method

    def __reduce__(self):
        return (_method, (str(self), self.family, self.width, self.objective, self.rank, self.decoder))

    @property
    def model(self) -> tuple[str, str]:
        """What A-VI is compared within: F-VI of the same objective and decoder architecture."""
        return (self.objective, self.decoder)

    @property
    def order(self) -> tuple:
        """Sort key: decoder (MLP first), family rank (A-VI, SA-VI, F-VI, constant-VI, then others),
        width, label."""
        return (self.decoder != "mlp", self.decoder, self.rank, self.width or 0, str(self))


def _method(label, family, width, objective, rank, decoder) -> Method:
    return Method(label, family=family, width=width, objective=objective, rank=rank, decoder=decoder)


def method_of(config: RunConfig) -> Method:
    """The :class:`Method` of a run's config."""
    from .families import get_family

    family = get_family(config.family.name)
    label = family.label(config.family)
    if config.objective.kind != "elbo":
        label += f" ({config.objective.kind})"
    if config.model.architecture != "mlp":
        label += f", {config.model.architecture} decoder"
    return Method(label, family=config.family.name, width=family.encoder_width(config.family),
                  objective=config.objective.kind, rank=family.rank, decoder=config.model.architecture)


def method_label(config: RunConfig) -> Method:
    """The curve a run belongs to (see :class:`Method`)."""
    return method_of(config)


def methods_of(by_method: dict[str, list[RunData]]) -> list[tuple[Method, list[RunData]]]:
    """A dataset's groups as (:class:`Method`, runs) in table order; each method read from the config of
    its first run (so a group keyed by a plain string still has its family, width and objective)."""
    pairs = [(method_of(runs[0].config), runs) for runs in by_method.values() if runs]
    return sorted(pairs, key=lambda pair: pair[0].order)


@dataclass
class RunData:
    run_id: str
    path: Path
    config: RunConfig
    seed: int
    steps: dict
    evals: list[dict]
    summary: dict
    gap: dict | None = None  # gap.json, once `amortized-bayes gap` has measured the run (with its splits)
    mse_trace: list[dict] = field(default_factory=list)  # mse_trace.jsonl (train.mse_every)

    @property
    def n(self) -> int:
        return self.config.data.n_train or 60_000

    @property
    def n_test(self) -> float:
        """Test images the run's evaluations use: ``data.n_test`` (NaN for 0), or the whole test split
        (10,000 for MNIST and Fashion-MNIST; a file dataset's own count when the file can be read here,
        else NaN)."""
        data = self.config.data
        if data.n_test is not None:
            return data.n_test or math.nan  # 0: no test images, no cost per image
        if not data.is_file:
            return 10_000
        from .data.user_dataset import UserDatasetError, test_split_size

        try:
            return test_split_size(data)
        except (OSError, UserDatasetError):  # the file is on the machine that trained, not here
            return math.nan

    @property
    def files(self) -> RunPaths:
        return RunPaths(self.path)

    def curve(self, metric: str) -> list[dict]:
        """Every stored record of ``metric`` in epoch order: the evaluations, and for ``train_mse`` the
        trace recorded between them (``train.mse_every``), one record per epoch."""
        records = {e["epoch"]: e for e in self.evals if metric in e}
        if metric == "train_mse":
            for e in self.mse_trace:
                records.setdefault(e["epoch"], e)
        return [records[epoch] for epoch in sorted(records)]


@dataclass
class Results:
    """All finished runs of a folder, grouped by dataset and method."""

    root: Path
    grid: dict
    groups: dict[str, dict[str, list[RunData]]] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)

    def tolerance(self, dataset: str) -> tuple[str, float | None]:
        tol = self.grid.get("tolerance", {}) or {}
        return tol.get("metric", "train_mse"), tol.get(dataset)


TOLERANCE_METRICS = ("train_mse", "test_mse")


def with_tolerance(results: Results, metric: str, value: float) -> Results:
    """The same results judged against ``metric`` <= ``value`` on every dataset, instead of the grid's
    tolerance (the grid as stored is left untouched; the report says which tolerance it used)."""
    if metric not in TOLERANCE_METRICS:
        raise ValueError(f"tolerance metric must be one of {', '.join(TOLERANCE_METRICS)}, got {metric!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tolerance must be a positive number, got {value}")
    tolerance = {"metric": metric, **{dataset: value for dataset in results.groups}}
    grid = {**results.grid, "tolerance": tolerance, "tolerance_overridden": True}
    return Results(results.root, grid, results.groups, results.unfinished)


def load_results(root: str | Path) -> Results:
    store = ResultStore(root)
    results = Results(Path(root), read_json(Path(root) / "grid.json") or {})
    for rec in store.records():
        if rec.state != RunState.DONE:
            results.unfinished.append(f"{rec.run_id} ({rec.display_state})")
            continue
        gap = read_json(rec.files.gap)
        run = RunData(rec.run_id, rec.path, rec.config, rec.config.train.seed, read_steps(rec.path),
                      read_evals(rec.path), read_json(rec.files.summary) or {},
                      gap if isinstance(gap, dict) and gap.get("splits") else None,  # not one cut short
                      read_mse_trace(rec.path))
        by_method = results.groups.setdefault(rec.config.data.label, {})
        by_method.setdefault(method_label(rec.config), []).append(run)
    for by_method in results.groups.values():
        for runs in by_method.values():
            runs.sort(key=lambda r: r.seed)
    return results


def _resample_rows(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """BOOTSTRAP_RESAMPLES resamples of each group's indices, drawn group after group within each
    resample (the order the one-resample-at-a-time loop drew them in, so that every interval stays the
    number it was): one (BOOTSTRAP_RESAMPLES, size) index array per group."""
    draws = [[rng.integers(0, n, n) for n in sizes] for _ in range(BOOTSTRAP_RESAMPLES)]
    return [np.stack([d[g] for d in draws]) for g in range(len(sizes))]


def signed_ratio(num, den):
    """1 + (num - den) / |den|: num / den where den > 0 and, where den < 0, the same reading (1 equal,
    below 1 num is lower) instead of a ratio whose sense flips with the sign. -ELBOs are compared with
    it: with a Gaussian likelihood of small variance they can be negative (densities above 1), and
    -429 against -54 nats is a much higher ELBO, not "7.9 times" F-VI's -ELBO. Floats or arrays."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / den, 1 + (num - den) / np.abs(den))
        out = np.where(den == 0, math.inf, out)
    return float(out) if out.ndim == 0 else out


def bootstrap_ratio_ci(num: list[float], den: list[float], level: float = 0.95, seed: int = 0,
                       signed: bool = False) -> tuple[float, float]:
    """Bootstrap interval of median(num) / median(den) (with ``signed``, of their :func:`signed_ratio`),
    seeds resampled within each group."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    # rng.choice(x, n) with replacement draws rng.integers(0, len(x), n): the same resamples, indexed.
    ia, ib = _resample_rows(np.random.default_rng(seed), (len(a), len(b)))
    ma, mb = np.median(a[ia], axis=1), np.median(b[ib], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # x / 0 and inf - inf (NaN) are as intended
        ratios = signed_ratio(ma, mb) if signed else np.where(mb != 0, ma / mb, math.inf)
        lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Crossing:
    """When one seed first reached a tolerance (``reached``), or, censored, how far it ran without
    reaching it: its last evaluation's epoch and training seconds, so that it took at least that long."""

    epochs: float
    seconds: float
    reached: bool


def first_crossing(curve: list[dict], metric: str, tol: float) -> Crossing | None:
    """The :class:`Crossing` of one run's ``curve`` (records in epoch order, as :meth:`RunData.curve`
    gives them); None for a run without records."""
    hit = iterations_to_tolerance(curve, metric, tol)
    if hit is not None:
        return Crossing(float(hit["epoch"]), float(hit["seconds"]), True)
    if not curve:
        return None
    return Crossing(float(curve[-1]["epoch"]), float(curve[-1]["wall_time"]), False)


def censored_median(values: list[float], reached: list[bool]) -> tuple[float, float]:
    """Bounds on the median of times of which some are censored (not ``reached``: the true time is
    at least the value): (the median with each censored time as it is, the median with each censored
    time infinite). Equal when censoring does not touch the median."""
    x = np.asarray(values, float)
    if len(x) == 0:
        return (math.nan, math.nan)
    upper = np.where(np.asarray(reached, bool), x, math.inf)
    return float(np.median(x)), float(np.median(upper))


def _ratio(num, den):
    """num / den elementwise (floats or arrays), with inf / inf = NaN, x / 0 = inf for x > 0 and
    0 / 0 = 1: both were there at their first evaluation (a loose target), as fast as each other."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den == 0, np.where(num > 0, math.inf, 1.0), num / den)
    out = np.where(np.isinf(num) & np.isinf(den), math.nan, out)
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class SpeedUp:
    """How many times faster A-VI reaches a tolerance than F-VI: median(F-VI) / median(A-VI) over
    seeds, each seed that never reached it censored at its last evaluation.

    ``low``/``high``: the bounds that censoring leaves on that ratio (equal when no median is
    censored; ``high`` infinite when F-VI's median is censored: "at least ``low``"; ``low`` 0 when
    A-VI's is: "at most ``high``"). ``ci``: a 95% percentile bootstrap interval over seeds (resampled
    within each family), its lower end from the lower bound and its upper end from the upper bound."""

    low: float
    high: float
    ci: tuple[float, float]
    unit: str = "seconds"
    seeds: tuple[int, int] = (0, 0)  # (F-VI, A-VI) seeds behind it; with one each, ci is a point

    @property
    def exact(self) -> bool:
        return self.low == self.high

    @property
    def known(self) -> bool:
        """False when both medians are censored, so that nothing bounds the ratio."""
        return self.low > 0 or math.isfinite(self.high)

    @property
    def has_interval(self) -> bool:
        """False with one seed on each side: the bootstrap can only return the point itself."""
        return max(self.seeds) > 1

    def describe(self) -> str:
        lo, hi = self.ci
        if not self.known:
            return "unknown (neither median reached it)"
        one = " (one seed each, no interval)"
        if self.exact:
            return f"{self.low:.2f}x" + (f" (95% CI {lo:.2f}-{hi:.2f})" if self.has_interval else one)
        if math.isinf(self.high):
            return f"at least {self.low:.2f}x" + (f" (95% CI from {lo:.2f})" if self.has_interval else one)
        if self.low == 0:
            return f"at most {self.high:.2f}x" + (f" (95% CI to {hi:.2f})" if self.has_interval else one)
        return f"{self.low:.2f}x to {self.high:.2f}x" + (f" (95% CI {lo:.2f}-{hi:.2f})" if self.has_interval else one)


def describe_ratio(value: float, ci: tuple[float, float], seeds: int, digits: int = 3) -> str:
    """A ratio of medians with its bootstrap interval, or, when ``seeds`` (the larger group's count) is 1,
    the ratio alone and that it has no interval (a one-seed bootstrap returns the point as its interval)."""
    if seeds < 2:
        return f"{value:.{digits}f} (one seed each, no interval)"
    return f"{value:.{digits}f} (95% CI {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def speedup(fvi: list[Crossing], avi: list[Crossing], unit: str = "seconds", level: float = 0.95,
            seed: int = 0) -> SpeedUp:
    """The :class:`SpeedUp` of A-VI over F-VI in ``unit`` ("seconds" or "epochs") from each seed's
    :class:`Crossing`. The one place this ratio is computed: the report, ``report --tolerance`` and
    the replication tables all call it."""
    if not fvi or not avi:
        raise ValueError("speedup needs at least one F-VI and one A-VI seed")
    f_t, f_r = np.array([getattr(c, unit) for c in fvi], float), np.array([c.reached for c in fvi])
    a_t, a_r = np.array([getattr(c, unit) for c in avi], float), np.array([c.reached for c in avi])

    def bounds(fi: np.ndarray, ai: np.ndarray):
        """Lower and upper bounds of the ratio for the resamples in the rows of fi and ai (index arrays,
        (R, n_fvi) and (R, n_avi)): censored medians (censored_median's, row by row)."""
        f_lo, f_hi = np.median(f_t[fi], axis=1), np.median(np.where(f_r[fi], f_t[fi], math.inf), axis=1)
        a_lo, a_hi = np.median(a_t[ai], axis=1), np.median(np.where(a_r[ai], a_t[ai], math.inf), axis=1)
        low = np.where(np.isinf(a_hi), 0.0, _ratio(f_lo, a_hi))
        high = np.where(np.isinf(f_hi), math.inf, _ratio(f_hi, a_lo))
        return low, high

    (low,), (high,) = bounds(np.arange(len(fvi))[None], np.arange(len(avi))[None])
    low, high = float(low), float(high)
    lows, highs = bounds(*_resample_rows(np.random.default_rng(seed), (len(fvi), len(avi))))
    tail = (1 - level) / 2
    return SpeedUp(low, high, (_quantile(lows, tail), _quantile(highs, 1 - tail)), unit, (len(fvi), len(avi)))


def _quantile(values: list[float], q: float) -> float:
    """np.quantile with linear interpolation, except next to an infinite value, where interpolation
    gives NaN (inf - inf): there the nearer order statistic on the outer side."""
    with np.errstate(invalid="ignore"):
        value = float(np.nanquantile(values, q))
    if math.isnan(value):
        value = float(np.nanquantile(values, q, method="higher" if q > 0.5 else "lower"))
    return value


@dataclass(frozen=True)
class SeedRow:
    """One seed's final numbers and its :class:`Crossing` of the tolerance (None without a tolerance)."""

    seed: int
    neg_elbo_per_image: float
    train_mse: float
    test_mse: float
    seconds_per_step: float
    test_inference_seconds: float
    crossing: Crossing | None
    test_neg_elbo_per_image: float = math.nan  # NaN for runs evaluated before it was recorded
    test_inference_ms_per_image: float = math.nan  # test_inference_seconds over the test images, in ms

    @property
    def epochs_to_tol(self) -> float | None:
        """Epochs to the tolerance; None when never reached."""
        return self.crossing.epochs if self.crossing is not None and self.crossing.reached else None

    @property
    def seconds_to_tol(self) -> float | None:
        return self.crossing.seconds if self.crossing is not None and self.crossing.reached else None


@dataclass(frozen=True)
class MethodRow:
    """One method's row of a dataset's table: per-seed rows and their medians. Times to tolerance:
    the median with seeds that never reached it as infinitely late (``epochs_to_tol``), and censored
    at their last evaluation (``epochs_to_tol_lower``: the median took at least this long)."""

    method: Method
    per_seed: tuple[SeedRow, ...]
    neg_elbo_per_image: float
    test_neg_elbo_per_image: float
    train_mse: float
    test_mse: float
    seconds_per_step: float
    test_inference_seconds: float
    test_inference_ms_per_image: float
    epochs_to_tol: float
    epochs_to_tol_lower: float
    epochs_to_tol_reached: int
    seconds_to_tol: float
    seconds_to_tol_lower: float
    seconds_to_tol_reached: int

    @property
    def seeds(self) -> int:
        return len(self.per_seed)


def method_summary(runs: list[RunData], metric: str, tol: float | None, method: Method) -> MethodRow:
    """The :class:`MethodRow` of ``method``'s runs (its seeds)."""
    per_seed = []
    for r in runs:
        final = r.evals[-1] if r.evals else {}
        per_seed.append(SeedRow(
            seed=r.seed,
            neg_elbo_per_image=final.get("neg_elbo", math.nan) / r.n,
            train_mse=final.get("train_mse", math.nan),
            test_mse=final.get("test_mse", math.nan),
            seconds_per_step=r.summary.get("seconds_per_step") or math.nan,
            test_inference_seconds=final.get("test_inference_seconds", math.nan),
            crossing=first_crossing(r.curve(metric), metric, tol) if tol is not None else None,
            test_neg_elbo_per_image=final.get("test_neg_elbo_per_image", math.nan),
            test_inference_ms_per_image=1e3 * final.get("test_inference_seconds", math.nan) / r.n_test,
        ))
    medians: dict = {key: float(np.median([getattr(s, key) for s in per_seed])) for key in
                     ("neg_elbo_per_image", "test_neg_elbo_per_image", "train_mse", "test_mse", "seconds_per_step",
                      "test_inference_seconds", "test_inference_ms_per_image")}
    crossings = [s.crossing for s in per_seed if s.crossing is not None]
    times: dict = {}
    for key, unit in (("epochs_to_tol", "epochs"), ("seconds_to_tol", "seconds")):
        times[f"{key}_reached"] = sum(getattr(s, key) is not None for s in per_seed)
        if crossings:
            lower, upper = censored_median([getattr(c, unit) for c in crossings], [c.reached for c in crossings])
        else:
            lower = upper = math.nan
        times[key], times[f"{key}_lower"] = upper, lower
    return MethodRow(method=method, per_seed=tuple(per_seed), **medians, **times)


@dataclass(frozen=True)
class Comparison:
    """A-VI (``avi``) against F-VI of the same objective (``fvi``): ratios of medians over seeds with
    bootstrap intervals (the -ELBO's as :func:`signed_ratio`, which is A/F for a positive F-VI -ELBO),
    and the speed-ups to tolerance (None without a tolerance or a crossing)."""

    avi: Method
    fvi: Method
    elbo_ratio: float
    elbo_ratio_ci: tuple[float, float]
    mse_ratio: float
    mse_ratio_ci: tuple[float, float]
    step_time_ratio: float
    seeds: int  # the larger of the two seed counts
    speedup: SpeedUp | None = None
    speedup_epochs: SpeedUp | None = None
    # On the test images (A-VI: its encoder; F-VI: test-time inference); NaN where not recorded.
    test_elbo_ratio: float = math.nan
    test_elbo_ratio_ci: tuple[float, float] = (math.nan, math.nan)
    test_mse_ratio: float = math.nan
    test_mse_ratio_ci: tuple[float, float] = (math.nan, math.nan)


@dataclass(frozen=True)
class Verdict:
    """A claim of the original study, the verdict on it and why, in plain language."""

    claim: str
    verdict: str
    why: str


@dataclass
class DatasetTable:
    """Everything the report says about one dataset: rows and comparisons keyed by :class:`Method`
    (in table order), the verdicts, and, once the report adds them, the gap table and a note."""

    dataset: str
    metric: str
    tolerance: float | None
    rows: dict[Method, MethodRow]
    comparisons: dict[Method, Comparison]
    verdicts: list[Verdict]
    targets: list[TargetRow] = field(default_factory=list)  # reaching F-VI's own final values
    gaps: dict = field(default_factory=dict)
    note: str | None = None


AVI, FVI = "amortized", "factorized"  # the two families the study's claims compare


def dataset_table(results: Results, dataset: str) -> DatasetTable:
    """The summary table of one dataset: per method, medians over seeds; each A-VI row against the F-VI
    row of the same objective and decoder architecture, with bootstrap CIs and the speed-ups to
    tolerance in seconds and epochs; and the verdicts."""
    metric, tol = results.tolerance(dataset)
    rows = {m: method_summary(runs, metric, tol, m) for m, runs in methods_of(results.groups.get(dataset, {}))}
    fvi_rows = {m.model: row for m, row in rows.items() if m.family == FVI}
    comparisons = {}
    for method, row in rows.items():
        fvi = fvi_rows.get(method.model)
        if fvi is None or method.family != AVI:
            continue
        f, a = fvi.per_seed, row.per_seed
        fc = [s.crossing for s in f if s.crossing is not None]
        ac = [s.crossing for s in a if s.crossing is not None]
        timed = bool(fc and ac)  # both empty without a tolerance
        comparisons[method] = Comparison(
            avi=method, fvi=fvi.method,
            elbo_ratio=signed_ratio(row.neg_elbo_per_image, fvi.neg_elbo_per_image),
            elbo_ratio_ci=bootstrap_ratio_ci([s.neg_elbo_per_image for s in a], [s.neg_elbo_per_image for s in f],
                                             signed=True),
            mse_ratio=row.train_mse / fvi.train_mse,
            mse_ratio_ci=bootstrap_ratio_ci([s.train_mse for s in a], [s.train_mse for s in f]),
            test_elbo_ratio=signed_ratio(row.test_neg_elbo_per_image, fvi.test_neg_elbo_per_image),
            test_elbo_ratio_ci=bootstrap_ratio_ci([s.test_neg_elbo_per_image for s in a],
                                                  [s.test_neg_elbo_per_image for s in f], signed=True),
            test_mse_ratio=row.test_mse / fvi.test_mse,
            test_mse_ratio_ci=bootstrap_ratio_ci([s.test_mse for s in a], [s.test_mse for s in f]),
            step_time_ratio=row.seconds_per_step / fvi.seconds_per_step,
            seeds=max(len(a), len(f)),
            speedup=speedup(fc, ac, "seconds") if timed else None,
            speedup_epochs=speedup(fc, ac, "epochs") if timed else None,
        )
    return DatasetTable(dataset, metric, tol, rows, comparisons, verdicts(rows, comparisons, metric, tol),
                        fvi_targets(results, dataset))


FVI_TARGET_METRICS = ("train_mse", "neg_elbo")
FVI_TARGET_MARGINS = (0.01, 0.05)


@dataclass(frozen=True)
class TargetRow:
    """When one method's seeds first came within ``margin`` of F-VI's own final value of ``metric``
    (the median over F-VI's seeds of their last evaluation; ``neg_elbo`` in nats per image): ``target``
    = final + margin x |final| (a -ELBO can be negative). Times as :class:`MethodRow`'s: the median
    with seeds that never got there infinitely late, and censored at their last evaluation
    (``_lower``). ``speedup``/``speedup_epochs``: F-VI's own time to the target over this method's
    (None for F-VI's row)."""

    method: Method
    metric: str
    margin: float
    target: float
    crossings: tuple[Crossing, ...]
    epochs: float
    epochs_lower: float
    seconds: float
    seconds_lower: float
    speedup: SpeedUp | None
    speedup_epochs: SpeedUp | None

    @property
    def reached(self) -> int:
        return sum(c.reached for c in self.crossings)


def _final(run: RunData, metric: str) -> float:
    """A run's last evaluated ``metric``; -ELBO per image."""
    value = run.evals[-1].get(metric, math.nan) if run.evals else math.nan
    return value / run.n if metric == "neg_elbo" else value


def fvi_targets(results: Results, dataset: str, metrics: tuple[str, ...] = FVI_TARGET_METRICS,
                margins: tuple[float, ...] = FVI_TARGET_MARGINS) -> list[TargetRow]:
    """For every method compared with an F-VI (that of the same objective and decoder, F-VI itself
    included) and every metric and margin: when its seeds reached F-VI's own final value within the
    margin (:class:`TargetRow`), in table order, grouped by metric and margin. A target F-VI has no
    final value for (its evaluations lost) is left out."""
    methods = methods_of(results.groups.get(dataset, {}))
    fvi_runs = {m.model: runs for m, runs in methods if m.family == FVI}

    def crossings(runs: list[RunData], metric: str, target: float) -> list[Crossing]:
        # The curves hold -ELBO totals over the N training images; the target is per image.
        found = (first_crossing(r.curve(metric), metric, target * r.n if metric == "neg_elbo" else target)
                 for r in runs)
        return [c for c in found if c is not None]

    out = []
    for metric in metrics:
        for margin in margins:
            # Per model (objective, decoder): the target, and F-VI's own crossings of it.
            targets, own = {}, {}
            for model, fvi in fvi_runs.items():
                final = float(np.median([_final(r, metric) for r in fvi]))
                if math.isfinite(final):
                    targets[model] = final + margin * abs(final)
                    own[model] = crossings(fvi, metric, targets[model])
            for method, runs in methods:
                if method.model not in targets:
                    continue
                found = own[method.model] if method.family == FVI else crossings(runs, metric, targets[method.model])
                if not found:
                    continue
                times = {}
                for unit in ("epochs", "seconds"):
                    lower, upper = censored_median([getattr(c, unit) for c in found], [c.reached for c in found])
                    times[unit], times[f"{unit}_lower"] = upper, lower
                f = own[method.model] if method.family != FVI else []
                out.append(TargetRow(method, metric, margin, targets[method.model], tuple(found), **times,
                                     speedup=speedup(f, found, "seconds") if f else None,
                                     speedup_epochs=speedup(f, found, "epochs") if f else None))
    return out


GAP_KEYS = ("amortization_gap", "approximation_gap", "approximation_gap_ais")


def gap_table(results: Results, dataset: str) -> dict:
    """Per :class:`Method` and split: the median over seeds of each run's mean gap (nats per image),
    its range over seeds, and the local-optimisation costs; only methods with at least one measured run."""
    table = {}
    for method, runs in methods_of(results.groups.get(dataset, {})):
        measured = [r.gap for r in runs if r.gap]
        if not measured:
            continue
        row: dict = {"seeds": len(measured), "theta": measured[0].get("theta"), "splits": {}}
        for split in ("train", "test"):
            per_run = [g["splits"][split] for g in measured if split in g["splits"]]
            if not per_run:
                continue
            cell: dict = {"images": per_run[0]["images"]}
            for key in GAP_KEYS:
                values = [s[key]["mean"] for s in per_run if key in s]
                if values:
                    cell[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values),
                                 "se": float(np.median([s[key]["se"] for s in per_run if key in s]))}
            for key in ("refinement_to_90pct_of_gap", "scratch_to_family_elbo"):
                hits = [s.get(key) for s in per_run]
                cell[key] = ({"steps": float(np.median([h["steps"] for h in hits])),
                              "seconds": float(np.median([h["seconds"] for h in hits]))}
                             if all(h is not None for h in hits) else None)
            cell["q_star_seconds_from_prior"] = float(
                np.median([s["q_star_cost_from_prior"]["seconds"] for s in per_run]))
            row["splits"][split] = cell
        table[method] = row
    return table


WIDE = 64  # the claims are about A-VI with k >= 64


def verdicts(rows: dict[Method, MethodRow], comparisons: dict[Method, Comparison], metric: str, tol) -> list[Verdict]:
    """One plain-language verdict per claim of the original study, computed from the table."""
    out = []
    wide = {m: c for m, c in comparisons.items() if (m.width or 0) >= WIDE}
    if not any(m.family == FVI for m in rows) or not wide:
        why = "the grid needs F-VI and A-VI with k >= 64"
        return [Verdict("A-VI with k >= 64 reaches F-VI's ELBO and MSE", "not testable", why),
                Verdict("A-VI is 2-3x faster than F-VI", "not testable", why)]
    parts, ok = [], []
    for method, c in wide.items():
        elbo_ok = c.elbo_ratio_ci[0] <= 1 + ELBO_MARGIN
        mse_ok = c.mse_ratio <= 1 + MSE_MARGIN
        ok.append(elbo_ok and mse_ok)
        parts.append(f"{method}: -ELBO vs F-VI {describe_ratio(c.elbo_ratio, c.elbo_ratio_ci, c.seeds)}, "
                     f"train MSE {c.mse_ratio:.2f}x F-VI's")
    verdict = "supported" if all(ok) else ("partly supported" if any(ok) else "not supported")
    if min(rows[m].seeds for m in rows if m in wide or m.family == FVI) < 2:
        verdict += " on one seed (no interval)"
    out.append(Verdict("A-VI with k >= 64 reaches F-VI's ELBO and MSE", verdict,
                       "; ".join(parts) + f". 'Reaches' means -ELBO within {ELBO_MARGIN:.0%} of F-VI's (the "
                       f"interval's lower end of 1 + (A - F)/|F| at most {1 + ELBO_MARGIN:g}; A/F for a positive F) "
                       f"and train MSE within {MSE_MARGIN:.0%}."))
    out.append(speed_verdict(wide, metric, tol))
    return out


def speed_verdict(wide: dict[Method, Comparison], metric: str, tol) -> Verdict:
    """The verdict on "A-VI is 2-3x faster than F-VI" (in training seconds to ``metric`` <= ``tol``)
    from each wide A-VI's :class:`SpeedUp`. Supported only when every width's 95% interval lies at or
    above 2x; partly supported when every width is faster (the lower bound above 1x) but that is not
    shown; not testable when no width has a bounded speed-up (neither family's median reached the
    tolerance); otherwise not supported. A censored median can only weaken the claim: F-VI seeds that
    never reached the tolerance count as reaching it at their last evaluation for the lower bound."""
    claim = "A-VI is 2-3x faster than F-VI"
    if tol is None:
        return Verdict(claim, "not testable", "the grid states no tolerance for this dataset")
    parts, known = [], {}
    for method, c in wide.items():
        s = c.speedup
        if s is None or not s.known:
            parts.append(f"{method}: neither A-VI's nor F-VI's median reached {metric} <= {tol}")
            continue
        known[method] = s
        parts.append(f"{method}: speed-up over F-VI in training seconds to {metric} <= {tol}: {s.describe()}")
    if not known:
        verdict = "not testable"
    elif all(s.ci[0] >= 2 for s in known.values()):
        verdict = "supported"
    elif all(s.low > 1 for s in known.values()):
        verdict = "partly supported (faster, but not 2-3x)"
    else:
        verdict = "not supported"
    if known and min(min(s.seeds) for s in known.values()) < 2:
        verdict += " on one seed (no interval)"
    return Verdict(claim, verdict, "; ".join(parts) + ".")
