"""What every KD criterion shares: its flags, what it needs from the task, the pass loop, logging and metrics.

On a batch with gold target y (positions where y != pad):

    L = (1 - alpha) * LS-CE(gold prefix)
        + alpha * (1/N) * sum_{n=1..N} sum_t [ KL_t^(n) + lambda * Rank_t^(n) ]

Pass 1 decodes the gold prefix; pass n >= 2 decodes [first column of the gold
prefix, the student's pass n-1 argmax shifted right], with the teacher decoding
the same prefix. Each encoder runs once per step. A source-only batch has the KD
part alone, on a prefix written by greedy decoding.
"""

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from fairseq import utils
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from torch.utils.checkpoint import checkpoint

from tiekd import (
    FeatureLoss,
    agreement_counts,
    cached_kd_terms,
    entropy_sum,
    max_rows_for_budget,
    next_predictions,
    prefix_and_target,
    row_chunks,
    student_prefix,
)

from ..greedy import greedy_decode

logger = logging.getLogger(__name__)
KD_PATHS = ("features", "logits")


@dataclass
class KDConfig(LabelSmoothedCrossEntropyCriterionConfig):
    """Flags every KD criterion has."""

    kd_alpha: float = field(
        default=0.5, metadata={"help": "weight alpha of the KD term; the label-smoothed CE gets 1 - alpha"}
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature tau of the KL term only (both sides softened, KL scaled by tau^2)"},
    )
    kd_path: ChoiceEnum(KD_PATHS) = field(
        default="features",
        metadata={"help": "features: CE and KD terms from the decoder features, --kd-chunk-size positions at a "
                          "time, no logits for the whole batch; logits: from the whole batch's logits (the "
                          "reference path; --kd-memory-budget chunks its terms)"},
    )
    kd_chunk_size: int = field(
        default=1024, metadata={"help": "positions per chunk of --kd-path features"}
    )
    kd_keep_activations: bool = field(
        default=False,
        metadata={"help": "--kd-path features: decoder passes 2..N keep their activations for backward (faster, "
                          "more memory) instead of recomputing them there"},
    )
    kd_memory_budget: int = field(
        default=2048,
        metadata={"help": "--kd-path logits: MiB for the KD terms' dense fp32 temporaries (positions x "
                          "vocabulary); a batch that needs more is computed over chunks of positions, with the "
                          "same result; 0: never chunk"},
    )
    kd_max_skipped_frac: float = field(
        default=0.2,
        metadata={"help": "stop training when the teacher's output was not finite (its KD term skipped) on more "
                          "than this fraction of the last --kd-skipped-window training batches; 1: never stop"},
    )
    kd_skipped_window: int = field(
        default=100, metadata={"help": "how many recent training batches --kd-max-skipped-frac looks at"}
    )


@dataclass(frozen=True)
class TeacherUse:
    """What a KD criterion needs from the task's teacher, declared once.

    passes: decoder passes per step (the teacher decodes each one).
    cache_topk: the K a ``--teacher-cache`` must hold to serve pass 1; None when a cache cannot serve it.
    learns_from_source_only: whether source-only batches (no gold target) give it anything to learn.
    """

    passes: int
    cache_topk: Optional[int]
    learns_from_source_only: bool


class KDPasses(NamedTuple):
    """The result of a step's N passes."""

    loss: torch.Tensor  # (1 - alpha) * CE (when asked for) + alpha * (kd + lambda * rank); CE alone if not finite
    ce: Optional[torch.Tensor]  # label-smoothed CE of pass 1 (detached), when asked for
    nll: Optional[torch.Tensor]  # its NLL part
    kd: torch.Tensor  # KL summed over KD positions, averaged over passes (detached)
    rank: torch.Tensor  # ranking loss, the same way
    agreement: dict  # pass 1's agreement_counts and the student's entropy summed over its KD positions
    nonfinite: int  # positions of any pass, padding included, whose terms are not finite


_BASE_KEYS = ("loss", "nll_loss", "ntokens", "nsentences", "sample_size")


class KDCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed CE plus ``kd_terms`` over N passes; subclasses give the terms and the constants.

    Args (beyond fairseq's): alpha, temperature, path, chunk size, keep activations, memory budget (MiB) as in
    ``KDConfig``;
    topk (k of the ranking loss or of a partial target), iterations (N), rank_weight (lambda), rank_space and
    rank_margin (the ranking loss's space and hinge margin).
    """

    name = "kd"
    # kd_terms works from logits; a criterion whose terms need the student's log-probabilities sets this.
    kd_needs_lprobs = False

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy, *, alpha,
                 temperature, path, chunk_size, keep_activations, memory_budget, max_skipped_frac, skipped_window,
                 topk, iterations, rank_weight, rank_space="prob", rank_margin=0.0):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.require_flag(hasattr(task, "teacher"), "needs --task translation_kd, which provides the teacher")
        self.require_flag(0 <= alpha <= 1, f"--kd-alpha must be in [0, 1], got {alpha}")
        self.require_flag(topk >= 1, f"--kd-topk must be >= 1, got {topk}")
        self.require_flag(temperature > 0, f"--kd-temperature must be > 0, got {temperature}")
        self.require_flag(memory_budget >= 0, f"--kd-memory-budget must be >= 0 (MiB), got {memory_budget}")
        self.require_flag(chunk_size >= 1, f"--kd-chunk-size must be >= 1, got {chunk_size}")
        self.require_flag(0 <= max_skipped_frac <= 1,
                          f"--kd-max-skipped-frac must be in [0, 1], got {max_skipped_frac}")
        self.require_flag(skipped_window >= 1, f"--kd-skipped-window must be >= 1, got {skipped_window}")
        self.alpha = alpha
        self.topk = topk
        self.iterations = iterations
        self.rank_weight = rank_weight
        self.rank_space, self.rank_margin = str(rank_space), rank_margin
        self.temperature = temperature
        self.path, self.chunk_size, self.keep_activations = str(path), chunk_size, keep_activations
        self.memory_budget = memory_budget * 2**20
        self.max_skipped_frac = max_skipped_frac
        self._recent_skips = deque(maxlen=skipped_window)  # 1 per training batch whose KD term was skipped
        self._chunking_logged = self._skip_logged = False

    def require_flag(self, ok, message):
        """Stop before training with one line naming the flag."""
        if not ok:
            raise SystemExit(f"{self.name}: error: {message}")

    @property
    def teacher_use(self) -> TeacherUse:
        # A cache holds temperature-1 top-K log-probs: the full KL at tau 1, and the ranking loss's k of them.
        cacheable = self.temperature == 1 and not self.kd_needs_lprobs
        return TeacherUse(
            passes=self.iterations,
            cache_topk=(self.topk if self.rank_weight else 1) if cacheable else None,
            learns_from_source_only=self.alpha > 0,
        )

    def kd_terms(self, student_logits, student_lprobs, teacher_logits, target):
        """Per-position (KL, ranking) of one pass: each (B, T).

        Args:
            student_logits, teacher_logits: (B, T, V).
            student_lprobs: (B, T, V) on pass 1 when ``kd_needs_lprobs``, else None.
            target: (B, T) gold ids (or the greedy prefix's targets on a source-only batch).
        """
        raise NotImplementedError

    def forward(self, model, sample, reduce=True):
        # Validation (and alpha = 0) is plain label-smoothed CE, comparable with a CE run.
        if not model.training or self.alpha == 0:
            return super().forward(model, sample, reduce=reduce)
        teacher = self.task.teacher  # None when a teacher cache serves the only pass
        if teacher is not None:
            teacher.follow(next(model.parameters()))
        if sample.get("mono"):
            return self._mono_forward(model, sample, teacher)
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        mask[:, : self.ignore_prefix_size] = False
        cached = None
        if self.task.teacher_cache is not None:
            cached = [t.to(target.device) for t in self.task.teacher_cache.batch(sample["id"], target.size(1),
                                                                                    self.padding_idx)]
        passes = self._kd_passes(model, teacher, sample["net_input"], target, mask, with_ce=True, cached=cached)
        self._check_teacher_health(passes.nonfinite)
        if passes.nonfinite:
            kd_logs = self._skipped(passes.nonfinite)
        else:
            kd_logs = dict(kd=passes.kd, rank=passes.rank, **passes.agreement)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        return passes.loss, sample_size, self._logging_output(
            loss=passes.loss.data, nll_loss=passes.nll, ntokens=sample["ntokens"],
            nsentences=sample["target"].size(0), sample_size=sample_size, **kd_logs,
        )

    def _check_teacher_health(self, nonfinite):
        """Stop in one line once too many of the recent training batches had a non-finite teacher."""
        window = self._recent_skips
        window.append(int(nonfinite > 0))
        skipped = sum(window)
        if len(window) == window.maxlen and skipped > self.max_skipped_frac * window.maxlen:
            raise SystemExit(
                f"{self.name}: error: the teacher's output was not finite on {skipped} of the last {window.maxlen} "
                f"training batches, more than --kd-max-skipped-frac {self.max_skipped_frac}: stopping; check the "
                "teacher (a broken checkpoint, or half precision overflowing)"
            )

    def _skipped(self, nonfinite):
        """Logging values of a batch whose KD term was dropped for a non-finite teacher output."""
        if not self._skip_logged:
            logger.warning("%s: the teacher's output is not finite at %d positions of a batch: its KD term is "
                           "skipped (CE only); skipped batches are counted as kd_skipped", self.name, nonfinite)
            self._skip_logged = True
        return {"kd_skipped": 1}

    def _mono_forward(self, model, sample, teacher):
        """A source-only batch: the prefix writer decodes greedily, then KD alone (there is no gold, no CE).

        The loss is normalised like a parallel batch's: its sample size is the number of
        generated tokens, EOS included (the sentences with --sentence-avg), and its KD
        positions leave out the first --ignore-prefix-size of them.
        """
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        eos = self.task.tgt_dict.eos()
        cfg = self.task.cfg
        writer = teacher.model if cfg.mono_prefix == "teacher" else model
        was_training = writer.training
        writer.eval()
        try:
            hyps = greedy_decode(writer, src_tokens, src_lengths, cfg.mono_max_len_a, cfg.mono_max_len_b,
                                 eos=eos, pad=self.padding_idx)
        finally:
            writer.train(was_training)
        prev, target = prefix_and_target(hyps, eos=eos, pad=self.padding_idx)
        generated = target.ne(self.padding_idx)
        mask = generated.clone()
        mask[:, : self.ignore_prefix_size] = False
        net_input = {"src_tokens": src_tokens, "src_lengths": src_lengths, "prev_output_tokens": prev}
        passes = self._kd_passes(model, teacher, net_input, target, mask, with_ce=False)
        self._check_teacher_health(passes.nonfinite)
        if passes.nonfinite:
            # Nothing to learn from this batch: a zero loss (zero gradients) that weighs nothing in the update.
            sample_size, kd_logs = 0, self._skipped(passes.nonfinite)
        else:
            sample_size = src_tokens.size(0) if self.sentence_avg else int(generated.sum())
            kd_logs = dict(kd_mono=passes.kd, rank_mono=passes.rank, mono_tokens=mask.sum(),
                           mono_sentences=src_tokens.size(0))
        loss = passes.loss
        # ntokens 0: nll_loss and ppl stay about gold tokens.
        return loss, sample_size, self._logging_output(
            loss=loss.data, nll_loss=0.0, ntokens=0, nsentences=src_tokens.size(0), sample_size=sample_size,
            **kd_logs,
        )

    def _logging_output(self, **values):
        """The same keys, of the same types, for every training batch of a run.

        fairseq sums logging outputs across ranks and accumulated batches by the keys
        of the first one and reduces tensors and numbers in separate buffers, so a
        parallel and a source-only batch must agree on both: KD values are tensors on
        the loss's device, zeros where a kind of batch has none.
        """
        keys = ["kd", "kd_tokens", "top1_agree", "teacher_gold", "entropy", "kd_skipped"]
        keys += ["rank"] * bool(self.rank_weight)
        if self.task.mono_shards:
            keys += ["kd_mono", "mono_tokens", "mono_sentences"] + ["rank_mono"] * bool(self.rank_weight)
        device = values["loss"].device
        output = {k: values[k] for k in _BASE_KEYS}
        output["nll_loss"] = torch.as_tensor(output["nll_loss"], device=device)
        output.update({k: torch.as_tensor(values.get(k, 0), device=device) for k in keys})
        return output

    def _kd_passes(self, model, teacher, net_input, target, mask, with_ce, cached=None) -> KDPasses:
        """The N passes from ``net_input``'s prefix, and the step's loss.

        Pass 1 is one forward through the (possibly DDP-wrapped) model; its encoder output
        is captured for the later passes, which call the decoder alone. ``cached`` (ids,
        log-probs, tail) replaces the teacher on pass 1; later passes decode new prefixes,
        so they run the teacher. With ``--kd-path features`` (and no cache, and terms from
        logits) the loss is formed from the decoder features chunk by chunk.
        """
        src_lengths = net_input["src_lengths"]
        encoder_outs = []
        hook = model.encoder.register_forward_hook(lambda _m, _i, out: encoder_outs.append(out))
        from_features = self.path == "features" and cached is None and not self.kd_needs_lprobs
        try:
            net_output = model(**net_input, features_only=from_features)
        finally:
            hook.remove()
        teacher_encoder_out = None
        if cached is None or self.iterations > 1:
            teacher_encoder_out = teacher.encode(net_input["src_tokens"], src_lengths)

        def decode(prev):
            def run(tokens):
                return model.decoder(tokens, encoder_out=encoder_outs[0], src_lengths=src_lengths,
                                     features_only=from_features)

            if not from_features or self.keep_activations:
                return run(prev)
            # Only the prefix and the features stay alive; backward runs this pass's decoder again (with
            # the same dropout) inside the step's one backward call.
            return (checkpoint(lambda tokens: run(tokens)[0], prev, use_reentrant=False),)

        passes = self._feature_passes if from_features else self._logit_passes
        return passes(model, teacher, net_input["prev_output_tokens"], net_output, decode, teacher_encoder_out,
                      src_lengths, target, mask, with_ce, cached)

    def _feature_passes(self, model, teacher, first_prev, net_output, decode, teacher_encoder_out, src_lengths,
                        target, mask, with_ce, cached):
        """``_kd_passes`` from the decoder features: no positions x vocabulary tensor for the whole batch."""
        step = FeatureLoss(
            self._output_weight(model.decoder, "student"), ce_weight=(1 - self.alpha) if with_ce else 0.0,
            kd_weight=self.alpha / self.iterations, label_smoothing=self.eps, k=self.topk,
            temperature=self.temperature, rank_weight=self.rank_weight, pad=self.padding_idx,
            max_rows=self.chunk_size, rank_space=self.rank_space, rank_margin=self.rank_margin,
        )
        teacher_weight = self._output_weight(teacher.model.decoder, "teacher")
        prev, stats = first_prev, []
        for n in range(self.iterations):
            if n > 0:
                prev = student_prefix(first_prev, stats[-1].predictions, self.padding_idx)
                net_output = decode(prev)
            teacher_features = teacher.decode_features(prev, teacher_encoder_out, src_lengths)
            stats.append(step.add_pass(net_output[0], teacher_features, teacher_weight, target, mask,
                                       with_ce=with_ce and n == 0))
        first = stats[0]
        kd = sum(p.kl for p in stats) / self.iterations
        rank = sum(p.rank for p in stats) / self.iterations
        ce_part = (1 - self.alpha) * first.ce if with_ce else first.ce * 0
        value = ce_part if step.kd_dropped else ce_part + self.alpha * (kd + self.rank_weight * rank)
        agreement = {"kd_tokens": mask.sum(), "top1_agree": first.top1_agree.round().long(),
                     "teacher_gold": first.teacher_gold.round().long(), "entropy": first.entropy}
        return KDPasses(step.loss(value), first.ce if with_ce else None, first.nll if with_ce else None, kd, rank,
                        agreement, sum(p.nonfinite for p in stats))

    def _output_weight(self, decoder, role):
        """The (V, d) output projection of a decoder, or one line saying why --kd-path features cannot use it."""
        projection = getattr(decoder, "output_projection", None)
        if getattr(decoder, "adaptive_softmax", None) is not None or not isinstance(projection, torch.nn.Linear) \
                or projection.bias is not None:
            raise SystemExit(f"{self.name}: error: --kd-path features needs the {role}'s decoder to end in one "
                             f"output projection without bias (not an adaptive softmax); use --kd-path logits")
        return projection.weight

    def _logit_passes(self, model, teacher, first_prev, net_output, decode, teacher_encoder_out, src_lengths,
                      target, mask, with_ce, cached):
        """``_kd_passes`` from the whole batch's logits: the reference path."""
        prev, lprobs, predictions = first_prev, None, None
        kd_sum = rank_sum = nonfinite = 0
        for n in range(self.iterations):
            if n > 0:
                prev = student_prefix(first_prev, predictions, self.padding_idx)
                net_output = decode(prev)
            student_logits = net_output[0]
            if n == 0 and (with_ce or self.kd_needs_lprobs):
                lprobs = model.get_normalized_probs(net_output, log_probs=True)
            if n == 0 and cached is not None:
                # The CE's log-probs: the cached terms need them at a few tokens only, and share their backward.
                kl, rank = cached_kd_terms(lprobs, *cached, self.topk, self.rank_weight > 0, normalized=True,
                                           max_rows=max_rows_for_budget(lprobs.size(-1), self.memory_budget),
                                           rank_space=self.rank_space, rank_margin=self.rank_margin)
                first = (student_logits, cached[0][..., 0])
            else:
                teacher_logits = teacher.decode(prev, teacher_encoder_out, src_lengths)
                kl, rank = self.kd_terms(student_logits, lprobs if n == 0 else None, teacher_logits, target)
                if n == 0:
                    first = (student_logits, teacher_logits.argmax(dim=-1))
            kd_sum = kd_sum + kl.masked_fill(~mask, 0).sum()
            rank_sum = rank_sum + rank.masked_fill(~mask, 0).sum()
            # Padding positions count too: masked out of the value, their NaNs would still reach the gradient.
            nonfinite = nonfinite + (~torch.isfinite(kl + rank)).sum()
            if n + 1 < self.iterations:
                predictions = next_predictions(student_logits, self.padding_idx)
        kd, rank = kd_sum / self.iterations, rank_sum / self.iterations
        ce = nll = None
        # Without CE, a zero that keeps the student's graph (zero gradients) stands in when KD is dropped.
        loss = first[0].sum() * 0
        if with_ce:
            ce, nll = self._gold_loss(lprobs, target)
            loss = (1 - self.alpha) * ce
        if not nonfinite:
            # Kept out otherwise: its backward would turn the NaNs into NaN gradients (0 * NaN).
            loss = loss + self.alpha * (kd + self.rank_weight * rank)
        agreement = agreement_counts(*first, target, mask)
        agreement["entropy"] = entropy_sum(first[0], mask, max_rows_for_budget(first[0].size(-1), self.memory_budget))
        return KDPasses(loss, None if ce is None else ce.detach(), None if nll is None else nll.detach(),
                        kd.detach(), rank.detach(), agreement, int(nonfinite))

    def max_rows(self, logits):
        """Positions per chunk of the KD terms under --kd-memory-budget (None: all at once); logs the first split."""
        vocab = logits.size(-1)
        rows, max_rows = logits.numel() // vocab, max_rows_for_budget(vocab, self.memory_budget)
        if max_rows is None or rows <= max_rows:
            return None
        if not self._chunking_logged:
            logger.info("%s: the KD terms of %d positions x %d vocabulary exceed --kd-memory-budget %d MiB: "
                        "computed in %d chunks of up to %d positions (logged once)", self.name, rows, vocab,
                        self.memory_budget // 2**20, len(row_chunks(rows, max_rows)), max_rows)
            self._chunking_logged = True
        return max_rows

    def _gold_loss(self, lprobs, target):
        lprobs = lprobs[:, self.ignore_prefix_size :]
        target = target[:, self.ignore_prefix_size :]
        return label_smoothed_nll_loss(
            lprobs.reshape(-1, lprobs.size(-1)), target.reshape(-1), self.eps, ignore_index=self.padding_idx
        )

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        if sum(log.get("ntokens", 0) for log in logging_outputs) > 0:
            super().reduce_metrics(logging_outputs)
        else:
            # Only source-only batches: there is a loss but no gold token for nll_loss.
            loss_sum = utils.item(sum(log.get("loss", 0) for log in logging_outputs))
            sample_size = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))
            if sample_size:  # 0 when every batch was skipped
                metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        # kd, entropy: nats per target token; rank: its hinges' sum per target token; top1_agree, teacher_gold:
        # % of tokens.
        for denominator, keys in (
            ("kd_tokens", (("kd", 1, 4), ("rank", 1, 4), ("top1_agree", 100, 2), ("teacher_gold", 100, 2),
                           ("entropy", 1, 4))),
            ("mono_tokens", (("kd_mono", 1, 4), ("rank_mono", 1, 4))),
        ):
            tokens = utils.item(sum(log.get(denominator, 0) for log in logging_outputs))
            if tokens == 0:
                continue
            for key, scale, digits in keys:
                if any(key in log for log in logging_outputs):
                    total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
                    metrics.log_scalar(key, scale * total / tokens, tokens, round=digits)
        skipped = utils.item(sum(log.get("kd_skipped", 0) for log in logging_outputs))
        if skipped:
            metrics.log_scalar_sum("kd_skipped", skipped)
        mono_sentences = sum(log.get("mono_sentences", 0) for log in logging_outputs)
        if mono_sentences:
            metrics.log_scalar_sum("mono_sents", mono_sentences)
            metrics.log_scalar_sum("mono_toks", utils.item(sum(log.get("mono_tokens", 0) for log in logging_outputs)))
