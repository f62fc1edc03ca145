"""Word-level KD on part of the teacher's knowledge: the paper's knowledge-removal study."""

import torch

from .kl import kl_divergence
from .precision import compute_dtype

KD_TARGETS = ("full", "top1", "no-top1", "topk")


def partial_kd(student_lprobs: torch.Tensor, teacher_lprobs: torch.Tensor, target: torch.Tensor, kd_target: str,
               k: int = 5) -> torch.Tensor:
    """The KD term per position for one ``kd_target`` of ``KD_TARGETS`` (defined in README.md, "Numerics").

    Args:
        student_lprobs: (..., V) student log-probabilities.
        teacher_lprobs: (..., V) teacher log-probabilities.
        target: (...) gold token ids (no-top1 moves the teacher's top-1 mass onto them).
        kd_target: full, top1, no-top1 or topk.
        k: the k of topk.

    Returns:
        (...) the term in the compute dtype.
    """
    dtype = compute_dtype(student_lprobs)
    log_p = student_lprobs.to(dtype)
    log_q = teacher_lprobs.detach().to(dtype)
    if kd_target == "full":
        return kl_divergence(log_p, log_q)
    if kd_target in ("top1", "topk"):
        top_log_q, a = log_q.topk(1 if kd_target == "top1" else k, dim=-1)
        top_q = top_log_q.exp()
        # A top-k token the teacher gives no mass adds 0, even where the student's log-prob is -inf.
        return -torch.where(top_q != 0, top_q * log_p.gather(-1, a), torch.zeros_like(top_q)).sum(dim=-1)
    if kd_target == "no-top1":
        q = log_q.exp()
        top1_mass, a1 = q.max(dim=-1, keepdim=True)
        moved = q.scatter(-1, a1, 0.0).scatter_add(-1, target.unsqueeze(-1), top1_mass)
        return kl_divergence(log_p, moved.log())
    raise ValueError(f"kd_target must be one of {', '.join(KD_TARGETS)}, got {kd_target!r}")
