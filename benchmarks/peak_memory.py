"""Peak memory of a benchmark process: CUDA max allocated, or on CPU the peak resident set size."""

from pathlib import Path

import torch


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def start(device):
    """Reset the peak; return the baseline the peak is measured above."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    return _status_kb("VmRSS") * 1024


def peak_since(device, baseline):
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    return peak - baseline
