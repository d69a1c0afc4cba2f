"""``amortized-bayes run``, ``status`` and ``list``: grids of runs into a results folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a preset or a grid file into a results folder (resumable)")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named grid (see `amortized-bayes list`)")
    src.add_argument("grid_file", nargs="?", help="a grid file (.toml, .json or .yaml)")
    run.add_argument("--out", type=Path, default=None, help="results folder (default: runs/<grid name>)")
    run.add_argument("--workers", type=int, default=None,
                     help="runs in parallel, each in its own process (default: see docs/experiments.md)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per worker (default: cores // workers)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. train.epochs=5; a comma list makes an axis: family.width=1,64")
    run.add_argument("--only", dest="selection", action="append", default=[], metavar="KEY=VALUE",
                     help="run only the grid's runs with this field value (run ids unchanged), e.g. "
                     "data.dataset=mnist; a comma list matches any of its values")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    run.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS",
                     help="save each run's training state this often (default 120 s)")
    run.add_argument("--force-unlock", action="store_true",
                     help="remove the folder's lock files first (only for locks left on a shared file system by "
                     "a machine that is gone: a local lock dies with its process)")
    run.add_argument("--tensorboard", action="store_true",
                     help="log every metric to OUT/tensorboard (needs the 'tensorboard' extra)")
    ray = run.add_argument_group("executor", "where the runs execute (docs/ray.md)")
    ray.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local worker processes (default) or one Ray task per run (needs the 'ray' extra)")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (auto, HOST:PORT or ray://HOST:PORT; default: a private local "
                     "Ray instance)")
    ray.add_argument("--gpus-per-run", type=float, default=None,
                     help="GPUs each Ray task asks for (default: 1 for runs with train.device=cuda, else 0)")
    ray.add_argument("--retries", type=int, default=2,
                     help="extra attempts for a Ray task that fails or is lost (default 2)")
    ray.add_argument("--ship-data", action="store_true",
                     help="load each dataset on the driver and ship the arrays to the tasks (for nodes that "
                     "cannot fetch data)")
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser("status", help="state of every run of a results folder")
    status.add_argument("out", type=Path)
    status.set_defaults(handler=cmd_status)

    lst = sub.add_parser("list", help="the presets and their grids")
    lst.set_defaults(handler=cmd_list)


def load_grid(args):
    from ..experiments.grid import load_grid_file, parse_overrides
    from ..experiments.presets import get_preset

    grid = get_preset(args.preset) if args.preset else load_grid_file(args.grid_file)
    overrides = parse_overrides(args.overrides)
    return grid.with_overrides(overrides) if overrides else grid


def _selected(args) -> str:
    return f" (those with {', '.join(args.selection)})" if args.selection else ""


def default_workers(n_runs: int) -> int:
    """Measured on 2 cores (docs/experiments.md): independent single-threaded runs beat one run using both
    cores."""
    from ..experiments.local import cpu_count

    return max(1, min(cpu_count(), n_runs))


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cmd_run(args) -> int:
    from ..experiments.lifecycle import plan_runs
    from ..experiments.local import default_threads, run_local
    from ..experiments.store import ResultStore

    from .errors import UserError

    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0 seconds, got {args.checkpoint_every}")
    try:
        grid = load_grid(args)
        configs = grid.expand()
        if args.selection:
            from ..experiments.grid import parse_overrides, select_runs

            configs = select_runs(configs, parse_overrides(args.selection, flag="--only"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / grid.name
    store = ResultStore(out)
    if args.force_unlock and not args.dry_run:
        from ..experiments.store import LOCK_NAME

        removed = [p for p in [out / LOCK_NAME, *out.glob(f"runs/*/{LOCK_NAME}")] if p.exists()]
        for path in removed:
            path.unlink()
        print(f"note: removed {len(removed)} lock file(s) under {out}", file=sys.stderr)
    if args.dry_run:
        from ..experiments.grid import run_id

        existing = {r.run_id: r for r in store.records()}
        print(f"{grid.name}: {len(configs)} runs{_selected(args)} -> {out}")
        for c in configs:
            rid = run_id(c)
            state = existing[rid].display_state if rid in existing else "new"
            print(f"  {state:11s} {rid}  ({c.data.n_train} images, {c.train.epochs} epochs)")
        return 0
    records = [store.plan(c) for c in configs]
    if args.executor == "ray":
        if args.tensorboard:
            print("error: --tensorboard is not supported with --executor ray (runs log on their own nodes)",
                  file=sys.stderr)
            return 2
        if args.workers:
            print("note: --workers is ignored with --executor ray (Ray schedules one task per run on free CPUs)")
        if args.retries < 0:
            print("error: --retries must be >= 0", file=sys.stderr)
            return 2
        try:
            from ..experiments.ray_executor import import_ray

            import_ray(private_instance=args.address is None)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    store.save_grid(grid.to_dict())
    plan = plan_runs(records)
    todo = plan.todo
    workers = args.workers or default_workers(len(plan.todo) + len(plan.busy))
    threads = args.threads or (1 if args.executor == "ray" else default_threads(workers))
    for r in plan.busy:
        print(f"note: {r.run_id} is being run by a live worker (pid {r.status.get('pid')}); not starting it "
              "again", flush=True)
    how = (f"as Ray tasks of {threads} CPU(s) each" + (f" on {args.address}" if args.address else " (local Ray)")
           if args.executor == "ray" else f"with {workers} worker(s) x {threads} thread(s)")
    elsewhere = f"{len(plan.busy)} running elsewhere, " if plan.busy else ""
    print(f"{grid.name}: {len(records)} runs{_selected(args)}, {len(plan.done)} already done, {elsewhere}"
          f"{len(todo)} to run {how} -> {out}", flush=True)
    progress = _Progress(len(todo), store)
    started = time.time()
    if args.executor == "ray":
        from ..experiments.ray_executor import run_ray

        gpus = args.gpus_per_run
        if gpus is None:
            gpus = 1.0 if any(r.config.train.device.startswith("cuda") for r in todo) else 0.0
        outcomes = run_ray(records, store, address=args.address, threads=threads, gpus=gpus,
                           checkpoint_seconds=args.checkpoint_every, retries=args.retries,
                           ship_data=args.ship_data, on_start=progress.start, on_finish=progress.finish)
    else:
        outcomes = run_local(records, store, workers=workers, threads=threads,
                             checkpoint_seconds=args.checkpoint_every,
                             tensorboard_dir=str(out / "tensorboard") if args.tensorboard else None,
                             on_start=progress.start, on_finish=progress.finish)
    progress.close()
    store.write_summary_table()
    print_summary(store, time.time() - started)
    unfinished = [o for o in outcomes if o.state in ("failed", "busy")]
    return 1 if unfinished else 0


class _Progress:
    """A progress bar on a terminal (tqdm), plain log lines otherwise."""

    def __init__(self, total: int, store):
        self.total, self.done, self.store = total, 0, store
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)

    def start(self, record) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(record.run_id[:40])
        else:
            print(f"[{self.done}/{self.total}] start {record.run_id}", flush=True)

    def finish(self, record, outcome) -> None:
        self.done += 1
        msg = f"[{self.done}/{self.total}] {outcome.state} {record.run_id} ({_fmt_seconds(outcome.seconds)})"
        if outcome.error:
            msg += f": {outcome.error}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(float(row[key]), fmt) if row[key] not in ("", None) else "-"


def print_summary(store, seconds: float | None = None) -> None:
    import csv

    path = store.root / "summary.csv"
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    if not rows:
        return
    head = f"{'run':44s} {'state':11s} {'-ELBO/img':>10s} {'train MSE':>9s} {'test MSE':>9s} {'ms/step':>8s}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ms = format(1e3 * float(r["seconds_per_step"]), ".1f") if r["seconds_per_step"] else "-"
        print(f"{r['run_id'][:44]:44s} {r['state']:11s} {_cell(r, 'neg_elbo_per_image', '10.2f')} "
              f"{_cell(r, 'train_mse', '9.4f')} {_cell(r, 'test_mse', '9.4f')} {ms:>8s}")
    if seconds is not None:
        print(f"\n{len(rows)} runs in {store.root}; this invocation took {_fmt_seconds(seconds)}; table: {path}")


def time_left(status: dict, total_epochs: int) -> float | None:
    """Seconds a run still needs, from its ``status.json``: the epochs left at the pace of its present
    attempt (``elapsed_seconds`` over ``epochs_this_attempt``, evaluations included); without that pace
    (a status written before the field existed, or before the attempt's first epoch), at the pace of
    its training steps over all attempts (``train_seconds`` over ``epochs_done``). None when neither
    is known."""
    done = status.get("epochs_done") or 0
    if done >= total_epochs:
        return 0.0
    elapsed, recent = status.get("elapsed_seconds"), status.get("epochs_this_attempt")
    if elapsed and recent:
        return elapsed / recent * (total_epochs - done)
    trained = status.get("train_seconds")
    if trained and done:
        return trained / done * (total_epochs - done)
    return None


def cmd_status(args) -> int:
    from ..experiments.store import ResultStore

    from .errors import UserError

    if not args.out.is_dir():
        raise UserError(f"{args.out} is not a results folder")
    store = ResultStore(args.out)
    records = store.records()
    if not records:
        raise UserError(f"no runs in {args.out}")
    counts: dict[str, int] = {}
    print(f"{'run':48s} {'state':11s} {'epochs':>11s} {'trained':>8s} {'left':>8s}")
    for rec in records:
        state = rec.display_state
        counts[state] = counts.get(state, 0) + 1
        done, total = rec.status.get("epochs_done", 0) or 0, rec.config.train.epochs
        left = time_left(rec.status, total) if state in ("running", "interrupted") else None
        print(f"{rec.run_id[:48]:48s} {state:11s} {f'{done}/{total}':>11s} "
              f"{_fmt_seconds(rec.status.get('train_seconds')):>8s} {_fmt_seconds(left):>8s}")
        if state == "failed" and rec.status.get("error"):
            print(f"{'':48s} error: {rec.status['error']}")
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def cmd_list(args) -> int:
    from ..experiments.presets import PRESETS

    for grid in PRESETS.values():
        runs = grid.expand()
        epochs = sorted({c.train.epochs for c in runs})
        print(f"{grid.name}: {len(runs)} runs, {', '.join(map(str, epochs))} epochs")
        print(f"  {grid.description}")
        for key, values in grid.axes.items():
            print(f"  axis {key}: {values}")
        fams = []
        for v in grid.variants:
            f = v.get("family", {})
            fams.append(f.get("name", "?") + (f" k={f['width']}" if "width" in f else ""))
        if fams:
            print(f"  families: {', '.join(fams)}")
    from ..families import registered_families
    from ..likelihoods import LIKELIHOODS
    from ..model import ARCHITECTURES
    from ..objectives import OBJECTIVES

    # What a grid may name: the built-in ones and those of installed plugins (entry points).
    families = registered_families()
    print("\nregistered families: " + ", ".join(
        f"{name} ({cls.title}; fields: {', '.join(f for f in cls.config_class.__dataclass_fields__ if f != 'name')})"
        for name, cls in families.items()))
    print(f"registered likelihoods: {', '.join(LIKELIHOODS)}")
    print(f"registered objectives: {', '.join(OBJECTIVES)}")
    print("registered decoder architectures: " + ", ".join(
        f"{name} (fields: {', '.join(sorted(cls.config_fields))})" for name, cls in ARCHITECTURES.everything().items()))
    return 0
