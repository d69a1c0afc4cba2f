"""One training step of every family: this tool vs the same model in Pyro vs the matmul floor.

    pip install -e '.[bench]'                 # Pyro, for the comparison only
    python benchmarks/speed.py                # N = 10,000 full batch, and B = 1,000 minibatches
    python benchmarks/speed.py --n 2000 --steps 5 --no-scaling     # a quick look

In one process and one run, for each case, round after round (so that machine drift hits every
entry alike), it times one step of:

* **tool**: the trainer's own step (``negative_elbo`` + backward + optimiser step) of every family,
  the default model (d = 64, H = 256, depth 2, Gaussian likelihood), the default objective (``mc``,
  1 draw, local terms of the batch);
* **pyro**: ``benchmarks/pyro_model.py``, ``SVI.step`` with ``Trace_ELBO`` (the same estimator),
  for A-VI, F-VI and constant-VI (Pyro has no SA-VI);
* **compiled** (``--compile``): the tool's step with its objective under ``torch.compile``, for
  A-VI k=64 and F-VI;
* **floor**: the matrix products of one step alone (decoder forward, and for each layer the
  products of the backward pass; the encoder's as well for amortized families), on the same shapes;
  for the convolutional rows, the convolutions and products (forward, and the input and weight
  gradients of the backward pass).

The convolutional rows (``--no-conv`` skips them) are A-VI with a convolutional encoder (k = 32
channels) and F-VI, both with the convolutional decoder (32 channels, 2 transposed convolutions).

Before timing it checks that the two implementations compute the same ELBO at equal parameters
(Pyro's parameters copied into the tool; means over many draws agree within Monte Carlo error).
Reports the median step time, ratios tool/floor and pyro/tool, peak memory allocated during one step
(torch's profiler), F-VI's time per epoch at N = 10k, 30k, 60k (``--no-scaling`` skips it), and the
test-time inference cost per new image of every family (``--no-inference`` skips it).
``--json FILE`` keeps the raw timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler (memory figures) quiet; before torch

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from step_time import FAMILIES, Stepper, device_label, synchronize  # noqa: E402

from amortized_bayes.config import DataConfig, FamilyConfig, family_config, ModelConfig, RunConfig, TrainConfig  # noqa: E402,E501
from amortized_bayes.data import load_split  # noqa: E402
from amortized_bayes.meta import cpu_description, machine_description  # noqa: E402
from amortized_bayes.runtime import keep_freed_memory  # noqa: E402
from amortized_bayes.objectives import negative_elbo  # noqa: E402
from amortized_bayes.training import build  # noqa: E402

PYRO_FAMILIES = {"A-VI k=1": ("amortized", 1), "A-VI k=64": ("amortized", 64), "A-VI k=128": ("amortized", 128),
                 "A-VI k=256": ("amortized", 256), "F-VI": ("factorized", 0), "constant-VI": ("constant", 0)}

# The convolutional rows: the model, and each family with its Pyro counterpart (family, width, encoder).
CONV_MODEL = ModelConfig(architecture="conv", channels=32, depth=2)
CONV_FAMILIES = [("A-VI k=32 conv, conv decoder", family_config(name="amortized", width=32, architecture="conv")),
                 ("F-VI, conv decoder", family_config(name="factorized"))]
PYRO_CONV = {"A-VI k=32 conv, conv decoder": ("amortized", 32, "conv"), "F-VI, conv decoder": ("factorized", 0, "mlp")}


class CompiledStepper(Stepper):
    """The tool's step with the objective wrapped in ``torch.compile`` (default inductor backend);
    compilation happens during warm-up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss = torch.compile(negative_elbo)


COMPILED = ("A-VI k=64", "F-VI")


class PyroStepper:
    """``SVI.step`` of the Pyro model on a shuffled batch. On a GPU the model, its priors and the
    guide's parameters are created with the GPU as torch's default device (the first step creates
    AutoNormal's parameters, so it runs under that default too); the data and indices live there."""

    def __init__(self, family: str, width: int, x: torch.Tensor, batch_size: int | None, seed: int = 0,
                 device: str = "cpu", encoder: str = "mlp", model: ModelConfig | None = None):
        import pyro
        import pyro_model as pm

        pyro.set_rng_seed(seed)
        self.device = torch.device(device)
        self.n = x.shape[0]
        model = model or ModelConfig()
        with self.device:
            self.model = pm.BayesianVAE(self.n, depth=model.depth, architecture=model.architecture,
                                        channels=model.channels,
                                        name=f"{family}{width}{encoder}{model.architecture}b{batch_size or 0}")
            self.guide = pm.make_guide(self.model, family, width, encoder=encoder)
        self.svi = pm.make_svi(self.model, self.guide)
        self.x, self.batch_size = x.to(self.device), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[torch.Tensor] = []
        self.started = False

    def step(self) -> float:
        if not self.batches:
            perm = torch.randperm(self.n, generator=self.generator)
            size = self.batch_size or self.n
            self.batches = list(perm.split(size))
        rows = self.batches.pop()
        if not self.started:
            with self.device:
                self.svi.step(self.x[rows.to(self.device)], rows.to(self.device))
            self.started = True
        synchronize(self.device)
        start = time.perf_counter()
        rows = rows.to(self.device)
        self.svi.step(self.x[rows], rows)
        synchronize(self.device)
        return time.perf_counter() - start


def _linear_shapes(sizes: list[int]) -> list[tuple[int, int]]:
    return list(zip(sizes[:-1], sizes[1:]))


class FloorStepper:
    """The matrix products of one step on the same shapes, and nothing else: forward a @ W^T per layer;
    backward grad_out^T @ a (weight gradient) and grad_out @ W (input gradient, where one is needed)."""

    def __init__(self, family: FamilyConfig, rows: int, d: int = 64, hidden: int = 256, data_dim: int = 784,
                 device: str = "cpu"):
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(0)
        decoder = _linear_shapes([d, hidden, hidden, data_dim])
        layers = [(a, b, True) for a, b in decoder]  # z's gradient is needed by every family
        if family.name in ("amortized", "semi-amortized"):
            k = family.width
            layers += [(data_dim, k, False), (k, k, True), (k, 2 * d, True)]  # both heads as one product
        self.ops = []
        for fan_in, fan_out, input_grad in layers:
            a = torch.randn(rows, fan_in, generator=g)
            w = torch.randn(fan_out, fan_in, generator=g)
            grad = torch.randn(rows, fan_out, generator=g)
            self.ops.append((a.to(self.device), w.to(self.device), grad.to(self.device), input_grad))
        self.refine = family.refine_steps if family.name == "semi-amortized" else 0

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(1 + 2 * self.refine):  # SA-VI: each refinement step is another pass and its backward
            for a, w, grad, input_grad in self.ops[:3]:
                torch.mm(a, w.T)
                torch.mm(grad.T, a)
                if input_grad:
                    torch.mm(grad, w)
        for a, w, grad, input_grad in self.ops[3:]:
            torch.mm(a, w.T)
            torch.mm(grad.T, a)
            if input_grad:
                torch.mm(grad, w)
        synchronize(self.device)
        return time.perf_counter() - start


class ConvFloorStepper:
    """The convolutions and matrix products of one step of a convolutional model, on the same shapes,
    and nothing else: forward, then the backward's input gradient (where one is needed) and weight
    gradient, each through the same aten operators autograd calls (``aten::convolution``,
    ``aten::convolution_backward``, ``mm``). Bias gradients (sums) are left out, as in the MLP floor."""

    def __init__(self, family: FamilyConfig, model: ModelConfig, rows: int, device: str = "cpu"):
        self.device = torch.device(device)
        self.g = torch.Generator().manual_seed(0)
        side, d, c = math.isqrt(model.data_dim), model.latent_dim, model.channels
        widths = [c * 2 ** (model.depth - 1 - i) for i in range(model.depth)] + [1]
        first = side // 2 ** model.depth
        self.ops: list = [self._linear(rows, d, widths[0] * first * first, True)]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            self.ops.append(self._conv(rows, a, b, first * 2**i, transposed=True, input_grad=True))
        if family.name in ("amortized", "semi-amortized"):
            k = family.width
            if getattr(family, "architecture", "mlp") == "conv":
                for i in range(family.depth):
                    self.ops.append(self._conv(rows, 1 if i == 0 else k, k, side // 2**i, transposed=False,
                                               input_grad=i > 0))
                features = k * (side // 2**family.depth) ** 2
            else:
                self.ops += [self._linear(rows, model.data_dim, k, False)]
                self.ops += [self._linear(rows, k, k, True) for _ in range(family.depth - 1)]
                features = k
            self.ops.append(self._linear(rows, features, 2 * d, True))  # both heads as one product

    def _tensor(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.device)

    def _linear(self, rows, fan_in, fan_out, input_grad):
        a, w, grad = self._tensor(rows, fan_in), self._tensor(fan_out, fan_in), self._tensor(rows, fan_out)

        def run():
            torch.mm(a, w.T)
            torch.mm(grad.T, a)
            if input_grad:
                torch.mm(grad, w)
        return run

    def _conv(self, rows, c_in, c_out, side_in, transposed, input_grad):
        x = self._tensor(rows, c_in, side_in, side_in)
        weight = self._tensor(c_in, c_out, 4, 4) if transposed else self._tensor(c_out, c_in, 4, 4)
        side_out = side_in * 2 if transposed else side_in // 2
        grad = self._tensor(rows, c_out, side_out, side_out)
        args = ([2, 2], [1, 1], [1, 1], transposed, [0, 0], 1)

        def run():
            torch.ops.aten.convolution(x, weight, None, *args)
            torch.ops.aten.convolution_backward(grad, x, weight, None, *args, [input_grad, True, False])
        return run

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for op in self.ops:
            op()
        synchronize(self.device)
        return time.perf_counter() - start


def peak_step_memory(step, device: torch.device) -> int:
    """Peak bytes allocated by torch during one call of ``step`` above what was allocated before it: on
    a GPU from the caching allocator's peak statistic; on a CPU from the profiler's memory records,
    each allocation counted once, in the operator that made it (an operator's total would count its
    children's allocations again), and each free as it happens."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in changes:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def elbo_agreement(x: torch.Tensor, draws: int = 200, with_conv: bool = True) -> dict:
    """-ELBO of both implementations at equal parameters (Pyro's copied into the tool; the local factors
    of F-VI and constant-VI moved off their N(0, I) start first): mean over ``draws`` single-draw
    estimates each, and the difference in standard errors."""
    import pyro
    import pyro_model as pm

    out = {}
    cases = [(label, family, width, "mlp", ModelConfig()) for label, (family, width) in (
        ("A-VI k=64", ("amortized", 64)), ("F-VI", ("factorized", 0)), ("constant-VI", ("constant", 0)))]
    if with_conv:
        cases += [(label, family, width, encoder, CONV_MODEL) for label, (family, width, encoder) in PYRO_CONV.items()]
    conv_images = 64  # a conv draw costs ~5x an MLP one; 64 images keep the check's time in bounds
    for label, family, width, encoder, model_config in cases:
        x_case = x[:conv_images] if model_config.architecture == "conv" else x
        n, idx = x_case.shape[0], torch.arange(x_case.shape[0])
        pyro.set_rng_seed(0)
        model = pm.BayesianVAE(n, depth=model_config.depth, architecture=model_config.architecture,
                               channels=model_config.channels,
                               name=f"check{family}{encoder}{model_config.architecture}")
        guide = pm.make_guide(model, family, max(width, 1), encoder=encoder)
        guide(x_case, idx)
        if family != "amortized":
            # Factors unlike the prior, different for every image (F-VI), so that the check covers the
            # local terms away from the shared N(0, I) start. (At the initial decoder the likelihood
            # barely depends on z, so it cannot tell which factor goes with which image.)
            with torch.no_grad():
                noise = torch.Generator().manual_seed(2)
                for p in guide.local.parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=noise))
        config = RunConfig(data=DataConfig(n_train=n, n_test=0), model=model_config,
                           family=family_config(name=family, width=max(width, 1), architecture=encoder),
                           train=TrainConfig(batch_size=None))
        tool_model, tool_family = build(config, n)
        pm.copy_into_tool(guide, family, tool_model, tool_family)
        g = torch.Generator().manual_seed(1)
        loss = pyro.infer.Trace_ELBO()
        with torch.no_grad():
            ours = torch.tensor([float(negative_elbo(tool_model, tool_family, x_case, idx, num_data=n,
                                                     config=config.objective, generator=g)) for _ in range(draws)])
            theirs = torch.tensor([loss.loss(model, guide, x_case, idx) for _ in range(draws)], dtype=torch.float64)
        se = math.sqrt(float(ours.var()) / draws + float(theirs.var()) / draws)
        out[label] = {"tool": float(ours.mean()), "pyro": float(theirs.mean()), "z": float(ours.mean() - theirs.mean()) / se}
    return out


def run_case(x, batch_size, steps, warmup, with_pyro: bool, with_compile: bool = False, device: str = "cpu",
             with_conv: bool = True):
    entries = {}
    for name, fam in FAMILIES:
        entries[("tool", name)] = Stepper(fam, x, batch_size, "batch", device)
        if with_compile and name in COMPILED:
            entries[("compiled", name)] = CompiledStepper(fam, x, batch_size, "batch", device)
        entries[("floor", name)] = FloorStepper(fam, batch_size or x.shape[0], device=device)
        if with_pyro and name in PYRO_FAMILIES:
            entries[("pyro", name)] = PyroStepper(*PYRO_FAMILIES[name], x, batch_size, device=device)
    for name, fam in CONV_FAMILIES if with_conv else []:
        entries[("tool", name)] = Stepper(fam, x, batch_size, "batch", device, model=CONV_MODEL)
        entries[("floor", name)] = ConvFloorStepper(fam, CONV_MODEL, batch_size or x.shape[0], device=device)
        if with_pyro:
            family, width, encoder = PYRO_CONV[name]
            entries[("pyro", name)] = PyroStepper(family, width, x, batch_size, device=device, encoder=encoder,
                                                  model=CONV_MODEL)
    for _ in range(warmup):
        for e in entries.values():
            e.step()
    times = {key: [] for key in entries}
    for _ in range(steps):
        for key, e in entries.items():
            times[key].append(e.step())
    memory = {key: peak_step_memory(e.step, torch.device(device)) for key, e in entries.items()
              if key[0] in ("tool", "pyro")}
    return times, memory


def fvi_scaling(sizes, steps: int, batch: int, device: str = "cpu") -> dict:
    """F-VI seconds per epoch (minibatches of ``batch``) at each N: linear in N means constant per image."""
    out = {}
    for n in sizes:
        x = load_split("mnist", "train", n=n).images
        s = Stepper(family_config(name="factorized"), x, batch, "batch", device)
        for _ in range(2):
            s.step()
        t = [s.step() for _ in range(steps)]
        out[n] = statistics.median(t) * math.ceil(n / batch)
    return out


def test_time_cost(x_train: torch.Tensor, x_test: torch.Tensor, epochs: int, device: str = "cpu") -> dict:
    """Seconds per new image to get q(z') with q(theta) frozen, per family, after training each family
    on ``x_train`` (full batch, ``epochs`` epochs, default settings): the encoder's forward pass
    (SA-VI: and its refinement steps), or the trainer's test-time optimisation (F-VI: a factor per image;
    constant-VI: one shared factor) under its default stopping rule. Timed on all of ``x_test`` at once."""
    from amortized_bayes.inference import infer_local
    from amortized_bayes.training import TrainingData, fit

    out = {}
    for name, fam in FAMILIES:
        config = RunConfig(data=DataConfig(n_train=x_train.shape[0], n_test=0), family=fam,
                           train=TrainConfig(batch_size=None, epochs=epochs, eval_every=epochs, device=device))
        result = fit(config, TrainingData(x_train, None))
        x_new = x_test.to(device)
        infer_local(result.model, result.family, x_new[:10], config.train.test_inference,
                    torch.Generator(device=device).manual_seed(0))  # warm-up
        post = infer_local(result.model, result.family, x_new, config.train.test_inference,
                           torch.Generator(device=device).manual_seed(1))
        out[name] = {"seconds_per_image": post.seconds / x_test.shape[0], "steps": post.steps,
                     "converged": post.converged, "images": x_test.shape[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="training images (default 10,000)")
    parser.add_argument("--batch", type=int, default=1_000, help="minibatch size of the second case")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per entry and case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-pyro", action="store_true", help="skip Pyro (when the bench extra is absent)")
    parser.add_argument("--no-scaling", action="store_true", help="skip F-VI's 10k/30k/60k epoch times")
    parser.add_argument("--no-inference", action="store_true", help="skip the test-time inference costs")
    parser.add_argument("--no-conv", action="store_true", help="skip the convolutional model's rows")
    parser.add_argument("--agreement-draws", type=int, default=200,
                        help="single-draw -ELBO estimates per implementation in the equal-parameter check "
                        "(default 200)")
    parser.add_argument("--inference-epochs", type=int, default=200,
                        help="full-batch epochs on 1,000 images before timing test-time inference (default 200)")
    parser.add_argument("--compile", action="store_true",
                        help=f"also time the step with torch.compile on the objective ({', '.join(COMPILED)})")
    parser.add_argument("--device", default="cpu",
                        help="where the steps run: cpu (default), cuda, cuda:1, ...; the ELBO check stays on the CPU")
    parser.add_argument("--json", default=None, help="write raw timings here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave the C allocator as it is (the tool's workers keep freed memory for reuse)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()  # what the tool's workers do (amortized_bayes.runtime); every entry runs with it
    with_pyro = not args.no_pyro
    if with_pyro:
        try:
            import pyro  # noqa: F401
        except ImportError:
            raise SystemExit("Pyro is not installed: pip install -e '.[bench]' (or pass --no-pyro)") from None
    x = load_split("mnist", "train", n=args.n).images
    meta = {**machine_description(args.device), "cpu": cpu_description()}
    print(f"machine: {meta['cpu']['model']}, {meta['cpu_count']} cores, torch {meta['torch']} "
          f"with {torch.get_num_threads()} threads; device {device_label(meta)}; {args.steps} timed steps after {args.warmup} warm-up, "
          "interleaved; median ms per step\n")
    report = {"meta": meta, "args": vars(args), "cases": {}}
    if with_pyro:
        agreement = elbo_agreement(x[:200], draws=args.agreement_draws, with_conv=not args.no_conv)
        report["elbo_agreement"] = agreement
        print(f"ELBO at equal parameters (200 images, 64 for the conv rows; mean of {args.agreement_draws} "
              "single-draw estimates of -ELBO):")
        for label, a in agreement.items():
            print(f"  {label}: tool {a['tool']:.1f}, Pyro {a['pyro']:.1f}, difference {a['z']:+.2f} standard errors")
        print()
    for label, batch in ((f"N = {args.n:,} full batch", None), (f"B = {args.batch:,} minibatches", args.batch)):
        times, memory = run_case(x, batch, args.steps, args.warmup, with_pyro, args.compile, args.device,
                                 with_conv=not args.no_conv)
        report["cases"][label] = {"seconds": {f"{k[0]}/{k[1]}": v for k, v in times.items()},
                                  "peak_bytes": {f"{k[0]}/{k[1]}": v for k, v in memory.items()}}
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"### {label}\n")
        print("| family | tool (ms) | floor (ms) | tool / floor | Pyro (ms) | Pyro / tool | tool peak MB | Pyro peak MB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, _ in FAMILIES + ([] if args.no_conv else CONV_FAMILIES):
            t, f = med[("tool", name)], med[("floor", name)]
            p = med.get(("pyro", name))
            mem_t = memory[("tool", name)] / 2**20
            mem_p = memory.get(("pyro", name))
            print(f"| {name} | {t:.1f} | {f:.1f} | {t / f:.2f} | " + (f"{p:.1f} | {p / t:.2f}" if p else "- | -")
                  + f" | {mem_t:.0f} | " + (f"{mem_p / 2**20:.0f}" if mem_p else "-") + " |")
        for name in COMPILED:
            if ("compiled", name) in med:
                c = med[("compiled", name)]
                print(f"{name} with torch.compile: {c:.1f} ms ({c / med[('tool', name)]:.2f}x the plain step)")
        print()
    if not args.no_scaling:
        sizes = (10_000, 30_000, 60_000)
        scaling = fvi_scaling(sizes, max(5, args.steps // 3), args.batch, args.device)
        report["fvi_epoch_seconds"] = scaling
        base = scaling[sizes[0]] / sizes[0]
        print(f"F-VI seconds per epoch (B = {args.batch:,}): " + ", ".join(
            f"N = {n:,}: {s:.2f} s ({s / n / base:.2f}x the per-image cost at 10k)" for n, s in scaling.items()))
    if not args.no_inference:
        test = load_split("mnist", "test", n=1000).images
        cost = test_time_cost(x[:1000], test, args.inference_epochs, args.device)
        report["test_time_inference"] = cost
        print(f"\n### Test-time inference: q(z') for 1,000 new images, q(theta) frozen (after {args.inference_epochs} "
              "full-batch epochs on 1,000 images)\n")
        print("| family | how q(z') is found | µs per image | x the A-VI k=64 encoder |")
        print("|---|---|---|---|")
        base = cost["A-VI k=64"]["seconds_per_image"]
        for (name, fam), c in zip(FAMILIES, cost.values()):
            if fam.name == "amortized":
                how = "one encoder pass"
            elif fam.name == "semi-amortized":
                how = f"encoder pass + {fam.refine_steps} gradient refinement steps"
            else:
                how = f"{c['steps']:,} Adam steps on the local ELBO ({'converged' if c['converged'] else 'step limit'})"
            ratio = c["seconds_per_image"] / base
            ratio_text = f"{ratio:.2f}" if ratio < 100 else f"{ratio:,.0f}"
            print(f"| {name} | {how} | {1e6 * c['seconds_per_image']:,.1f} | {ratio_text} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
