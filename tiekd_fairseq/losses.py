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
    # != 0, not > 0: a NaN teacher stays NaN in the value, where callers can see it (> 0 would hide it
    # from the value and still send NaN into the gradient).
    terms = torch.where(q != 0, q * (log_q - log_p), torch.zeros_like(q))
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
        top_q = top_log_q.exp()
        # A top-k token the teacher gives no mass adds 0, even where the student's log-prob is -inf.
        return -torch.where(top_q != 0, top_q * log_p.gather(-1, a), torch.zeros_like(top_q)).sum(dim=-1)
    if kd_target == "no-top1":
        q = log_q.exp()
        top1_mass, a1 = q.max(dim=-1, keepdim=True)
        moved = q.scatter(-1, a1, 0.0).scatter_add(-1, target.unsqueeze(-1), top1_mass)
        return kl_divergence(log_p, moved.log())
    raise ValueError(f"kd_target must be one of {', '.join(KD_TARGETS)}, got {kd_target!r}")


# A bound on the dense fp32 (chunk positions x vocabulary) blocks the KD terms hold at once, forward or
# backward (up to 6.5 measured, fp16 logits with a temperature): what a memory budget is divided by.
DENSE_BLOCKS = 8


def max_rows_for_budget(vocab: int, budget_bytes: int):
    """The most positions whose dense KD temporaries fit in ``budget_bytes`` (at least 1); None without a budget."""
    if budget_bytes <= 0:
        return None
    return max(1, budget_bytes // (DENSE_BLOCKS * vocab * 4))


def row_chunks(rows: int, max_rows=None):
    """Slices covering ``rows`` positions, ``max_rows`` at a time (one slice when None)."""
    step = max(1, min(rows, max_rows or rows))
    return [slice(i, i + step) for i in range(0, max(rows, 1), step)]


def tie_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 with_rank: bool = True, max_rows=None):
    """Per-position ``(kl, rank)`` straight from raw logits, with no dense softmax kept for backward.

    Equals ``tau^2 * kl_divergence(log_softmax(s / tau), log_softmax(t / tau))`` and
    ``hierarchical_ranking_loss(softmax(s), softmax(t), k)`` in value and gradient
    (the ranking loss is always at temperature 1). Top-k by probability is top-k
    by logit, and a probability at a few ids is exp(logit - logsumexp), so the
    ranking loss costs O(positions * k^2) after the top-k; backward recomputes
    the student softmax from the logits instead of storing B x T x V tensors.
    ``with_rank=False`` skips the ranking loss (returned as zeros). Teacher logits
    of -inf (tokens it rules out) are allowed; a row with a NaN or +inf teacher
    logit gives a NaN KL, for the caller to detect.

    ``max_rows`` bounds how many positions are processed at once, in forward and
    in backward, so the dense fp32 temporaries stay within ``DENSE_BLOCKS x max_rows x V``
    (``max_rows_for_budget``); the values and gradients do not depend on it.
    """
    if with_rank and not 1 <= k <= student_logits.size(-1):
        raise ValueError(f"k must be in 1..{student_logits.size(-1)} (the vocabulary), got {k}")
    shape = student_logits.shape[:-1]
    kl, rank = _TieKDTerms.apply(
        student_logits.reshape(-1, student_logits.size(-1)),
        teacher_logits.detach().reshape(-1, teacher_logits.size(-1)),
        k, float(temperature), with_rank, max_rows,
    )
    return kl.view(shape), rank.view(shape)


class _TieKDTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, k, tau, with_rank, max_rows):
        dtype = _compute_dtype(s)
        ctx.tau, ctx.dtype, ctx.chunks = tau, dtype, row_chunks(s.size(0), max_rows)
        parts = [_tie_kd_forward(s[r].to(dtype), t[r].to(dtype), k, tau, with_rank) for r in ctx.chunks]
        kl, rank, *saved = (torch.cat(columns) for columns in zip(*parts))
        ctx.save_for_backward(s, t, *saved)
        return kl, rank

    @staticmethod
    def backward(ctx, grad_kl, grad_rank):
        s, t, *saved = ctx.saved_tensors
        dtype = ctx.dtype

        def rows(r):
            return _tie_kd_backward(s[r].to(dtype), t[r].to(dtype), grad_kl[r], grad_rank[r],
                                    [x[r] for x in saved], ctx.tau)

        if len(ctx.chunks) == 1:
            grad = rows(ctx.chunks[0]).to(s.dtype)
        else:
            # Each chunk's gradient goes straight into place: no chunk-sized pieces kept for a cat.
            grad = torch.empty_like(s)
            for r in ctx.chunks:
                grad[r] = rows(r)
        return grad, None, None, None, None, None


def _tie_kd_forward(s32, t32, k, tau, with_rank):
    """(kl, rank[, a, b, dR/dp_a * p_a, dR/dp_b * p_b]) for a block of positions, in the compute dtype."""
    s_tau, t_tau = (s32, t32) if tau == 1 else (s32 / tau, t32 / tau)
    lse_s_tau = torch.logsumexp(s_tau, dim=-1, keepdim=True)
    lse_t_tau = torch.logsumexp(t_tau, dim=-1, keepdim=True)
    # sum_v q (log q - log p) = sum_v q (t - s) / tau - lse_t + lse_s, as sum_v q = 1. A -inf teacher
    # logit has q = 0: the clamp makes its term 0 * finite instead of 0 * -inf (a NaN stays NaN).
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
        p_a = (s32.gather(-1, a) - lse_s).exp().requires_grad_()
        p_b = (s32.gather(-1, b) - lse_s).exp().requires_grad_()
        q_a, q_b = (t32.gather(-1, a) - lse_t).exp(), (t32.gather(-1, b) - lse_t).exp()
        rank = _ranking_from_topk(p_a, p_b, q_a, q_b)
        # Positions are independent, so the gradient of the sum holds each position's own.
        grad_p_a, grad_p_b = torch.autograd.grad(rank.sum(), (p_a, p_b))
    return kl, rank.detach(), a, b, grad_p_a * p_a.detach(), grad_p_b * p_b.detach()


def _tie_kd_backward(s32, t32, grad_kl, grad_rank, saved, tau):
    """d(grad_kl * kl + grad_rank * rank)/ds for a block of positions, in the compute dtype."""
    # d(tau^2 KL)/ds = tau (p_tau - q_tau)
    g_kl = (tau * grad_kl).unsqueeze(-1)
    p_tau = torch.softmax(s32 if tau == 1 else s32 / tau, dim=-1)
    if saved:
        a, b, gp_a, gp_b = saved
        gp_a, gp_b = gp_a * grad_rank.unsqueeze(-1), gp_b * grad_rank.unsqueeze(-1)
        # dR/ds_v = sum_i g_i p_i (delta_iv - p_v), over the gathered ids i (p at temperature 1).
        total = (gp_a.sum(-1) + gp_b.sum(-1)).unsqueeze(-1)
        if tau == 1:
            grad = p_tau.mul_(g_kl - total)
        else:
            grad = p_tau.mul_(g_kl).sub_(torch.softmax(s32, dim=-1).mul_(total))
        grad.scatter_add_(-1, a, gp_a).scatter_add_(-1, b, gp_b)
    else:
        grad = p_tau.mul_(g_kl)
    return grad.sub_(torch.softmax(t32 if tau == 1 else t32 / tau, dim=-1).mul_(g_kl))


# Below this estimated student tail mass p_tail = 1 - sum_i p(a_i), fp32 cancellation would cost it more than
# about 1e-4 of its value: those positions recompute it as a logsumexp over the uncached log-probs.
_TAIL_CANCELS = 1e-2


def cached_kd_terms(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_lprobs: torch.Tensor,
                    teacher_tail_logmass: torch.Tensor, k: int, with_rank: bool = True, normalized: bool = False,
                    max_rows=None):
    """Per-position ``(kl, rank)`` against a cached teacher: its top-K ids and log-probs and its tail mass.

    ``teacher_ids`` and ``teacher_lprobs`` (..., K) hold the teacher's top-K tokens
    a_1..a_K by descending probability q; ``teacher_tail_logmass`` (...) is
    log q_tail, q_tail = 1 - sum_{i<=K} q(a_i) (``TeacherCache.batch`` gives all three).

    kl = sum_{i<=K} q(a_i) (log q(a_i) - log p(a_i)) + q_tail (log q_tail - log p_tail),
    with p_tail = 1 - sum_{i<=K} p(a_i), the student's mass outside the cached tokens:
    the KL of both distributions merged into K + 1 buckets (the tail one bucket). It
    approximates KL(q || p) from below (merging outcomes never increases a KL) and
    equals it when q_tail = 0, as when K is the vocabulary.

    rank equals ``hierarchical_ranking_loss(softmax(student_logits), q, k)`` exactly for
    k <= K: the teacher's top-k is the head of the cache, and a student top-k token b_j
    outside the cache has q(b_j) < q(a_K) <= q(a_i) for every i <= k (barring a tie with
    the K-th cached probability), so [q(a_i) > q(b_j)] = 1 for it; it is taken as
    q(b_j) = 0, and a b_j inside the cache gets its cached q.

    Both terms need the student's log-probs only at the K cached and k top tokens:
    with ``normalized=True``, ``student_logits`` are already log-probabilities
    (the criterion passes the ones its CE computed), so the KD gradient joins the
    CE's in a single log_softmax backward and no dense pass is added. p_tail comes
    from the cached log-probs, except at positions where it is too small for that
    (below ``_TAIL_CANCELS``): there it is a logsumexp over the uncached log-probs,
    ``max_rows`` positions at a time.

    A position whose log-probs and tail are all -inf (q = 0; how ``TeacherCache.batch``
    pads) gives kl = rank = 0 and exactly zero gradient, whatever its ids. Both terms
    are computed in fp32 (float64 for float64 logits); gradients reach the student only.
    """
    size = teacher_ids.size(-1)
    if with_rank and not 1 <= k <= size:
        raise ValueError(f"k must be in 1..{size} (the cached top-K), got {k}")
    shape, vocab = student_logits.shape[:-1], student_logits.size(-1)
    dtype = _compute_dtype(student_logits)
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
    rank = torch.where(q[:, 0] != 0, _ranking_from_topk(lp_ids[:, :k].exp(), lp_b.exp(), q[:, :k], q_b), zero)
    return kl.view(shape), rank.view(shape)


def _student_tail_logmass(lp, ids, lp_ids, needed, max_rows):
    """log p_tail = log(1 - sum_i p(a_i)) per position where ``needed``, 0 elsewhere (so no NaN reaches backward)."""
    estimate = 1 - lp_ids.exp().sum(dim=-1)
    direct = needed & (estimate >= _TAIL_CANCELS)
    log_p_tail = torch.where(direct, estimate, torch.ones_like(estimate)).log()
    rows = (needed & ~direct).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return log_p_tail
    return log_p_tail.index_put((rows,), _UncachedLogMass.apply(lp, ids, rows, max_rows))


def _uncached(lp, ids):
    return lp.scatter(-1, ids, float("-inf"))


class _UncachedLogMass(torch.autograd.Function):
    """logsumexp of ``lp`` outside ``ids`` at the positions ``rows``, ``max_rows`` of them at a time.

    Forward and backward both go chunk by chunk, and backward writes each chunk's
    gradient in place: no dense block of all the rows is ever built.
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
