"""Properties of the loss functions over random shapes, vocabularies, k and temperatures (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiekd import hierarchical_ranking_loss, kl_divergence, tie_kd_terms


@st.composite
def logits_pair(draw):
    """Student and teacher logits (float64) of a random leading shape and vocabulary, and a k <= V."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    vocab = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, dtype=torch.float64, generator=gen) * scale
    t = torch.randn(*shape, vocab, dtype=torch.float64, generator=gen) * scale
    return s, t, draw(st.integers(1, vocab))


PROPERTY = settings(max_examples=60, deadline=None)


@PROPERTY
@given(logits_pair())
def test_kl_is_nonnegative_and_zero_for_the_same_distribution(pair):
    s, t, _ = pair
    assert (kl_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1)) >= -1e-12).all()
    lp = torch.log_softmax(t, -1)
    assert torch.allclose(kl_divergence(lp, lp), torch.zeros(lp.shape[:-1], dtype=lp.dtype), atol=1e-12)


@PROPERTY
@given(logits_pair())
def test_ranking_is_nonnegative_and_zero_when_the_student_keeps_the_teachers_order(pair):
    s, t, k = pair
    q = torch.softmax(t, -1)
    assert (hierarchical_ranking_loss(torch.softmax(s, -1), q, k) >= 0).all()
    # A sharper copy of the teacher: same order everywhere, so its top-k leads and is ordered.
    assert torch.count_nonzero(hierarchical_ranking_loss(torch.softmax(2 * t, -1), q, k)) == 0


@PROPERTY
@given(logits_pair(), st.floats(-50, 50))
def test_both_terms_ignore_a_constant_added_to_a_positions_logits(pair, shift):
    s, t, k = pair
    kl, rank = tie_kd_terms(s, t, k)
    kl2, rank2 = tie_kd_terms(s + shift, t - shift, k)
    assert torch.allclose(kl, kl2, atol=1e-9) and torch.allclose(rank, rank2, atol=1e-9)


@PROPERTY
@given(logits_pair(), st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_the_fused_path_equals_the_unfused_functions(pair, tau):
    s, t, k = pair
    s = s.clone().requires_grad_()
    kl, rank = tie_kd_terms(s, t, k, tau)
    ref_kl = tau**2 * kl_divergence(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1))
    ref_rank = hierarchical_ranking_loss(torch.softmax(s, -1), torch.softmax(t, -1), k)
    assert torch.allclose(kl, ref_kl, atol=1e-10) and torch.allclose(rank, ref_rank, atol=1e-10)
    got = torch.autograd.grad(kl.sum() + rank.sum(), s)[0]
    want = torch.autograd.grad(ref_kl.sum() + ref_rank.sum(), s)[0]
    assert torch.allclose(got, want, atol=1e-10)
