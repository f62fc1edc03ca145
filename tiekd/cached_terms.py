"""The KL and ranking terms against a cached teacher: its top-K tokens and the mass outside them."""

import torch

from .chunking import row_chunks
from .precision import compute_dtype
from .ranking import ranking_from_topk

# Below this estimated student tail mass, fp32 cancellation would cost it more than about 1e-4 of its
# value: those positions recompute it exactly (README.md, "Numerics").
TAIL_CANCELS = 1e-2


def cached_kd_terms(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_lprobs: torch.Tensor,
                    teacher_tail_logmass: torch.Tensor, k: int, with_rank: bool = True, normalized: bool = False,
                    max_rows=None, rank_space: str = "prob", rank_margin: float = 0.0):
    """Per-position ``(kl, rank)`` against the cached teacher: the bucketed KL and the exact ranking loss.

    The KL merges everything outside the K cached tokens into one bucket, a lower
    bound of the full KL; the ranking loss is exact for k <= K. Both bounds and the
    tail-mass recomputation are derived in README.md, "Numerics". A position whose
    cached log-probs and tail are all -inf (padding) gives 0 and zero gradient.

    Args:
        student_logits: (..., V) student logits, or log-probabilities with ``normalized``.
        teacher_ids: (..., K) the teacher's top-K token ids, by descending probability.
        teacher_lprobs: (..., K) their log-probabilities.
        teacher_tail_logmass: (...) log of the teacher's mass outside them.
        k: the ranking loss's k, 1 <= k <= K.
        with_rank: False skips the ranking loss (returned as zeros).
        normalized: ``student_logits`` already are log-probabilities (the CE's, shared with its backward).
        max_rows: positions per chunk where the student's tail mass is recomputed (None: all).
        rank_space, rank_margin: the ranking loss's space (``tiekd.RANK_SPACES``) and hinge margin.

    Returns:
        (kl, rank), each (...) in the compute dtype.
    """
    size = teacher_ids.size(-1)
    if with_rank and not 1 <= k <= size:
        raise ValueError(f"k must be in 1..{size} (the cached top-K), got {k}")
    shape, vocab = student_logits.shape[:-1], student_logits.size(-1)
    dtype = compute_dtype(student_logits)
    lp = student_logits.reshape(-1, vocab).to(dtype)
    if not normalized:
        lp = torch.log_softmax(lp, dim=-1)
    ids = teacher_ids.reshape(-1, size).long()
    lq = teacher_lprobs.detach().reshape(-1, size).to(dtype)
    lq_tail = teacher_tail_logmass.detach().reshape(-1).to(dtype)
    q, q_tail = lq.exp(), lq_tail.exp()
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    # One gather for the cached and the student's top-k tokens: one scatter in backward.
    b = lp.detach().topk(k, dim=-1).indices if with_rank else ids[:, :0]
    lp_ids, lp_b = lp.gather(-1, torch.cat([ids, b], dim=-1)).split([size, b.size(-1)], dim=-1)
    # != 0 keeps a NaN teacher visible in the value (see kl_divergence).
    kl = torch.where(q != 0, q * (lq - lp_ids), zero).sum(dim=-1)
    log_p_tail = _student_tail_logmass(lp, ids, lp_ids, q_tail != 0, max_rows)
    kl = kl + torch.where(q_tail != 0, q_tail * (lq_tail - log_p_tail), zero)
    if not with_rank:
        return kl.view(shape), torch.zeros_like(kl).view(shape)
    q_b = torch.where(b.unsqueeze(-1) == ids.unsqueeze(-2), q.unsqueeze(-2), zero).amax(dim=-1)
    # No teacher mass, no ranking (padding repeats one id).
    rank = ranking_from_topk(lp_ids[:, :k], lp_b, q[:, :k], q_b, rank_space, rank_margin)
    rank = torch.where(q[:, 0] != 0, rank, zero)
    return kl.view(shape), rank.view(shape)


def _student_tail_logmass(lp, ids, lp_ids, needed, max_rows):
    """log p_tail = log(1 - sum_i p(a_i)) per position where ``needed``, 0 elsewhere (so no NaN reaches backward)."""
    estimate = 1 - lp_ids.exp().sum(dim=-1)
    direct = needed & (estimate >= TAIL_CANCELS)
    log_p_tail = torch.where(direct, estimate, torch.ones_like(estimate)).log()
    rows = (needed & ~direct).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return log_p_tail
    return log_p_tail.index_put((rows,), _UncachedLogMass.apply(lp, ids, rows, max_rows))


def _uncached(lp, ids):
    return lp.scatter(-1, ids, float("-inf"))


class _UncachedLogMass(torch.autograd.Function):
    """logsumexp of ``lp`` outside ``ids`` at the positions ``rows``, ``max_rows`` of them at a time.

    Backward writes each chunk's gradient in place: no dense block of all the rows is ever built.
    """

    @staticmethod
    def forward(ctx, lp, ids, rows, max_rows):
        ctx.chunks = [rows[r] for r in row_chunks(rows.numel(), max_rows)]
        out = torch.cat([_uncached(lp[c], ids[c]).logsumexp(dim=-1) for c in ctx.chunks])
        ctx.save_for_backward(lp, ids, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        lp, ids, out = ctx.saved_tensors
        # The clamp keeps exp(-inf - -inf) out when nothing is left outside the ids: 0, not NaN.
        out = out.clamp(min=torch.finfo(out.dtype).min).unsqueeze(-1)
        grad_lp, start = torch.zeros_like(lp), 0
        for c in ctx.chunks:
            r = slice(start, start + c.numel())
            start = r.stop
            # d/d lp_v = exp(lp_v - out) for v outside the ids: their softmax.
            grad_lp[c] = _uncached(lp[c], ids[c]).sub_(out[r]).exp_().mul_(grad[r].unsqueeze(-1))
        return grad_lp, None, None, None
