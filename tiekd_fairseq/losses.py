"""The TIE-KD loss terms, as pure torch functions (no fairseq).

Every function returns one value per position (the input's leading shape);
callers mask padding and sum. Inputs may be fp16/bf16; the math runs in fp32
(or float64 when given float64, so gradcheck can check it).
"""

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def kl_divergence(student_lprobs: torch.Tensor, teacher_lprobs: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q(v) (log q(v) - log p(v)) over the last dimension.

    Both arguments are log-probabilities: p is the student, q the teacher.
    Log space throughout, so no epsilon is needed inside a log; tokens the
    teacher gives zero probability contribute exactly zero.
    """
    dtype = _compute_dtype(student_lprobs)
    log_p = student_lprobs.to(dtype)
    log_q = teacher_lprobs.detach().to(dtype)
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(dim=-1)


def hierarchical_ranking_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, k: int
) -> torch.Tensor:
    """R_top1 + R_topk per position, on probabilities.

    With a_1..a_k the teacher's top-k ids and b_1..b_k the student's (both by
    descending probability), p the student and q the teacher distribution:

    R_topk = sum_i sum_j [q(a_i) > q(b_j)] * max(0, p(b_j) - p(a_i))
        (the teacher's top-k must be the student's top-k, in the teacher's order)
    R_top1 = sum_{i>=2} max(0, p(a_i) - p(a_1))
        (the teacher's top-1 must come first)

    Zero margin, no normalisation by k, no gradient into the teacher.
    """
    if not 1 <= k <= student_probs.size(-1):
        raise ValueError(f"k must be in 1..{student_probs.size(-1)} (the vocabulary), got {k}")
    dtype = _compute_dtype(student_probs)
    p = student_probs.to(dtype)
    q = teacher_probs.detach().to(dtype)
    a = q.topk(k, dim=-1).indices
    b = p.detach().topk(k, dim=-1).indices
    p_a, p_b = p.gather(-1, a), p.gather(-1, b)
    q_a, q_b = q.gather(-1, a), q.gather(-1, b)
    return _ranking_from_topk(p_a, p_b, q_a, q_b)


def _ranking_from_topk(p_a, p_b, q_a, q_b):
    """The two ranking levels from the probabilities at the teacher's (a) and student's (b) top-k."""
    # [..., i, j]: teacher top-k token a_i against student top-k token b_j.
    outranks = (q_a.unsqueeze(-1) > q_b.unsqueeze(-2)).to(p_a.dtype)
    r_topk = (outranks * (p_b.unsqueeze(-2) - p_a.unsqueeze(-1)).clamp(min=0)).sum(dim=(-2, -1))
    r_top1 = (p_a[..., 1:] - p_a[..., :1]).clamp(min=0).sum(dim=-1)
    return r_top1 + r_topk


KD_TARGETS = ("full", "top1", "no-top1", "topk")


def partial_kd(
    student_lprobs: torch.Tensor, teacher_lprobs: torch.Tensor, target: torch.Tensor, kd_target: str, k: int = 5
) -> torch.Tensor:
    """Word-level KD on part of the teacher's knowledge (the paper's knowledge-removal study).

    q is the teacher, a_1 its argmax, y the gold token (``target``, leading shape):
    - full: KL(q || p), the whole distribution;
    - top1: -q(a_1) log p(a_1), only the top-1 as a hard label weighted by its probability;
    - no-top1: KL(q~ || p) with the top-1 mass moved onto the gold token,
      q~(a_1) = 0 and q~(y) = q(y) + q(a_1) (q~ = q where a_1 = y);
    - topk: -sum_{i<=k} q(a_i) log p(a_i), unnormalised.
    """
    dtype = _compute_dtype(student_lprobs)
    log_p = student_lprobs.to(dtype)
    log_q = teacher_lprobs.detach().to(dtype)
    if kd_target == "full":
        return kl_divergence(log_p, log_q)
    if kd_target in ("top1", "topk"):
        top_log_q, a = log_q.topk(1 if kd_target == "top1" else k, dim=-1)
        return -(top_log_q.exp() * log_p.gather(-1, a)).sum(dim=-1)
    if kd_target == "no-top1":
        q = log_q.exp()
        top1_mass, a1 = q.max(dim=-1, keepdim=True)
        moved = q.scatter(-1, a1, 0.0).scatter_add(-1, target.unsqueeze(-1), top1_mass)
        return kl_divergence(log_p, moved.log())
    raise ValueError(f"kd_target must be one of {', '.join(KD_TARGETS)}, got {kd_target!r}")
