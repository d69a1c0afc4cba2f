"""Process-level settings for fast training on CPUs: torch threads, and the C allocator.

These change how fast a process computes, never what it computes. The executors' workers, the `gap`
command's workers and the benchmarks call :func:`prepare_process` once at start; library users who
call :func:`amortized_bayes.training.fit` in their own process may call it too.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def configure_threads(threads: int) -> None:
    """One setting for every threading layer torch may use in this process."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process


def keep_freed_memory(max_block: int = 1 << 30) -> bool:
    """Have glibc's malloc keep freed blocks up to ``max_block`` bytes for reuse instead of returning
    them to the kernel. A training step allocates and frees the same large activations every time;
    by default blocks over 32 MB (and the top of the heap) go back to the kernel and come back as
    fresh pages, each paying a page fault: about 15,000 faults and 10% of a full-batch step at
    N = 10,000 here (BENCHMARKS.md). The price is a resident size that stays at its peak. Returns
    whether the setting was applied (only on Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl)
    ok = mallopt(_M_MMAP_THRESHOLD, int(max_block)) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)


def prepare_process(threads: int | None = None) -> None:
    """Set torch's threads (when given) and keep freed memory for reuse: see the functions above."""
    if threads is not None:
        configure_threads(threads)
    keep_freed_memory()
