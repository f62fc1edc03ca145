"""FeatureLoss against the loss written densely from logits: value and every gradient, over random settings."""

import math
import random

import pytest
import torch

from tiekd import FeatureLoss, hierarchical_ranking_loss, kl_divergence


def dense_step_loss(features, weight, teacher_features, teacher_weight, target, mask, *, alpha, eps, k, tau, lam,
                    space="prob", margin=0.0, with_ce=True, teacher_precision=None):
    """(1 - alpha) LS-CE(pass 1) + alpha / N sum_n (tau^2 KL_n + lam Rank_n), from whole logits, by the book.

    ``teacher_precision``: the dtype the teacher's logits are rounded to, as a half-precision teacher gives them.
    """
    n_passes, total = len(features), 0
    for n, (h, th) in enumerate(zip(features, teacher_features)):
        s, t = h @ weight.T, th @ teacher_weight.T
        if teacher_precision is not None:
            t = t.to(teacher_precision).to(s.dtype)
        kl = tau**2 * kl_divergence(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1))
        rank = (hierarchical_ranking_loss(torch.softmax(s, -1), torch.softmax(t, -1), k, space, margin) if lam
                else 0 * kl)
        total = total + alpha / n_passes * ((kl + lam * rank) * mask).sum()
        if n == 0 and with_ce:
            lprobs = torch.log_softmax(s, -1)
            vocab = s.size(-1)
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            eps_i = eps / (vocab - 1)
            ce = (1 - eps - eps_i) * nll - eps_i * lprobs.sum(-1)
            total = total + (1 - alpha) * (ce * mask).sum()
    return total


def feature_step_loss(features, weight, teacher_features, teacher_weight, target, mask, *, alpha, eps, k, tau, lam,
                      chunk, space="prob", margin=0.0, with_ce=True):
    step = FeatureLoss(weight, ce_weight=(1 - alpha) if with_ce else 0.0, kd_weight=alpha / len(features),
                       label_smoothing=eps, k=k, temperature=tau, rank_weight=lam, pad=1, max_rows=chunk,
                       rank_space=space, rank_margin=margin)
    stats = [step.add_pass(h, th, teacher_weight, target, mask, with_ce=with_ce and n == 0)
             for n, (h, th) in enumerate(zip(features, teacher_features))]
    value = sum(alpha / len(stats) * (p.kl + lam * p.rank) for p in stats)
    if with_ce:
        value = value + (1 - alpha) * stats[0].ce
    return step.loss(value), stats, step


def random_case(seed, dtype=torch.float32):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, length, width, teacher_width = rng.randint(1, 4), rng.randint(1, 9), rng.randint(3, 20), rng.randint(3, 20)
    vocab = rng.randint(8, 70)
    passes = rng.randint(1, 3)
    settings = dict(alpha=rng.uniform(0.05, 0.95), eps=rng.choice([0.0, 0.1, 0.25]), k=rng.randint(1, 8),
                    tau=rng.choice([1.0, 0.5, 2.0, 3.0]), lam=rng.choice([0.0, 0.7, 2.5]),
                    # Odd seeds rank in log space, with a margin that shows.
                    space=("prob", "logprob")[seed % 2], margin=rng.choice([0.0, 0.3, 1.5]) * (seed % 2))
    chunk = rng.choice([1, 2, 5, 16, None])
    weight = (torch.randn(vocab, width, generator=gen) * 2).to(dtype).requires_grad_()
    teacher_weight = (torch.randn(vocab, teacher_width, generator=gen) * 2).to(dtype)
    features = [torch.randn(batch, length, width, generator=gen).to(dtype).requires_grad_() for _ in range(passes)]
    teacher_features = [torch.randn(batch, length, teacher_width, generator=gen).to(dtype) for _ in range(passes)]
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3  # padding
    return (features, weight, teacher_features, teacher_weight, target, mask), settings, chunk


@pytest.mark.parametrize("seed", range(12))
def test_value_and_gradients_equal_the_dense_loss(seed):
    inputs, settings, chunk = random_case(seed)
    features, weight = inputs[0], inputs[1]
    want = dense_step_loss(*inputs, **settings)
    want_grads = torch.autograd.grad(want, [weight, *features])
    got, stats, _ = feature_step_loss(*inputs, **settings, chunk=chunk)
    got_grads = torch.autograd.grad(got, [weight, *features])
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    scale = max(g.abs().max() for g in want_grads)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * scale)
    mask = inputs[5]
    # The student's entropy on pass 1, the one the training log shows.
    p = torch.softmax((features[0] @ weight.T).double(), -1)
    assert stats[0].entropy.item() == pytest.approx(-(p * p.log()).sum(-1)[mask].sum().item(), rel=1e-5)
    assert all(pass_stats.entropy == 0 for pass_stats in stats[1:])


def test_float64_agrees_to_rounding_and_chunks_do_not_matter():
    inputs, settings, _ = random_case(3, torch.float64)
    want = dense_step_loss(*inputs, **settings)
    want_grads = torch.autograd.grad(want, [inputs[1], *inputs[0]])
    for chunk in (1, 3, None):
        got, _, _ = feature_step_loss(*inputs, **settings, chunk=chunk)
        for g, w in zip(torch.autograd.grad(got, [inputs[1], *inputs[0]]), want_grads):
            assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_the_incoming_gradient_scales_every_stored_gradient_like_a_loss_scale():
    inputs, settings, chunk = random_case(5)
    got, _, _ = feature_step_loss(*inputs, **settings, chunk=chunk)
    plain = torch.autograd.grad(got, [inputs[1]], retain_graph=True)[0]
    scaled = torch.autograd.grad(got * 1024.0, [inputs[1]])[0]
    assert torch.allclose(scaled, 1024 * plain, rtol=1e-6)


def test_source_only_passes_have_no_ce():
    inputs, settings, chunk = random_case(7)
    want = dense_step_loss(*inputs, **settings, with_ce=False)
    got, stats, _ = feature_step_loss(*inputs, **settings, chunk=chunk, with_ce=False)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and stats[0].ce == 0
    for g, w in zip(torch.autograd.grad(got, [inputs[1]]), torch.autograd.grad(want, [inputs[1]])):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max())


def test_ce_alone_without_a_teacher_is_fairseqs_label_smoothed_ce():
    inputs, settings, _ = random_case(9)
    features, weight, _, _, target, mask = inputs
    step = FeatureLoss(weight, ce_weight=1.0, kd_weight=0.0, label_smoothing=0.1, k=1, temperature=1.0,
                       rank_weight=0.0, pad=1, max_rows=2)
    stats = step.add_pass(features[0], None, None, target, mask, with_ce=True)
    got = step.loss(stats.ce)
    want = dense_step_loss([features[0]], weight, [features[0]], weight, target, mask, alpha=0.0, eps=0.1, k=1,
                           tau=1.0, lam=0.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and stats.kl == 0
    assert torch.allclose(torch.autograd.grad(got, weight)[0], torch.autograd.grad(want, weight)[0], rtol=1e-5,
                          atol=1e-6)


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_a_non_finite_teacher_leaves_the_ce_of_pass_1_alone(bad_pass):
    inputs, settings, _ = random_case(11)
    features, weight, teacher_features, teacher_weight, target, mask = inputs
    features = [features[0], features[0].detach().clone().requires_grad_()]
    clean = teacher_features[0]
    teacher_features = [clean.clone(), clean.clone()]
    teacher_features[bad_pass][0, 0, 0] = math.nan
    got, stats, step = feature_step_loss(features, weight, teacher_features, teacher_weight, target, mask,
                                         **settings, chunk=2)
    assert step.kd_dropped and stats[bad_pass].nonfinite > 0
    ce_only = dense_step_loss(features[:1], weight, [clean], teacher_weight, target, mask,
                              **{**settings, "alpha": 0.0})
    grads = torch.autograd.grad(got, [weight, *features])
    want = torch.autograd.grad((1 - settings["alpha"]) * ce_only, [weight, features[0]])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.allclose(grads[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[1], want[1], rtol=1e-5, atol=1e-6)
    assert grads[2].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [13, 9])  # 9: the ranking loss in log space, margin 1.5
def test_half_precision_inputs_compute_in_fp32_and_return_their_dtype(dtype, seed):
    inputs, settings, chunk = random_case(seed, dtype)
    got, _, _ = feature_step_loss(*inputs, **settings, chunk=chunk)
    grads = torch.autograd.grad(got, [inputs[1], *inputs[0]])
    assert all(g.dtype == dtype for g in grads)
    as_fp32 = [[x.detach().float().requires_grad_() for x in inputs[0]], inputs[1].detach().float().requires_grad_(),
               [x.float() for x in inputs[2]], inputs[3].float(), inputs[4], inputs[5]]
    want = dense_step_loss(*as_fp32, **settings, teacher_precision=dtype)
    want_grads = torch.autograd.grad(want, [as_fp32[1], *as_fp32[0]])
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    scale = max(g.abs().max() for g in want_grads)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g.float(), w, rtol=1e-2, atol=1e-2 * scale)
