"""``amortized-bayes gap DIR``: amortization and approximation gaps of every finished run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    gap = sub.add_parser(
        "gap", help="amortization gap (nats per image) of every finished run of a results folder",
        description="For every finished run: ELBO_x under the run's family, q*_x by local optimisation from "
        "the family's q and from the prior, log p(x | theta) by IWAE (and AIS with --ais), the refinement "
        "and from-scratch curves. Stored as runs/<id>/gap.json; `report` then shows them.")
    gap.add_argument("out", type=Path)
    gap.add_argument("--images", type=int, default=100, help="images per split (default 100)")
    gap.add_argument("--split", choices=("train", "test", "both"), default="both")
    gap.add_argument("--iwae-k", type=int, default=1000, help="IWAE samples for log p(x | theta) (default 1000)")
    gap.add_argument("--elbo-samples", type=int, default=256, help="draws per ELBO_x estimate (default 256)")
    gap.add_argument("--ais", action="store_true", help="also estimate log p(x | theta) by annealed importance "
                     "sampling (sigmoid schedule, HMC transitions, started at q*)")
    gap.add_argument("--ais-steps", type=int, default=500, help="AIS temperatures (default 500)")
    gap.add_argument("--ais-chains", type=int, default=16, help="AIS chains per image (default 16)")
    gap.add_argument("--theta-draws", type=int, default=0,
                     help="average the gaps over this many draws of q(theta) (default 0: theta = posterior mean)")
    gap.add_argument("--max-local-steps", type=int, default=5000,
                     help="step limit of the local optimisation that finds q* (default 5000); a q* stopped by "
                     "it before converging understates the amortization gap, and the output says so")
    gap.add_argument("--workers", type=int, default=None,
                     help="runs measured in parallel, one process each (default: one per core)")
    gap.add_argument("--force", action="store_true", help="recompute runs whose gap.json is up to date")
    gap.set_defaults(handler=cmd_gap)


def _measure(args: tuple) -> dict:
    """Worker entry point: one run, with its own torch thread count."""
    run_dir, config, threads = args
    from ..gap import measure_run_gap
    from ..runtime import prepare_process

    prepare_process(threads)
    return measure_run_gap(run_dir, config)


def _die_with_parent() -> None:
    """Pool initializer: on Linux, have the kernel kill this worker when the `gap` process dies, so that
    an interrupted command leaves no worker computing on (gap.json is written atomically either way)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def unconverged_splits(result: dict) -> list[str]:
    """The splits of a gap.json whose q* (from the family's q or from the prior) stopped at the step
    limit before converging."""
    return [split for split, s in result["splits"].items()
            if not (s["q_star_cost_from_family"]["converged"] and s["q_star_cost_from_prior"]["converged"])]


def _print(run_id: str, result: dict) -> None:
    for split, s in result["splits"].items():
        a, b = s["amortization_gap"], s["approximation_gap"]
        line = f"{run_id[:44]:44s} {split:6s} {a['mean']:9.3f} ± {a['se']:<7.3f} {b['mean']:9.3f} ± {b['se']:<7.3f}"
        if "approximation_gap_ais" in s:
            c = s["approximation_gap_ais"]
            line += f" {c['mean']:9.3f} ± {c['se']:<7.3f}"
        if split in unconverged_splits(result):
            line += "  (q* stopped at the step limit: the amortization gap is understated)"
        print(line, flush=True)


def cmd_gap(args) -> int:
    from ..experiments.lifecycle import RunState
    from ..experiments.local import cpu_count
    from ..experiments.store import ResultStore
    from ..gap import AISConfig, GapConfig, LocalOptimConfig

    from .errors import UserError

    if (min(args.iwae_k, args.images, args.elbo_samples, args.ais_steps, args.ais_chains, args.max_local_steps) < 1
            or args.theta_draws < 0):
        raise UserError("--images, --iwae-k, --elbo-samples, --ais-steps, --ais-chains and --max-local-steps must "
                        "be >= 1, --theta-draws >= 0")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be >= 1")
    splits = ("train", "test") if args.split == "both" else (args.split,)
    ais = AISConfig(chains=args.ais_chains, steps=args.ais_steps) if args.ais else None
    config = GapConfig(images=args.images, splits=splits, iwae_samples=args.iwae_k, elbo_samples=args.elbo_samples,
                       ais=ais, theta_draws=args.theta_draws,
                       optim=LocalOptimConfig(max_steps=args.max_local_steps))
    if not args.out.is_dir():
        raise UserError(f"{args.out} is not a results folder")
    records = [r for r in ResultStore(args.out).records() if r.state == RunState.DONE]
    if not records:
        raise UserError(f"no finished runs in {args.out}")
    stored, todo = {}, []
    for rec in records:
        path = rec.files.gap
        if path.exists() and not args.force:
            old = json.loads(path.read_text())
            if old.get("config") == json.loads(json.dumps(config.to_dict())):
                stored[rec.run_id] = old
                continue
        todo.append(rec)
    workers = max(1, min(args.workers or cpu_count(), len(todo) or 1))
    threads = max(1, cpu_count() // workers)
    print(f"{len(records)} runs: {len(stored)} with an up-to-date gap.json, {len(todo)} to measure with "
          f"{workers} worker(s) x {threads} thread(s)")
    head = f"{'run':44s} {'split':6s} {'amortization gap':>19s} {'approx. gap (IWAE)':>19s}"
    print(head + (f" {'approx. gap (AIS)':>19s}" if ais else ""))
    for run_id, result in stored.items():
        _print(run_id, result)
    jobs = [(rec.path, config, threads) for rec in todo]
    if workers == 1:
        for rec, job in zip(todo, jobs):
            _print(rec.run_id, _measure(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent) as pool:
            futures = {pool.submit(_measure, job): rec for rec, job in zip(todo, jobs)}
            for future in as_completed(futures):
                _print(futures[future].run_id, future.result())
    print("nats per image, mean ± standard error over images; theta: "
          + ("posterior mean" if not args.theta_draws else f"averaged over {args.theta_draws} draws of q(theta)")
          + "; stored as gap.json per run")
    return 0
