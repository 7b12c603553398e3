"""The machine a measurement ran on, as eval and the benchmarks record it beside their figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def processor_name(device: str) -> str:
    """The processor that computes on `device`: the GPU (and its host CPU), or the CPU."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (host {cpu_name()})"
    return cpu_name()


def machine_info(device: str, dtype: str) -> dict[str, object]:
    return {
        "processor": processor_name(device),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype,
    }


def machine_summary(device: str) -> str:
    """One line for a benchmark's header and report."""
    return (f"{processor_name(device)}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")
