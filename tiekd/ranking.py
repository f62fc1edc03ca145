"""The hierarchical ranking loss of TIE-KD: the teacher's top-k ranked first, its top-1 above all."""

import torch

from .precision import compute_dtype

# prob: the paper's hinge on probabilities; logprob: the same two levels on log-probabilities (README.md,
# "Numerics").
RANK_SPACES = ("prob", "logprob")


def hierarchical_ranking_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor, k: int, space: str = "prob",
                              margin: float = 0.0) -> torch.Tensor:
    """R_top1 + R_topk per position, compared in ``space`` with hinge ``margin``, no gradient into the teacher.

    The formula and its indicator are in README.md, "Numerics".

    Args:
        student_probs: (..., V) probabilities p of the student.
        teacher_probs: (..., V) probabilities q of the teacher.
        k: how many of the teacher's top tokens are ranked, 1 <= k <= V.
        space: one of ``RANK_SPACES``; margin: the hinges' margin (0: the paper's).

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
    _check_space(space)
    # Probabilities as they are: through a log and back, one at 0 would get a NaN gradient.
    x = p if space == "prob" else p.log()
    return _levels(x.gather(-1, a), x.gather(-1, b), q.gather(-1, a), q.gather(-1, b), space, margin)


def ranking_from_topk(lp_a: torch.Tensor, lp_b: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor,
                      space: str = "prob", margin: float = 0.0) -> torch.Tensor:
    """The two ranking levels from the student's log-probabilities at the teacher's top-k (a) and its own (b).

    Args:
        lp_a, q_a: (..., k) the student's log-probabilities and the teacher's probabilities at the teacher's top-k,
            in the teacher's order.
        lp_b, q_b: (..., k) the same at the student's top-k.
        space: prob, hinges on probabilities summed (the paper's); logprob, on log-probabilities, each level the
            mean of its hinges, no gradient through the student's top-k.
        margin: the hinges' margin.

    Returns:
        (...) R_top1 + R_topk.
    """
    _check_space(space)
    x_a, x_b = (lp_a.exp(), lp_b.exp()) if space == "prob" else (lp_a, lp_b)
    return _levels(x_a, x_b, q_a, q_b, space, margin)


def _check_space(space):
    if space not in RANK_SPACES:
        raise ValueError(f"space must be one of {', '.join(RANK_SPACES)}, got {space!r}")


def _levels(x_a, x_b, q_a, q_b, space, margin):
    """R_top1 + R_topk from what the hinges compare: probabilities, or log-probabilities (then averaged)."""
    if space == "logprob":
        # The student's own top-k enter as constants: a hinge closes by raising the teacher's token, whose
        # log-probability takes mass from every token by its probability (the intruders most), never by flattening.
        x_b = x_b.detach()
    # [..., i, j]: teacher top-k token a_i against student top-k token b_j.
    outranks = (q_a.unsqueeze(-1) > q_b.unsqueeze(-2)).to(x_a.dtype)
    r_topk = (outranks * (x_b.unsqueeze(-2) - x_a.unsqueeze(-1) + margin).clamp(min=0)).sum(dim=(-2, -1))
    r_top1 = (x_a[..., 1:] - x_a[..., :1] + margin).clamp(min=0).sum(dim=-1)
    if space == "logprob":
        k = x_a.size(-1)
        r_topk, r_top1 = r_topk / k**2, r_top1 / max(k - 1, 1)
    return r_top1 + r_topk
