"""The machine a run or a benchmark ran on, recorded beside its numbers (run.json's `machine`,
the results of benchmarks/)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def describe_machine() -> dict:
    import torch
    import transformers

    cpu, ram_gib = platform.processor() or "unknown", None
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        ram_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        ram_gib = round(ram_kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": ram_gib,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15_min_at_start": [round(x, 2) for x in os.getloadavg()],
    }
