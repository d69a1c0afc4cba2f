"""What every record carries about where it was made: versions and machine."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch

from . import __version__


def machine_description(device: str = "cpu") -> dict:
    info = {
        "amortized_bayes": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
