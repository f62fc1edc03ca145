"""The hierarchical ranking loss of TIE-KD: the teacher's top-k ranked first, its top-1 above all."""

import torch

from .precision import compute_dtype


def hierarchical_ranking_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, k: int) -> torch.Tensor:
    """R_top1 + R_topk per position on probabilities, zero margin, no gradient into the teacher.

    The formula and its indicator are in README.md, "Numerics".

    Args:
        student_probs: (..., V) probabilities p of the student.
        teacher_probs: (..., V) probabilities q of the teacher.
        k: how many of the teacher's top tokens are ranked, 1 <= k <= V.

    Returns:
        (...) the loss in the compute dtype.
    """
    if not 1 <= k <= student_probs.size(-1):
        raise ValueError(f"k must be in 1..{student_probs.size(-1)} (the vocabulary), got {k}")
    dtype = compute_dtype(student_probs)
    p = student_probs.to(dtype)
    q = teacher_probs.detach().to(dtype)
    a = q.topk(k, dim=-1).indices
    b = p.detach().topk(k, dim=-1).indices
    return ranking_from_topk(p.gather(-1, a), p.gather(-1, b), q.gather(-1, a), q.gather(-1, b))


def ranking_from_topk(p_a: torch.Tensor, p_b: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """The two ranking levels from the probabilities at the teacher's top-k (a) and the student's (b).

    Args:
        p_a, q_a: (..., k) student and teacher probabilities at the teacher's top-k, in the teacher's order.
        p_b, q_b: (..., k) student and teacher probabilities at the student's top-k.

    Returns:
        (...) R_top1 + R_topk.
    """
    # [..., i, j]: teacher top-k token a_i against student top-k token b_j.
    outranks = (q_a.unsqueeze(-1) > q_b.unsqueeze(-2)).to(p_a.dtype)
    r_topk = (outranks * (p_b.unsqueeze(-2) - p_a.unsqueeze(-1)).clamp(min=0)).sum(dim=(-2, -1))
    r_top1 = (p_a[..., 1:] - p_a[..., :1]).clamp(min=0).sum(dim=-1)
    return r_top1 + r_topk
