"""What every record carries about where it was made: versions and machine."""

from __future__ import annotations

import os
import platform
import re
import sys

import numpy as np
import torch

from . import __version__


# Instruction-set extensions that change how fast PyTorch's CPU kernels run (x86 and Arm names as
# /proc/cpuinfo spells them): hosts sold as the same kind differ in these, and step times with them.
ISA_FLAG = re.compile(r"(sse|ssse|avx|amx|fma|bmi|asimd|sve|neon)\w*|f16c|i8mm|bf16|sme(\d|_\w+)?")


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and its instruction-set flags (sorted), from /proc/cpuinfo on Linux
    (``cpuinfo``: that file's text, for tests); elsewhere the model from ``platform`` and no flags."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= {f for f in value.split() if ISA_FLAG.fullmatch(f)}
    return {"model": model, "isa_flags": sorted(flags)}


def machine_description(device: str = "cpu") -> dict:
    info = {
        "amortized_bayes": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_description()["model"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
