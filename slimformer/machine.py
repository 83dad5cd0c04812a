"""A description of the machine a figure was measured on, stored next to every result."""

from __future__ import annotations

import os
import platform

import torch
import transformers


def machine_info() -> dict:
    """CPU, core count, thread count and library versions, for result files."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
