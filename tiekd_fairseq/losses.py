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


def tie_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 with_rank: bool = True):
    """Per-position ``(kl, rank)`` straight from raw logits, with no dense softmax kept for backward.

    Equals ``tau^2 * kl_divergence(log_softmax(s / tau), log_softmax(t / tau))`` and
    ``hierarchical_ranking_loss(softmax(s), softmax(t), k)`` in value and gradient
    (the ranking loss is always at temperature 1). Top-k by probability is top-k
    by logit, and a probability at a few ids is exp(logit - logsumexp), so the
    ranking loss costs O(positions * k^2) after the top-k; backward recomputes
    the student softmax from the logits instead of storing B x T x V tensors.
    ``with_rank=False`` skips the ranking loss (returned as zeros).
    """
    if with_rank and not 1 <= k <= student_logits.size(-1):
        raise ValueError(f"k must be in 1..{student_logits.size(-1)} (the vocabulary), got {k}")
    shape = student_logits.shape[:-1]
    kl, rank = _TieKDTerms.apply(
        student_logits.reshape(-1, student_logits.size(-1)),
        teacher_logits.detach().reshape(-1, teacher_logits.size(-1)),
        k, float(temperature), with_rank,
    )
    return kl.view(shape), rank.view(shape)


class _TieKDTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, k, tau, with_rank):
        dtype = _compute_dtype(s)
        s32, t32 = s.to(dtype), t.to(dtype)
        s_tau, t_tau = (s32, t32) if tau == 1 else (s32 / tau, t32 / tau)
        lse_s_tau = torch.logsumexp(s_tau, dim=-1, keepdim=True)
        lse_t_tau = torch.logsumexp(t_tau, dim=-1, keepdim=True)
        # sum_v q (log q - log p) = sum_v q (t - s) / tau - lse_t + lse_s, as sum_v q = 1.
        q_tau = torch.softmax(t_tau, dim=-1)
        kl = tau**2 * (torch.linalg.vecdot(q_tau, t_tau - s_tau) - lse_t_tau.squeeze(-1) + lse_s_tau.squeeze(-1))
        del q_tau
        ctx.tau, ctx.with_rank, ctx.dtype = tau, with_rank, dtype
        if not with_rank:
            ctx.save_for_backward(s, t)
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
        ctx.save_for_backward(s, t, a, b, grad_p_a * p_a.detach(), grad_p_b * p_b.detach())
        return kl, rank.detach()

    @staticmethod
    def backward(ctx, grad_kl, grad_rank):
        s, t = ctx.saved_tensors[:2]
        tau, dtype = ctx.tau, ctx.dtype
        s32, t32 = s.to(dtype), t.to(dtype)
        # d(tau^2 KL)/ds = tau (p_tau - q_tau)
        g_kl = (tau * grad_kl).unsqueeze(-1)
        p_tau = torch.softmax(s32 if tau == 1 else s32 / tau, dim=-1)
        if ctx.with_rank:
            a, b, gp_a, gp_b = ctx.saved_tensors[2:]
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
        grad.sub_(torch.softmax(t32 if tau == 1 else t32 / tau, dim=-1).mul_(g_kl))
        return grad.to(s.dtype), None, None, None, None


def cached_kd_terms(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_lprobs: torch.Tensor,
                    teacher_tail_logmass: torch.Tensor, k: int, with_rank: bool = True):
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

    A position whose log-probs and tail are all -inf (q = 0; how ``TeacherCache.batch``
    pads) gives kl = rank = 0 and exactly zero gradient, whatever its ids. Both terms are
    computed in fp32 (float64 for float64 logits) from a logsumexp; gradients reach
    the student logits only, and backward recomputes the student softmax instead
    of keeping dense tensors.
    """
    size = teacher_ids.size(-1)
    if with_rank and not 1 <= k <= size:
        raise ValueError(f"k must be in 1..{size} (the cached top-K), got {k}")
    shape, vocab = student_logits.shape[:-1], student_logits.size(-1)
    kl, rank = _CachedKDTerms.apply(
        student_logits.reshape(-1, vocab), teacher_ids.reshape(-1, size).long(),
        teacher_lprobs.detach().reshape(-1, size), teacher_tail_logmass.detach().reshape(-1), k, with_rank,
    )
    return kl.view(shape), rank.view(shape)


class _CachedKDTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, ids, lq, lq_tail, k, with_rank):
        dtype = _compute_dtype(s)
        s32, lq, lq_tail = s.to(dtype), lq.to(dtype), lq_tail.to(dtype)
        q, q_tail = lq.exp(), lq_tail.exp()
        lse = torch.logsumexp(s32, dim=-1, keepdim=True)
        # log p_tail as a logsumexp over the uncached logits: 1 - sum p cancels when the cache holds nearly all.
        lse_out = torch.logsumexp(s32.scatter(-1, ids, float("-inf")), dim=-1)
        zero = torch.zeros((), dtype=dtype, device=s.device)
        kl = torch.where(q > 0, q * (lq - s32.gather(-1, ids) + lse), zero).sum(dim=-1)
        kl = kl + torch.where(q_tail > 0, q_tail * (lq_tail - lse_out + lse.squeeze(-1)), zero)
        ctx.dtype, ctx.with_rank = dtype, with_rank
        if not with_rank:
            ctx.save_for_backward(s, ids, q, q_tail, lse_out)
            return kl, torch.zeros_like(kl)
        a, q_a = ids[:, :k], q[:, :k]
        b = s32.topk(k, dim=-1).indices
        q_b = torch.where(b.unsqueeze(-1) == ids.unsqueeze(-2), q.unsqueeze(-2), zero).amax(dim=-1)
        with torch.enable_grad():
            p_a = (s32.gather(-1, a) - lse).exp().requires_grad_()
            p_b = (s32.gather(-1, b) - lse).exp().requires_grad_()
            # No teacher mass, no ranking: R_top1 on repeated padding ids is 0 only up to rounding in backward.
            rank = torch.where(q[:, 0] > 0, _ranking_from_topk(p_a, p_b, q_a, q_b), zero)
            # Positions are independent, so the gradient of the sum holds each position's own.
            grad_p_a, grad_p_b = torch.autograd.grad(rank.sum(), (p_a, p_b))
        ctx.save_for_backward(s, ids, q, q_tail, lse_out, a, b, grad_p_a * p_a.detach(), grad_p_b * p_b.detach())
        return kl, rank.detach()

    @staticmethod
    def backward(ctx, grad_kl, grad_rank):
        s, ids, q, q_tail, lse_out = ctx.saved_tensors[:5]
        s32 = s.to(ctx.dtype)
        g_kl = grad_kl.unsqueeze(-1)
        # dKL/ds_v = Q p_v - sum_i q_i [v = a_i] - q_tail [v uncached] p_v / p_tail, Q = sum_i q_i + q_tail.
        total = (q.sum(-1, keepdim=True) + q_tail.unsqueeze(-1)) * g_kl
        if ctx.with_rank:
            a, b, gp_a, gp_b = ctx.saved_tensors[5:]
            gp_a, gp_b = gp_a * grad_rank.unsqueeze(-1), gp_b * grad_rank.unsqueeze(-1)
            # dR/ds_v = sum_i g_i p_i (delta_iv - p_v), over the gathered ids i.
            total = total - (gp_a.sum(-1) + gp_b.sum(-1)).unsqueeze(-1)
        grad = torch.softmax(s32, dim=-1).mul_(total)
        # p_v / p_tail over the uncached tokens; the clamp keeps it 0, not NaN, when every token is cached.
        uncached = s32.scatter(-1, ids, float("-inf"))
        grad.sub_(uncached.sub_(lse_out.clamp(min=torch.finfo(ctx.dtype).min).unsqueeze(-1)).exp_()
                  .mul_((q_tail * grad_kl).unsqueeze(-1)))
        grad.scatter_add_(-1, ids, -q * g_kl)
        if ctx.with_rank:
            grad.scatter_add_(-1, a, gp_a).scatter_add_(-1, b, gp_b)
        return grad.to(s.dtype), None, None, None, None, None
