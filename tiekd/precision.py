"""The dtype the loss terms compute in."""

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half inputs (fp16/bf16), else the input's own (float64 stays float64, for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)
