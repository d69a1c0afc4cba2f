"""``amortized-bayes infer RUN IMAGES --out FILE``: q(z), reconstructions, the ELBO and the amortization
gap of new images under a finished run."""

from __future__ import annotations

import argparse
from typing import Any
import math
import sys
from pathlib import Path

from .errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    infer = sub.add_parser(
        "infer", help="q(z), reconstructions, ELBO (and --gap) for new images under a finished run",
        description="Map new images through a finished run: the encoder for A-VI and SA-VI, test-time "
        "inference with q(theta) frozen for F-VI and constant-VI. Writes q(z)'s means and log sds, the "
        "reconstructions and the ELBO of each image (nats, at the posterior mean of theta) to FILE.npz, "
        "and the images above their reconstructions to FILE.png.")
    infer.add_argument("run", type=Path, help="a finished run: OUT/runs/<id> (or its model.pt)")
    infer.add_argument("images", type=Path,
                       help="an .npy or .npz array, an IDX file (raw or .gz), one PNG or a folder of PNGs")
    infer.add_argument("--out", type=Path, required=True, help="output file (.npz; the PNG grid goes beside it)")
    infer.add_argument("--key", default=None, help="the array of an .npz to read (default: 'images' or its only one)")
    infer.add_argument("--invert", action="store_true",
                       help="use 1 - x: dark strokes on a light background become the datasets' light on dark")
    infer.add_argument("--binarize", type=float, default=None, metavar="THRESHOLD",
                       help="set x > THRESHOLD to 1 and the rest to 0 (for a Bernoulli run)")
    infer.add_argument("--gap", action="store_true",
                       help="also the amortization and approximation gaps per image (q* by local optimisation, "
                            "log p(x) by IWAE; seconds per image)")
    infer.add_argument("--iwae-k", type=int, default=1000,
                       help="IWAE samples for log p(x | theta) with --gap (default 1000)")
    infer.add_argument("--max-local-steps", type=int, default=5000,
                       help="with --gap: step limit of the local optimisation that finds q* (default 5000)")
    infer.add_argument("--elbo-samples", type=int, default=256, help="draws of z per ELBO estimate (default 256)")
    infer.add_argument("--grid", type=int, default=32, help="images in the PNG grid (default 32; 0: no PNG)")
    infer.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    infer.set_defaults(handler=cmd_infer)


def _model_path(run: Path) -> Path:
    """The run's model.pt, or a user error saying why there is none."""
    import json

    if run.is_file():
        return run
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    if (run / "model.pt").is_file():
        return run / "model.pt"
    if (run / "runs").is_dir():
        ids = sorted(p.name for p in (run / "runs").iterdir() if (p / "model.pt").is_file())
        hint = f", for example {run / 'runs' / ids[0]}" if ids else " (none of its runs has finished)"
        raise UserError(f"{run} is a results folder; name one of its finished runs, OUT/runs/<id>{hint}")
    if (run / "status.json").is_file():
        try:
            status = json.loads((run / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        raise UserError(f"run {run.name} is not finished (state {status.get('state', 'unknown')}, epoch "
                        f"{status.get('epochs_done', 0)}/{status.get('epochs_total', '?')}); infer needs its model.pt")
    raise UserError(f"{run} is not a run folder (no model.pt)")


def cmd_infer(args) -> int:
    if min(args.iwae_k, args.elbo_samples, args.max_local_steps) < 1 or args.grid < 0 or args.seed < 0:
        raise UserError("--iwae-k, --elbo-samples and --max-local-steps must be >= 1, --grid and --seed >= 0")
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")
    path = _model_path(args.run)

    import numpy as np
    import torch

    from ..checkpoint import load_fit
    from ..data.atomic import atomic_write_bytes
    from ..data.images import pairs_grid, png_bytes, read_images
    from ..gap import GapConfig, LocalOptimConfig
    from ..new_images import infer_new_images

    try:
        fitted = load_fit(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable model file is the user's to fix, said in one line
        raise UserError(f"{path}: not a readable model ({type(exc).__name__}: {exc})") from None
    config = fitted.config
    shape = config.data.image_shape
    batch = read_images(args.images, shape, likelihood=config.model.likelihood, key=args.key, invert=args.invert,
                        binarize=args.binarize, note=lambda m: print(m, file=sys.stderr))
    x = torch.from_numpy(batch.pixels.reshape(len(batch), -1))
    family = fitted.family
    print(f"{path.parent.name}: {family.name} family, {config.model.likelihood} likelihood; {len(batch)} images "
          f"from {batch.source}", flush=True)
    bar = None
    if not family.amortized:
        from tqdm import tqdm

        bar = tqdm(total=config.train.test_inference.max_steps, desc="test-time inference", unit="step",
                   disable=None, file=sys.stderr)

    def on_step(steps: int, loss: float) -> None:
        assert bar is not None
        bar.update(1)
        if steps % 50 == 0:
            bar.set_postfix_str(f"-ELBO/image {loss / len(batch):.2f}")

    gap = GapConfig(images=len(batch), splits=("test",), iwae_samples=args.iwae_k, elbo_samples=args.elbo_samples,
                    seed=args.seed, optim=LocalOptimConfig(max_steps=args.max_local_steps)) if args.gap else None
    try:
        result = infer_new_images(fitted, x, elbo_samples=args.elbo_samples, gap=gap, seed=args.seed,
                                  on_step=on_step if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    post = result.posterior
    if family.amortized:
        print(f"q(z) by the encoder: {post.seconds * 1e3:.1f} ms ({post.seconds / len(batch) * 1e3:.3f} ms per image)")
    else:
        print(f"q(z) by test-time inference: {post.steps} steps, {post.seconds:.2f} s "
              f"({post.seconds / len(batch) * 1e3:.2f} ms per image), "
              + ("converged" if post.converged else "stopped at the step limit before converging"))
    elbo = result.elbo.double()
    print(f"ELBO per image (nats, theta at its posterior mean): mean {float(elbo.mean()):.2f}, "
          f"min {float(elbo.min()):.2f}, max {float(elbo.max()):.2f}")
    arrays: dict[str, Any] = {
        "images": batch.pixels,
        "names": np.array(batch.names),
        "mu": result.mu.numpy(),
        "log_sigma": result.log_sigma.numpy(),
        "reconstructions": result.reconstructions.numpy().reshape(batch.pixels.shape),
        "elbo": result.elbo.numpy(),
        "inference_steps": np.array(post.steps),
        "inference_seconds": np.array(post.seconds),
        "inference_converged": np.array(post.converged),
        "run": np.array(str(path.parent.name)),
        "family": np.array(family.name),
        "seed": np.array(args.seed),
    }
    if result.gaps is not None:
        g = result.gaps
        arrays.update(gap_theta=np.array(result.gap_theta), amortization_gap=g.amortization_gap.numpy(),
                      approximation_gap=g.approximation_gap.numpy(),
                      elbo_q_star=g.elbo_q_star.numpy(), log_px_iwae=g.log_px_iwae.numpy(),
                      q_star_converged=np.array(g.q_star_converged))
        for name in ("amortization_gap", "approximation_gap"):
            v = getattr(g, name).double()
            v = v[torch.isfinite(v)]
            se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
            print(f"{name.replace('_', ' ')} (nats per image): mean {float(v.mean()):.3f} ± {se:.3f} (se), "
                  f"median {float(v.median()):.3f}")
        if not g.q_star_converged:
            print(f"note: q* stopped at --max-local-steps {args.max_local_steps} before converging; the "
                  "amortization gap is understated", file=sys.stderr)
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(out, buffer.getvalue())
    written = [str(out)]
    if args.grid:
        n = min(args.grid, len(batch))
        picture = pairs_grid(batch.pixels[:n], arrays["reconstructions"][:n])
        png = out.with_suffix(".png")
        atomic_write_bytes(png, png_bytes(picture))
        written.append(f"{png} ({n} images above their reconstructions)")
    print("wrote " + ", ".join(written))
    return 0
