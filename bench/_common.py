"""Shared by the benchmark scripts: where and when they ran, and timing that waits for the device."""
from __future__ import annotations

import datetime
import os
import platform
import time

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, device) -> float:
    """Seconds one call of fn takes, synchronising CUDA around it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start
