"""The KL and ranking terms straight from raw logits, with no dense softmax kept for backward (the lean path)."""

import torch

from .chunking import row_chunks
from .precision import compute_dtype
from .ranking import ranking_from_topk


def tie_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 with_rank: bool = True, max_rows=None, rank_space: str = "prob", rank_margin: float = 0.0):
    """Per-position ``(kl, rank)`` from logits, equal in value and gradient to the functions on probabilities.

    kl is ``tau^2 * kl_divergence`` of the tempered distributions; rank is
    ``hierarchical_ranking_loss`` at temperature 1 in ``rank_space`` with ``rank_margin``. How backward
    recomputes instead of storing, and how -inf, NaN and chunks behave: README.md, "Numerics".

    Args:
        student_logits: (..., V) student logits (fp16, bf16, fp32 or float64).
        teacher_logits: (..., V) teacher logits; -inf rules a token out.
        k: the ranking loss's k, 1 <= k <= V.
        temperature: tau of the KL term.
        with_rank: False skips the ranking loss (returned as zeros).
        max_rows: positions processed at once, forward and backward (None: all).
        rank_space, rank_margin: the ranking loss's space (``tiekd.RANK_SPACES``) and hinge margin.

    Returns:
        (kl, rank), each (...) in the compute dtype.
    """
    if with_rank and not 1 <= k <= student_logits.size(-1):
        raise ValueError(f"k must be in 1..{student_logits.size(-1)} (the vocabulary), got {k}")
    shape = student_logits.shape[:-1]
    kl, rank = _TieKDTerms.apply(
        student_logits.reshape(-1, student_logits.size(-1)),
        teacher_logits.detach().reshape(-1, teacher_logits.size(-1)),
        k, float(temperature), with_rank, max_rows, rank_space, float(rank_margin),
    )
    return kl.view(shape), rank.view(shape)


class _TieKDTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, k, tau, with_rank, max_rows, space, margin):
        dtype = compute_dtype(s)
        ctx.tau, ctx.dtype, ctx.chunks = tau, dtype, row_chunks(s.size(0), max_rows)
        parts = [_forward(s[r].to(dtype), t[r].to(dtype), k, tau, with_rank, space, margin) for r in ctx.chunks]
        kl, rank, *saved = (torch.cat(columns) for columns in zip(*parts))
        ctx.save_for_backward(s, t, *saved)
        return kl, rank

    @staticmethod
    def backward(ctx, grad_kl, grad_rank):
        s, t, *saved = ctx.saved_tensors
        dtype = ctx.dtype

        def rows(r):
            return _backward(s[r].to(dtype), t[r].to(dtype), grad_kl[r], grad_rank[r], [x[r] for x in saved],
                             ctx.tau)

        if len(ctx.chunks) == 1:
            grad = rows(ctx.chunks[0]).to(s.dtype)
        else:
            # Each chunk's gradient goes straight into place: no chunk-sized pieces kept for a cat.
            grad = torch.empty_like(s)
            for r in ctx.chunks:
                grad[r] = rows(r)
        return grad, None, None, None, None, None, None, None


def _forward(s32, t32, k, tau, with_rank, space, margin):
    """(kl, rank[, a, b, dR/ds_a, dR/ds_b]) for a block of positions, in the compute dtype.

    dR/ds at the gathered ids holds logsumexp(s) fixed; ``_backward`` adds its part.
    """
    s_tau, t_tau = (s32, t32) if tau == 1 else (s32 / tau, t32 / tau)
    lse_s_tau = torch.logsumexp(s_tau, dim=-1, keepdim=True)
    lse_t_tau = torch.logsumexp(t_tau, dim=-1, keepdim=True)
    # The KL from logits (README.md, "Numerics"); the clamp makes a -inf teacher logit's term 0 * finite.
    q_tau = torch.softmax(t_tau, dim=-1)
    diff = t_tau.clamp(min=torch.finfo(t_tau.dtype).min).sub_(s_tau)
    kl = tau**2 * (torch.linalg.vecdot(q_tau, diff) - lse_t_tau.squeeze(-1) + lse_s_tau.squeeze(-1))
    del q_tau, diff
    if not with_rank:
        return kl, torch.zeros_like(kl)
    if tau == 1:
        lse_s, lse_t = lse_s_tau, lse_t_tau
    else:
        lse_s, lse_t = torch.logsumexp(s32, dim=-1, keepdim=True), torch.logsumexp(t32, dim=-1, keepdim=True)
    a = t32.topk(k, dim=-1).indices
    b = s32.topk(k, dim=-1).indices
    with torch.enable_grad():
        s_a, s_b = s32.gather(-1, a).requires_grad_(), s32.gather(-1, b).requires_grad_()
        q_a, q_b = (t32.gather(-1, a) - lse_t).exp(), (t32.gather(-1, b) - lse_t).exp()
        rank = ranking_from_topk(s_a - lse_s, s_b - lse_s, q_a, q_b, space, margin)
        # Positions are independent, so the gradient of the sum holds each position's own.
        grad_s_a, grad_s_b = torch.autograd.grad(rank.sum(), (s_a, s_b), materialize_grads=True)
    return kl, rank.detach(), a, b, grad_s_a, grad_s_b


def _backward(s32, t32, grad_kl, grad_rank, saved, tau):
    """d(grad_kl * kl + grad_rank * rank)/ds for a block of positions, in the compute dtype."""
    # d(tau^2 KL)/ds = tau (p_tau - q_tau)
    g_kl = (tau * grad_kl).unsqueeze(-1)
    p_tau = torch.softmax(s32 if tau == 1 else s32 / tau, dim=-1)
    if saved:
        a, b, gp_a, gp_b = saved
        gp_a, gp_b = gp_a * grad_rank.unsqueeze(-1), gp_b * grad_rank.unsqueeze(-1)
        # dR/ds_v = sum_i g_i (delta_iv - p_v), over the gathered ids i with their g_i = dR/ds_i at a fixed
        # logsumexp (p at temperature 1).
        total = (gp_a.sum(-1) + gp_b.sum(-1)).unsqueeze(-1)
        if tau == 1:
            grad = p_tau.mul_(g_kl - total)
        else:
            grad = p_tau.mul_(g_kl).sub_(torch.softmax(s32, dim=-1).mul_(total))
        grad.scatter_add_(-1, a, gp_a).scatter_add_(-1, b, gp_b)
    else:
        grad = p_tau.mul_(g_kl)
    return grad.sub_(torch.softmax(t32 if tau == 1 else t32 / tau, dim=-1).mul_(g_kl))
