"""The pure loss functions, against hand-computed values and a literal transcription of the paper's sums."""

import math

import pytest
import torch

from tiekd import cached_kd_terms, hierarchical_ranking_loss, kl_divergence, partial_kd, tie_kd_terms


def literal_ranking(p, q, k, log_space=False, margin=0.0):
    """R_top1 + R_topk for one position, written as the paper's double sum with Python loops.

    ``log_space``: the hinges compare log-probabilities, and each level is the mean of its hinges.
    """
    x = [math.log(v) for v in p] if log_space else p
    a = sorted(range(len(q)), key=lambda v: -q[v])[:k]
    b = sorted(range(len(p)), key=lambda v: -p[v])[:k]
    r_topk = sum(max(0.0, x[bj] - x[ai] + margin) for ai in a for bj in b if q[ai] > q[bj])
    r_top1 = sum(max(0.0, x[ai] - x[a[0]] + margin) for ai in a[1:])
    if log_space:
        return r_top1 / max(k - 1, 1) + r_topk / k**2
    return r_top1 + r_topk


def literal_log_ranking(logits, q, k, margin):
    """The log-space ranking loss of one position from its logits, by Python loops, as a differentiable tensor:
    each level the mean of its hinges, no gradient through the student's top-k."""
    lp = torch.log_softmax(logits, -1)
    p = lp.exp().tolist()
    a = sorted(range(len(q)), key=lambda v: -q[v])[:k]
    b = sorted(range(len(p)), key=lambda v: -p[v])[:k]
    total = logits.new_zeros(())
    for ai in a:
        for bj in b:
            if q[ai] > q[bj]:
                # The student's own top-k are constants: only the teacher's token moves.
                total = total + (lp[bj].detach() - lp[ai] + margin).clamp(min=0)
    total = total / k**2
    for ai in a[1:]:
        total = total + (lp[ai] - lp[a[0]] + margin).clamp(min=0) / (k - 1)
    return total


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_kl_hand_computed():
    p, q = t([0.5, 0.5]), t([0.9, 0.1])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-12)


def test_kl_is_zero_for_equal_distributions_and_finite_where_teacher_has_zeros():
    lp = torch.log_softmax(torch.randn(3, 4, 11, dtype=torch.float64), -1)
    assert torch.allclose(kl_divergence(lp, lp), torch.zeros(3, 4, dtype=torch.float64))
    q = t([0.0, 0.25, 0.75])
    p = t([0.2, 0.3, 0.5])
    value = kl_divergence(p.log(), q.log())
    assert value.item() == pytest.approx(0.25 * math.log(0.25 / 0.3) + 0.75 * math.log(0.75 / 0.5))


def test_ranking_k1_is_the_gap_to_the_student_top1():
    p, q = t([0.6, 0.3, 0.1]), t([0.2, 0.7, 0.1])
    assert hierarchical_ranking_loss(p, q, 1).item() == pytest.approx(0.6 - 0.3)
    assert hierarchical_ranking_loss(q, q, 1).item() == 0


def test_ranking_hand_computed_k2():
    # a = [1, 2], b = [0, 1]; R_topk = (0.5-0.3) + (0.5-0.15) = 0.55; R_top1 = max(0, 0.15-0.3) = 0.
    p, q = t([0.5, 0.3, 0.15, 0.05]), t([0.1, 0.6, 0.25, 0.05])
    assert hierarchical_ranking_loss(p, q, 2).item() == pytest.approx(0.55)


def test_ranking_near_tie_in_teacher_is_ordered_strictly():
    # q(0) beats q(1) by 2e-12: token 0 is the top-1, and the student has them the other way round.
    q = t([0.4 + 1e-12, 0.4 - 1e-12, 0.2])
    p = t([0.3, 0.5, 0.2])
    # R_topk: a_1=0 vs b_1=1 gives 0.2 (b_j = a_i pairs count 0); R_top1: 0.5 - 0.3.
    assert hierarchical_ranking_loss(p, q, 2).item() == pytest.approx(0.4)


def test_ranking_is_zero_when_the_student_orders_like_the_teacher():
    q = torch.softmax(torch.randn(4, 6, 50, dtype=torch.float64) * 3, -1)
    # Same order on every token, different values.
    p = torch.softmax(torch.log(q) * 0.5, -1)
    assert torch.count_nonzero(hierarchical_ranking_loss(p, q, 5)) == 0


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_ranking_equals_the_literal_double_sum(k):
    gen = torch.Generator().manual_seed(k)
    p = torch.softmax(torch.randn(6, 9, dtype=torch.float64, generator=gen) * 2, -1)
    q = torch.softmax(torch.randn(6, 9, dtype=torch.float64, generator=gen) * 2, -1)
    got = hierarchical_ranking_loss(p, q, k)
    expected = [literal_ranking(p[i].tolist(), q[i].tolist(), k) for i in range(6)]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert any(e > 0 for e in expected)


@pytest.mark.parametrize("margin", [0.0, 0.4])
def test_log_space_ranking_equals_the_literal_double_sum_on_log_probabilities(margin):
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(6, 12, dtype=torch.float64, generator=gen) * 2
    p, q = torch.softmax(s, -1), torch.softmax(torch.randn(6, 12, dtype=torch.float64, generator=gen) * 2, -1)
    got = hierarchical_ranking_loss(p, q, 4, "logprob", margin)
    expected = [literal_ranking(p[i].tolist(), q[i].tolist(), 4, log_space=True, margin=margin) for i in range(6)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("tau,k,margin,chunk", [(1.0, 5, 0.0, None), (2.0, 3, 0.7, 5), (1.0, 1, 1.5, 1)])
def test_log_space_tie_kd_and_cached_terms_equal_the_literal_loss_in_value_and_gradient(tau, k, margin, chunk):
    gen = torch.Generator().manual_seed(k)
    s = (torch.randn(2, 4, 23, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    t_ = torch.randn(2, 4, 23, dtype=torch.float64, generator=gen) * 3
    q = torch.softmax(t_, -1)
    want = torch.stack([literal_log_ranking(row, q_row.tolist(), k, margin)
                        for row, q_row in zip(s.reshape(-1, 23), q.reshape(-1, 23))]).view(2, 4)
    w = torch.rand(2, 4, dtype=torch.float64, generator=gen)
    want_grad = torch.autograd.grad((w * want).sum(), s)[0]
    ids, top, tail = _cached_top(torch.log_softmax(t_, -1), k + 2)
    for name, (_, rank) in {
        "tie_kd_terms": tie_kd_terms(s, t_, k, tau, max_rows=chunk, rank_space="logprob", rank_margin=margin),
        "cached_kd_terms": cached_kd_terms(s, ids, top, tail, k, max_rows=chunk, rank_space="logprob",
                                           rank_margin=margin),
    }.items():
        assert torch.allclose(rank, want, rtol=1e-12, atol=1e-12), name
        assert torch.allclose(torch.autograd.grad((w * rank).sum(), s)[0], want_grad, rtol=1e-10, atol=1e-12), name
    assert want.gt(0).all() if margin else want.gt(0).any()


def test_a_flat_student_satisfies_the_papers_ranking_and_the_log_space_one_without_margin_only():
    k, margin, vocab = 4, 0.5, 30
    gen = torch.Generator().manual_seed(9)
    t_ = torch.randn(3, vocab, dtype=torch.float64, generator=gen) * 3
    flat = torch.zeros(3, vocab, dtype=torch.float64, requires_grad=True)
    for space in ("prob", "logprob"):
        _, rank = tie_kd_terms(flat, t_, k, rank_space=space, rank_margin=0.0)
        assert rank.abs().max().item() == 0, space
    _, rank = tie_kd_terms(flat, t_, k, rank_space="logprob", rank_margin=margin)
    # Every hinge of a flat student is exactly the margin: the teacher's top-1 over its k - 1 runners-up (their
    # mean), and each pair (a_i, b_j) whose teacher order is strict (over k^2), b the ids topk picks among ties.
    q = torch.softmax(t_, -1)
    b = flat.detach().topk(k, -1).indices
    for row in range(3):
        a = q[row].topk(k).indices.tolist()
        pairs = sum(q[row, ai] > q[row, bj] for ai in a for bj in b[row].tolist())
        assert rank[row].item() == pytest.approx(margin * (1 + int(pairs) / k**2), rel=1e-12)
    # Its gradient raises the teacher's top-1 above the rest.
    grad = torch.autograd.grad(rank.sum(), flat)[0]
    assert (grad.gather(-1, q.argmax(-1, keepdim=True)) < 0).all()


def test_log_space_terms_on_half_logits_follow_float64():
    gen = torch.Generator().manual_seed(10)
    s64 = torch.randn(4, 6, 500, dtype=torch.float64, generator=gen) * 4
    t64 = torch.randn(4, 6, 500, dtype=torch.float64, generator=gen) * 4
    want = tie_kd_terms(s64, t64, 5, rank_space="logprob", rank_margin=1.0)[1]
    for dtype in (torch.float16, torch.bfloat16):
        s = s64.to(dtype).requires_grad_()
        _, rank = tie_kd_terms(s, t64.to(dtype), 5, rank_space="logprob", rank_margin=1.0)
        assert rank.dtype == torch.float32 and torch.isfinite(rank).all()
        # Half logits are rounded to about 3 significant digits: the hinges of logit gaps follow within that.
        assert torch.allclose(rank.double(), want, rtol=0.02, atol=0.05)
        rank.sum().backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_ranking_rejects_k_outside_the_vocabulary():
    with pytest.raises(ValueError, match="k must be in 1..3"):
        hierarchical_ranking_loss(t([0.2, 0.3, 0.5]), t([0.2, 0.3, 0.5]), 4)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 3, 7, dtype=torch.float64, generator=gen), -1)
    assert torch.autograd.gradcheck(lambda x: kl_divergence(torch.log_softmax(x, -1), teacher), (s,))
    assert torch.autograd.gradcheck(
        lambda x: hierarchical_ranking_loss(torch.softmax(x, -1), teacher.exp(), 3), (s,)
    )


def test_no_gradient_reaches_the_teacher():
    s = torch.randn(4, 10, requires_grad=True)
    teacher_logits = torch.randn(4, 10, requires_grad=True)
    loss = kl_divergence(torch.log_softmax(s, -1), torch.log_softmax(teacher_logits, -1)).sum()
    loss = loss + hierarchical_ranking_loss(torch.softmax(s, -1), torch.softmax(teacher_logits, -1), 3).sum()
    loss.backward()
    assert teacher_logits.grad is None and s.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_finite_fp32_outputs_shaped_like_the_positions(dtype):
    s = torch.randn(2, 5, 300).mul(8).to(dtype)
    q = torch.randn(2, 5, 300).mul(8).to(dtype)
    kl = kl_divergence(torch.log_softmax(s.float(), -1).to(dtype), torch.log_softmax(q.float(), -1).to(dtype))
    rank = hierarchical_ranking_loss(torch.softmax(s.float(), -1).to(dtype), torch.softmax(q.float(), -1).to(dtype), 5)
    for value in (kl, rank):
        assert value.dtype == torch.float32 and value.shape == (2, 5)
        assert torch.isfinite(value).all()


# The knowledge-removal targets, on a hand-made teacher q = [0.6, 0.3, 0.1] (a_1 = 0).
Q = [0.6, 0.3, 0.1]
P = [0.2, 0.5, 0.3]


def test_partial_kd_full_is_the_kl():
    p, q = t(P), t(Q)
    assert partial_kd(p.log(), q.log(), torch.tensor(1), "full").item() == pytest.approx(
        kl_divergence(p.log(), q.log()).item()
    )


def test_partial_kd_top1_is_the_weighted_hard_label():
    assert partial_kd(t(P).log(), t(Q).log(), torch.tensor(1), "top1").item() == pytest.approx(-0.6 * math.log(0.2))


def test_partial_kd_topk_is_unnormalised():
    expected = -(0.6 * math.log(0.2) + 0.3 * math.log(0.5))
    assert partial_kd(t(P).log(), t(Q).log(), torch.tensor(2), "topk", k=2).item() == pytest.approx(expected)


def test_partial_kd_no_top1_moves_the_top1_mass_to_gold():
    # y = 2 != a_1: q~ = [0, 0.3, 0.7].
    expected = 0.3 * math.log(0.3 / 0.5) + 0.7 * math.log(0.7 / 0.3)
    assert partial_kd(t(P).log(), t(Q).log(), torch.tensor(2), "no-top1").item() == pytest.approx(expected)
    # y = a_1: q~ = q, the plain KL.
    assert partial_kd(t(P).log(), t(Q).log(), torch.tensor(0), "no-top1").item() == pytest.approx(
        kl_divergence(t(P).log(), t(Q).log()).item()
    )


def test_partial_kd_batched_matches_per_position():
    s = torch.log_softmax(torch.randn(3, 4, 9, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(3, 4, 9, dtype=torch.float64), -1)
    y = torch.randint(0, 9, (3, 4))
    for mode in ("full", "top1", "no-top1", "topk"):
        batched = partial_kd(s, q, y, mode, k=3)
        single = torch.stack([partial_kd(s[i, j], q[i, j], y[i, j], mode, k=3)
                              for i in range(3) for j in range(4)]).view(3, 4)
        assert torch.allclose(batched, single), mode


@pytest.mark.parametrize("tau,k,with_rank", [(1.0, 5, True), (2.0, 3, True), (1.0, 1, True), (0.5, 4, False)])
def test_tie_kd_terms_equal_the_unfused_functions_in_value_and_gradient(tau, k, with_rank):
    gen = torch.Generator().manual_seed(int(tau * 10) + k)
    s = (torch.randn(3, 4, 37, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    t_ = torch.randn(3, 4, 37, dtype=torch.float64, generator=gen) * 3
    kl, rank = tie_kd_terms(s, t_, k, tau, with_rank)
    ref_kl = tau**2 * kl_divergence(torch.log_softmax(s / tau, -1), torch.log_softmax(t_ / tau, -1))
    ref_rank = (hierarchical_ranking_loss(torch.softmax(s, -1), torch.softmax(t_, -1), k) if with_rank
                else torch.zeros_like(ref_kl))
    assert torch.allclose(kl, ref_kl, atol=1e-12) and torch.allclose(rank, ref_rank, atol=1e-12)
    w1, w2 = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    got = torch.autograd.grad((w1 * kl + w2 * rank).sum(), s)[0]
    want = torch.autograd.grad((w1 * ref_kl + w2 * ref_rank).sum(), s)[0]
    assert torch.allclose(got, want, atol=1e-12)
    small_t = t_[:1, :2]
    small_s = s[:1, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: tie_kd_terms(x, small_t, k, tau, with_rank), (small_s,))


def test_tie_kd_terms_on_half_logits_are_finite_fp32():
    s = (torch.randn(4, 6, 500) * 20).half().requires_grad_()
    kl, rank = tie_kd_terms(s, (torch.randn(4, 6, 500) * 20).half(), 5)
    assert kl.dtype == rank.dtype == torch.float32 and torch.isfinite(kl).all() and torch.isfinite(rank).all()
    (kl.sum() + rank.sum()).backward()
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all()


def _cached_top(teacher_lprobs, k):
    top, ids = teacher_lprobs.topk(k, -1)
    return ids, top, teacher_lprobs.scatter(-1, ids, -math.inf).logsumexp(-1)


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_kl_equals_the_bucket_kl_when_the_student_tail_is_tiny_or_not(dtype, normalized):
    gen = torch.Generator().manual_seed(4)
    ids, top, tail = _cached_top(torch.log_softmax(torch.randn(6, 40, dtype=torch.float64, generator=gen) * 2, -1), 5)
    s = torch.randn(6, 40, dtype=torch.float64, generator=gen)
    # Rows 0-2 put nearly all their mass on the cached tokens: p_tail ~ 1e-6, far below fp32's 1 - sum resolution.
    s[:3] = s[:3].scatter(-1, ids[:3], 15.0)
    s.requires_grad_()
    p = torch.softmax(s, -1)
    p_tail = p.scatter(-1, ids, 0.0).sum(-1)
    assert p_tail[:3].max() < 1e-5 and p_tail[3:].min() > 0.1
    want = (top.exp() * (top - p.gather(-1, ids).log())).sum(-1) + tail.exp() * (tail - p_tail.log())
    x = s.to(dtype)
    kl, _ = cached_kd_terms(torch.log_softmax(x, -1) if normalized else x, ids, top.to(dtype), tail.to(dtype), 5,
                            with_rank=False, normalized=normalized)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert torch.allclose(kl.double(), want, **tol)
    w = torch.rand(6, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((w.to(dtype) * kl).sum(), s)[0]
    assert torch.allclose(got, torch.autograd.grad((w * want).sum(), s)[0], **tol)


def test_cached_terms_from_log_probs_equal_those_from_logits_with_the_ranking_loss():
    gen = torch.Generator().manual_seed(5)
    ids, top, tail = _cached_top(torch.log_softmax(torch.randn(3, 4, 30, dtype=torch.float64, generator=gen), -1), 6)
    s = (torch.randn(3, 4, 30, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    from_logits = cached_kd_terms(s, ids, top, tail, 4)
    from_lprobs = cached_kd_terms(torch.log_softmax(s, -1), ids, top, tail, 4, normalized=True)
    w = torch.rand(2, 3, 4, dtype=torch.float64, generator=gen)
    for a, b in zip(from_logits, from_lprobs):
        assert torch.allclose(a, b, atol=1e-12)
    grads = [torch.autograd.grad((w[0] * kl + w[1] * rank).sum(), s)[0] for kl, rank in (from_logits, from_lprobs)]
    assert torch.allclose(*grads, atol=1e-12) and from_logits[1].gt(0).any()
