"""The whole KD step's loss from decoder features, chunk by chunk: no positions x vocabulary tensor for the batch.

Each pass's logits exist for one chunk of positions at a time; the chunk's loss and its
gradient for the features and the output weight are formed there and then, and the
backward of the step only scales the stored gradients (README.md, "The loss from
features").
"""

from typing import NamedTuple

import torch

from .chunking import row_chunks
from .precision import compute_dtype
from .ranking import ranking_from_topk


class PassStats(NamedTuple):
    """What one pass measured, all detached: sums over the masked positions, and the next prefix's tokens."""

    ce: torch.Tensor  # label-smoothed CE (0 when the pass has none)
    nll: torch.Tensor  # its NLL part
    kl: torch.Tensor
    rank: torch.Tensor
    top1_agree: torch.Tensor  # positions where the student's top-1 is the teacher's
    teacher_gold: torch.Tensor  # positions where the teacher's top-1 is the gold token
    entropy: torch.Tensor  # the student's entropy (nats) at the positions with a teacher, pass 1 only (else 0)
    nonfinite: int  # positions, padding included, whose KD terms are not finite
    predictions: torch.Tensor  # (B, T) the student's argmax (runner-up where it is pad)


class FeatureLoss:
    """The step's loss ``ce_weight * CE(pass 1) + kd_weight * sum_n (KL_n + rank_weight * Rank_n)``, from features.

    Call ``add_pass`` once per decoder pass, then ``loss()`` once: a scalar whose backward
    gives the output weight and every pass's features their gradients. A pass whose KD
    terms are not finite drops the KD part of the whole step (the CE stays).

    Args:
        weight: (V, d) the student's output projection (shared embeddings included).
        ce_weight: the label-smoothed CE's weight (1 - alpha; 0 on a source-only batch).
        kd_weight: each pass's KD weight (alpha / N).
        label_smoothing: epsilon of fairseq's label-smoothed CE.
        k, temperature, rank_weight: the ranking loss's k, the KL's tau, lambda (0: no ranking loss).
        rank_space, rank_margin: the ranking loss's space (``tiekd.RANK_SPACES``) and hinge margin.
        pad: the padding index (never predicted for the next prefix).
        max_rows: positions per chunk.
    """

    def __init__(self, weight, *, ce_weight, kd_weight, label_smoothing, k, temperature, rank_weight, pad,
                 max_rows, rank_space="prob", rank_margin=0.0):
        vocab = weight.size(0)
        if rank_weight and not 1 <= k <= vocab:
            raise ValueError(f"k must be in 1..{vocab} (the vocabulary), got {k}")
        self.weight, self.pad, self.max_rows = weight, pad, max_rows
        self.ce_weight, self.kd_weight, self.rank_weight = ce_weight, kd_weight, rank_weight
        self.eps, self.k, self.tau = label_smoothing, k, float(temperature)
        self.rank_space, self.rank_margin = rank_space, float(rank_margin)
        self.dtype = compute_dtype(weight)
        self.w = weight.detach().to(self.dtype)
        self.grad_weight = torch.zeros_like(self.w)
        self.features, self.grad_features, self.kd_dropped = [], [], False
        self._first = None  # pass 1's inputs, to redo its CE alone if the KD part is dropped

    def add_pass(self, features, teacher_features, teacher_weight, target, mask, with_ce) -> PassStats:
        """Measure one pass and store its gradients.

        Args:
            features: (B, T, d) the student decoder's features (before the output projection).
            teacher_features: (B, T, d') the teacher's (None: CE alone); teacher_weight: (V, d') its output
                projection.
            target: (B, T) gold ids (CE and the teacher-gold count); mask: (B, T) the positions that count.
            with_ce: whether this pass carries the CE (pass 1 of a parallel batch).
        """
        first = not self.features
        if first:
            self._first = (features, target, mask, with_ce)
        f = features.detach().reshape(-1, features.size(-1))
        if teacher_features is not None:
            tf, tw = teacher_features.detach().reshape(-1, teacher_features.size(-1)), teacher_weight.detach()
        target, mask = target.reshape(-1), mask.reshape(-1)
        grad = torch.zeros(f.shape, dtype=self.dtype, device=f.device)
        sums = torch.zeros(7, dtype=self.dtype, device=f.device)  # ce, nll, kl, rank, top1_agree, teacher_gold, entropy
        predictions = torch.empty_like(target)
        nonfinite = 0
        for r in row_chunks(f.size(0), self.max_rows):
            s = f[r].to(self.dtype) @ self.w.T
            t = None if teacher_features is None else (tf[r] @ tw.T).to(self.dtype)
            g, chunk_nonfinite, predictions[r] = self._chunk(s, t, target[r], mask[r].to(self.dtype), sums,
                                                             with_ce, not (self.kd_dropped or nonfinite), first)
            nonfinite += chunk_nonfinite
            if g is not None:
                grad[r] = g @ self.w
                self.grad_weight.addmm_(g.T, f[r].to(self.dtype))
        self.features.append(features)
        self.grad_features.append(grad)
        if nonfinite and not self.kd_dropped:
            self._drop_kd()
        return PassStats(*sums.unbind(), nonfinite=nonfinite, predictions=predictions.view(features.shape[:-1]))

    def _chunk(self, s, t, target, m, sums, with_ce, kd_grad, with_entropy=False):
        """One chunk's terms, added to ``sums``, and their weighted gradient for its logits, in few passes.

        Args:
            s, t: (c, V) student and teacher logits in the compute dtype (t None: CE alone).
            target, m: (c) gold ids and the positions that count (0/1 in the compute dtype).
            sums: (7) ce, nll, kl, rank, top1_agree, teacher_gold, entropy, added to.
            with_ce: whether the CE is part of this pass; kd_grad: whether the KD terms may add to the gradient
                (not once the KD part is dropped, nor where they are not finite); with_entropy: whether to measure
                the student's entropy (pass 1: it is what the log shows).

        Returns:
            (dL/ds (c, V) or None when nothing adds to it, non-finite KD positions, next-pass predictions (c)).
        """
        vocab, tau, m = s.size(-1), self.tau, m.unsqueeze(-1)
        with_rank = t is not None and self.rank_weight > 0
        # One top-k of the student serves its maximum, its ranking ids and the next prefix's runner-up rule.
        s_top, b = s.topk(max(self.k if with_rank else 1, 2), dim=-1)
        predictions = torch.where(b[:, 0].eq(self.pad), b[:, 1], b[:, 0])
        p, lse_s = _softmax_and_lse(s, s_top[:, :1])
        w_ce = self.ce_weight * m if with_ce else None
        if with_ce:
            nll = (lse_s - s.gather(-1, target.unsqueeze(-1))).squeeze(-1)
            eps_i = self.eps / (vocab - 1)
            smooth = vocab * lse_s.squeeze(-1) - s.sum(dim=-1)
            sums[:2] += torch.stack([(((1 - self.eps - eps_i) * nll + eps_i * smooth) * m.squeeze(-1)).sum(),
                                     (nll * m.squeeze(-1)).sum()])
        nonfinite, w_kd, q_tau, p_tau = 0, None, None, None
        if t is not None:
            t_top, a = t.topk(self.k if with_rank else 1, dim=-1)
            if tau == 1:
                q, lse_t = _softmax_and_lse(t, t_top[:, :1])
                p_tau, q_tau, lse_s_tau, lse_t_tau = p, q, lse_s, lse_t
            else:
                p_tau, lse_s_tau = _softmax_and_lse(s / tau, s_top[:, :1] / tau)
                q_tau, lse_t_tau = _softmax_and_lse(t / tau, t_top[:, :1] / tau)
                lse_t = torch.logsumexp(t, dim=-1, keepdim=True) if with_rank else None
            # KL(q_tau || p_tau) = sum_v q_tau (t - s) / tau - lse(t / tau) + lse(s / tau), times tau^2
            cross = torch.einsum("cv,cv->c", q_tau, t) - torch.einsum("cv,cv->c", q_tau, s)
            kl = tau * cross + tau**2 * (lse_s_tau - lse_t_tau).squeeze(-1)
            rank = torch.zeros_like(kl)
            if with_rank:
                b = b[:, : self.k]
                with torch.enable_grad():
                    s_a, s_b = s.gather(-1, a).requires_grad_(), s_top[:, : self.k].requires_grad_()
                    rank = ranking_from_topk(s_a - lse_s, s_b - lse_s, (t_top - lse_t).exp(),
                                             (t.gather(-1, b) - lse_t).exp(), self.rank_space, self.rank_margin)
                    # g = dR/ds at the gathered ids, logsumexp held fixed; dR/ds_v = sum_i g_i (delta_iv - p_v).
                    grad_s_a, grad_s_b = torch.autograd.grad(rank.sum(), (s_a, s_b), materialize_grads=True)
                rank = rank.detach()
            nonfinite = int((~torch.isfinite(kl + rank)).sum())
            teacher_top1 = a[:, 0]
            agrees = s.gather(-1, teacher_top1.unsqueeze(-1)).squeeze(-1) >= s_top[:, 0]
            # H(p) = logsumexp(s) - sum_v p_v s_v, while p is still the softmax.
            entropy = lse_s.squeeze(-1) - torch.einsum("cv,cv->c", p, s) if with_entropy else torch.zeros_like(kl)
            sums[2:] += torch.stack([(kl * m.squeeze(-1)).sum(), (rank * m.squeeze(-1)).sum(),
                                     (agrees * m.squeeze(-1)).sum(), (teacher_top1.eq(target) * m.squeeze(-1)).sum(),
                                     (entropy * m.squeeze(-1)).sum()])
            if kd_grad and not nonfinite:
                w_kd = self.kd_weight * m
        if w_ce is None and w_kd is None:
            return None, nonfinite, predictions
        # g = w_ce (p - eps_i - (1 - eps - eps_i) onehot(y)) + w_kd tau (p_tau - q_tau)
        #     + w_kd lambda (scatter(a, g_a) + scatter(b, g_b) - p sum(g)), built in place.
        coef_p = torch.zeros_like(lse_s) if w_ce is None else w_ce.clone()
        rank_parts = None
        if w_kd is not None and with_rank:
            rank_parts = (w_kd * self.rank_weight * grad_s_a, w_kd * self.rank_weight * grad_s_b)
            coef_p -= rank_parts[0].sum(-1, keepdim=True) + rank_parts[1].sum(-1, keepdim=True)
        if w_kd is not None and tau == 1:
            coef_p += w_kd
        g = p.mul_(coef_p)  # p is not needed after this
        if w_kd is not None:
            if tau != 1:
                g.add_(p_tau.mul_(tau * w_kd))
            g.sub_(q_tau.mul_(tau * w_kd))
        if w_ce is not None:
            g.sub_(w_ce * eps_i).scatter_add_(-1, target.unsqueeze(-1), -(1 - self.eps - eps_i) * w_ce)
        if rank_parts is not None:
            g.scatter_add_(-1, a, rank_parts[0]).scatter_add_(-1, b, rank_parts[1])
        return g, nonfinite, predictions

    def _drop_kd(self):
        """Forget every stored gradient and keep pass 1's CE alone: a non-finite KD term would poison them."""
        self.kd_dropped = True
        self.grad_weight.zero_()
        for grad in self.grad_features:
            grad.zero_()
        features, target, mask, with_ce = self._first
        if not with_ce:
            return
        f = features.detach().reshape(-1, features.size(-1))
        target, mask = target.reshape(-1), mask.reshape(-1)
        scratch = torch.zeros(7, dtype=self.dtype, device=f.device)
        for r in row_chunks(f.size(0), self.max_rows):
            s = f[r].to(self.dtype) @ self.w.T
            g, _, _ = self._chunk(s, None, target[r], mask[r].to(self.dtype), scratch, True, False)
            self.grad_features[0][r] = g @ self.w
            self.grad_weight.addmm_(g.T, f[r].to(self.dtype))

    def loss(self, value) -> torch.Tensor:
        """``value`` (a 0-dim tensor, the loss computed from the stats) as the step's loss, with its gradients."""
        return _StoredGradients.apply(value, self.grad_weight, self.grad_features, self.weight, *self.features)


def _softmax_and_lse(x, x_max):
    """(softmax(x), logsumexp(x)) of (c, V) rows from one exponential pass, given each row's maximum (c, 1)."""
    e = (x - x_max).exp_()
    z = e.sum(dim=-1, keepdim=True)
    return e.div_(z), x_max + z.log()


class _StoredGradients(torch.autograd.Function):
    """The identity on a loss value whose gradients for the inputs were formed in forward."""

    @staticmethod
    def forward(ctx, value, grad_weight, grad_features, weight, *features):
        ctx.grads = [grad_weight, *grad_features]
        ctx.inputs = [(weight.dtype, weight.shape), *((f.dtype, f.shape) for f in features)]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        # The scale (fp16 loss scaling included) multiplies in fp32, before the cast to the inputs' dtype.
        scale = grad_output.to(ctx.grads[0].dtype)
        return (None, None, None,
                *((scale * g).to(dtype).view(shape) for g, (dtype, shape) in zip(ctx.grads, ctx.inputs)))
