"""The KL term of word-level KD."""

import torch

from .precision import compute_dtype


def kl_divergence(student_lprobs: torch.Tensor, teacher_lprobs: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per position, with no gradient into the teacher (README.md, "Numerics": log space, no epsilon).

    Args:
        student_lprobs: (..., V) log-probabilities log p of the student.
        teacher_lprobs: (..., V) log-probabilities log q of the teacher.

    Returns:
        (...) the KL in the compute dtype; a NaN teacher gives NaN, for the caller to detect.
    """
    dtype = compute_dtype(student_lprobs)
    log_p = student_lprobs.to(dtype)
    log_q = teacher_lprobs.detach().to(dtype)
    q = log_q.exp()
    # != 0, not > 0: a NaN teacher stays visible in the value (> 0 would hide it there and still send NaN
    # into the gradient).
    terms = torch.where(q != 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(dim=-1)
