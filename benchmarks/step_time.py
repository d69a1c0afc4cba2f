"""Time one training step of every family (median over many steps after warm-up, interleaved).

    python benchmarks/step_time.py                    # N = 10,000: full batch, and B = 1,000 minibatches
    python benchmarks/step_time.py --n 2000 --steps 5 # a quick look
    python benchmarks/step_time.py --device cuda      # the same on a GPU

Every family's step is the trainer's own (negative_elbo + backward + Adam, lazy Adam for F-VI's rows) on real
MNIST images with the default model (d = 64, H = 256, depth 2). Steps of all families are interleaved,
round after round, so that drift of the machine hits them alike. The minibatch case is timed with both
local-term schemes of SPEC §3: 'batch' (the encoder and local terms on the batch only) and 'all' (the
paper's mechanics: local terms of all N latents, and the encoder on all N, every step). Prints a Markdown table and, with
--json, writes the raw timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from amortized_bayes.config import (DataConfig, FamilyConfig, family_config, ModelConfig, ObjectiveConfig, RunConfig,
                                    TrainConfig)
from amortized_bayes.data import load_split
from amortized_bayes.meta import machine_description
from amortized_bayes.runtime import keep_freed_memory
from amortized_bayes.training import batch_data, batch_schedule, build, make_optimisers, train_step

FAMILIES = [
    ("A-VI k=1", family_config(name="amortized", width=1)),
    ("A-VI k=64", family_config(name="amortized", width=64)),
    ("A-VI k=128", family_config(name="amortized", width=128)),
    ("A-VI k=256", family_config(name="amortized", width=256)),
    ("F-VI", family_config(name="factorized")),
    ("constant-VI", family_config(name="constant")),
    ("SA-VI k=64 K=5", family_config(name="semi-amortized", width=64, refine_steps=5)),
]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One family's training state and a closure that performs exactly one trainer step
    (:func:`amortized_bayes.training.train_step` on the batch the trainer would take), on ``device``,
    with the default decoder or ``model``."""

    def __init__(self, family: FamilyConfig, x: torch.Tensor, batch_size: int | None, local_terms: str,
                 device: str = "cpu", model: ModelConfig | None = None):
        n = x.shape[0]
        self.device = torch.device(device)
        self.config = RunConfig(data=DataConfig(n_train=n, n_test=0), family=family, model=model or ModelConfig(),
                                objective=ObjectiveConfig(local_terms=local_terms),
                                train=TrainConfig(batch_size=batch_size, device=device))
        model, family_module = build(self.config, n)
        self.model, self.family = model.to(self.device), family_module.to(self.device)
        self.optimisers = make_optimisers(self.model, self.family, self.config)
        self.params = [p for opt in self.optimisers for g in opt.param_groups for p in g["params"]]
        self.x, self.n = x.to(self.device), n
        self.batch_generator = torch.Generator().manual_seed(0)  # the batches' order, drawn on the CPU
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.batches: list[torch.Tensor] = []
        self.x_all = self.x if local_terms == "all" else None
        self.objective = self.config.objective
        self.loss = None  # set by subclasses to replace the objective (e.g. a compiled one)

    def step(self) -> float:
        if not self.batches:
            self.batches = batch_schedule(self.n, self.config.train.batch_size, "shuffled", self.batch_generator)
        rows = self.batches.pop()
        synchronize(self.device)
        start = time.perf_counter()
        xb, idx = batch_data(self.x, rows.to(self.device))
        _, bad = train_step(self.model, self.family, self.optimisers, self.params, xb, idx, num_data=self.n,
                            objective=self.objective, generator=self.generator, x_all=self.x_all,
                            loss_fn=self.loss)
        if bad:
            raise RuntimeError(f"non-finite {bad} in the benchmark step")
        synchronize(self.device)
        return time.perf_counter() - start


def device_label(meta: dict) -> str:
    return f"{meta['device']} ({meta['gpu']})" if "gpu" in meta else meta["device"]


def run_case(x, batch_size, local_terms, steps, warmup, device="cpu"):
    steppers = {name: Stepper(fam, x, batch_size, local_terms, device) for name, fam in FAMILIES}
    for _ in range(warmup):
        for s in steppers.values():
            s.step()
    times = {name: [] for name in steppers}
    for _ in range(steps):
        for name, s in steppers.items():
            times[name].append(s.step())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="training images (default 10,000)")
    parser.add_argument("--batch", type=int, default=1_000, help="minibatch size of the second case")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per family and case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the steps run: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--json", default=None, help="write raw timings here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave the C allocator as it is (the tool's workers keep freed memory for reuse)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()  # what the tool's workers do (amortized_bayes.runtime); every entry runs with it
    x = load_split("mnist", "train", n=args.n).images
    cases = [(f"N = {args.n:,} full batch", None, "batch"),
             (f"B = {args.batch:,}, local terms 'batch'", args.batch, "batch"),
             (f"B = {args.batch:,}, local terms 'all' (paper)", args.batch, "all")]
    results = {}
    for label, batch, scheme in cases:
        results[label] = run_case(x, batch, scheme, args.steps, args.warmup, args.device)
    meta = machine_description(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {meta['cpu_count']} cores, "
          f"torch {meta['torch']} with {torch.get_num_threads()} threads; device {device_label(meta)}; "
          f"{args.steps} timed steps after "
          f"{args.warmup} warm-up, interleaved; median (min-max) ms per step\n")
    names = [name for name, _ in FAMILIES]
    print("| family | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = []
        for label in results:
            t = [1e3 * v for v in results[label][name]]
            cells.append(f"{statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    ref = "F-VI"
    print(f"\nratio to {ref} (median step time):")
    for label in results:
        base = statistics.median(results[label][ref])
        print(f"  {label}: " + ", ".join(f"{n} {statistics.median(results[label][n]) / base:.2f}" for n in names))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "args": vars(args), "seconds": results}, fh, indent=1)


if __name__ == "__main__":
    main()
