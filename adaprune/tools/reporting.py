"""What reports share: the machine a measurement ran on, and Markdown tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; the load average shows whether other work shared the CPU."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1min_before": os.getloadavg()[0],
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def replace_between(text: str, begin: str, end: str, content: str) -> str:
    """`text` with whatever stands between the marker lines `begin` and `end` replaced by `content`."""
    if begin not in text or end not in text:
        raise ValueError(f"the text has no generated-section markers ({begin!r} ... {end!r})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content}\n{end}{tail}"
