"""Optimisers of the trainer: Adam for dense parameters, and a lazy Adam for F-VI's per-datapoint rows.

:class:`LazyAdam` is the algorithm of ``torch.optim.SparseAdam`` (the moments and the parameter move
only on the rows present in the gradient; bias corrections from one step count per parameter) written
as a few row gathers and scatters instead of sparse-tensor arithmetic, which costs most of an F-VI step
with minibatches of 1,000 on a CPU. ``tests/test_training.py`` checks it against SparseAdam.
"""

from __future__ import annotations

import math

import torch


def adam(params: list[torch.nn.Parameter], **options) -> torch.optim.Adam:
    """Adam with its fused kernels where this torch has them for these tensors (one pass per update
    instead of about ten kernels per parameter), else torch's default implementation. Same algorithm."""
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device/dtype without fused Adam
        return torch.optim.Adam(params, **options)


def _distinct_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (R,), values (R, ...)) of a sparse row gradient with every row once: as it is when its rows
    are distinct (the trainer's batches), else coalesced (duplicates summed)."""
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        seen = torch.zeros(grad.shape[0], dtype=torch.bool, device=rows.device)
        seen[rows] = True
        if int(seen.sum()) != rows.numel():
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()


class LazyAdam(torch.optim.Optimizer):
    """Adam for parameters with sparse row gradients (``nn.Embedding(sparse=True)``): rows absent from
    a step's gradient keep their values and moments. The same updates as ``torch.optim.SparseAdam``,
    and the same state (``step``, ``exp_avg``, ``exp_avg_sq``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LazyAdam: invalid lr {lr}, betas {betas} or eps {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients; use Adam for dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                rows, g = _distinct_rows(p.grad)
                exp_avg = state["exp_avg"].index_select(0, rows)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
                # m += (1 - b1)(g - m), v += (1 - b2)(g^2 - v): SparseAdam's order of operations.
                exp_avg.add_((g - exp_avg).mul_(1 - beta1))
                exp_avg_sq.add_(g.pow(2).sub_(exp_avg_sq).mul_(1 - beta2))
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.index_add_(0, rows, exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"])).mul_(-step_size))
        return loss
