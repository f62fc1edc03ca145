"""The whole KD step's loss from decoder features, chunk by chunk: no positions x vocabulary tensor for the batch.

Each pass's logits exist for one chunk of positions at a time; the chunk's loss and its
gradient for the features and the output weight are formed there and then, and the
backward of the step only scales the stored gradients (README.md, "The loss from
features").
"""

from typing import NamedTuple

import torch

from .chunking import row_chunks
from .logit_terms import kl_and_rank_forward, kl_and_rank_gradient
from .precision import compute_dtype
from .prefixes import next_predictions


class PassStats(NamedTuple):
    """What one pass measured, all detached: sums over the masked positions, and the next prefix's tokens."""

    ce: torch.Tensor  # label-smoothed CE (0 when the pass has none)
    nll: torch.Tensor  # its NLL part
    kl: torch.Tensor
    rank: torch.Tensor
    top1_agree: torch.Tensor  # positions where the student's top-1 is the teacher's
    teacher_gold: torch.Tensor  # positions where the teacher's top-1 is the gold token
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
        pad: the padding index (never predicted for the next prefix).
        max_rows: positions per chunk.
    """

    def __init__(self, weight, *, ce_weight, kd_weight, label_smoothing, k, temperature, rank_weight, pad,
                 max_rows):
        vocab = weight.size(0)
        if rank_weight and not 1 <= k <= vocab:
            raise ValueError(f"k must be in 1..{vocab} (the vocabulary), got {k}")
        self.weight, self.pad, self.max_rows = weight, pad, max_rows
        self.ce_weight, self.kd_weight, self.rank_weight = ce_weight, kd_weight, rank_weight
        self.eps, self.k, self.tau = label_smoothing, k, float(temperature)
        self.dtype = compute_dtype(weight)
        self.w = weight.detach().to(self.dtype)
        self.grad_weight = torch.zeros_like(self.w)
        self.features, self.grad_features, self.kd_dropped = [], [], False
        self._first = None  # pass 1's inputs, to redo its CE alone if the KD part is dropped

    def add_pass(self, features, teacher_features, teacher_weight, target, mask, with_ce) -> PassStats:
        """Measure one pass and store its gradients.

        Args:
            features: (B, T, d) the student decoder's features (before the output projection).
            teacher_features: (B, T, d') the teacher's; teacher_weight: (V, d') its output projection.
            target: (B, T) gold ids (CE and the teacher-gold count); mask: (B, T) the positions that count.
            with_ce: whether this pass carries the CE (pass 1 of a parallel batch).
        """
        if not self.features:
            self._first = (features, target, mask, with_ce)
        f = features.detach().reshape(-1, features.size(-1))
        tf = teacher_features.detach().reshape(-1, teacher_features.size(-1))
        tw = teacher_weight.detach()
        target, mask = target.reshape(-1), mask.reshape(-1)
        grad = torch.zeros(f.shape, dtype=self.dtype, device=f.device)
        sums = torch.zeros(6, dtype=self.dtype, device=f.device)  # ce, nll, kl, rank, top1_agree, teacher_gold
        predictions = torch.empty_like(target)
        nonfinite = 0
        for r in row_chunks(f.size(0), self.max_rows):
            s = f[r].to(self.dtype) @ self.w.T
            t = (tf[r] @ tw.T).to(self.dtype)
            m = mask[r].to(self.dtype)
            kl, rank, *saved = kl_and_rank_forward(s, t, self.k, self.tau, self.rank_weight > 0)
            nonfinite += int((~torch.isfinite(kl + rank)).sum())
            teacher_top1 = t.argmax(dim=-1)
            agrees = s.gather(-1, teacher_top1.unsqueeze(-1)).squeeze(-1) >= s.amax(dim=-1)
            sums[2:] += torch.stack([(kl * m).sum(), (rank * m).sum(), (agrees * m).sum(),
                                     (teacher_top1.eq(target[r]) * m).sum()])
            predictions[r] = next_predictions(s, self.pad)
            kd = 0 if self.kd_dropped or nonfinite else self.kd_weight
            g = kl_and_rank_gradient(s, t, kd * m, kd * self.rank_weight * m, saved, self.tau) if kd else None
            if with_ce:
                g = self._add_ce(s, target[r], m, sums, g)
            if g is not None:
                grad[r] = g @ self.w
                self.grad_weight.addmm_(g.T, f[r].to(self.dtype))
        self.features.append(features)
        self.grad_features.append(grad)
        if nonfinite and not self.kd_dropped:
            self._drop_kd()
        return PassStats(*sums.unbind(), nonfinite=nonfinite, predictions=predictions.view(features.shape[:-1]))

    def _add_ce(self, s, target, m, sums, g):
        """Add the chunk's label-smoothed CE to ``sums`` and ``ce_weight`` times its gradient to ``g`` (or None)."""
        vocab = s.size(-1)
        lse = torch.logsumexp(s, dim=-1)
        nll = lse - s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        smooth = vocab * lse - s.sum(dim=-1)
        eps_i = self.eps / (vocab - 1)
        sums[0] += (((1 - self.eps - eps_i) * nll + eps_i * smooth) * m).sum()
        sums[1] += (nll * m).sum()
        # d(label-smoothed CE)/ds = softmax(s) - (1 - eps - eps_i) * onehot(target) - eps_i
        w = (self.ce_weight * m).unsqueeze(-1)
        ce_grad = torch.softmax(s, dim=-1).sub_(eps_i).mul_(w)
        ce_grad.scatter_add_(-1, target.unsqueeze(-1), -(1 - self.eps - eps_i) * w)
        return ce_grad if g is None else g.add_(ce_grad)

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
        scratch = torch.zeros(6, dtype=self.dtype, device=f.device)
        for r in row_chunks(f.size(0), self.max_rows):
            s = f[r].to(self.dtype) @ self.w.T
            g = self._add_ce(s, target[r], mask[r].to(self.dtype), scratch, None)
            self.grad_features[0][r] = g @ self.w
            self.grad_weight.addmm_(g.T, f[r].to(self.dtype))

    def loss(self, value) -> torch.Tensor:
        """``value`` (a 0-dim tensor, the loss computed from the stats) as the step's loss, with its gradients."""
        return _StoredGradients.apply(value, self.grad_weight, self.grad_features, self.weight, *self.features)


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
