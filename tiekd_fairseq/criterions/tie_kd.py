"""``tie_kd``: label-smoothed CE plus iterative KD with the hierarchical ranking loss.

On a batch with gold target y (positions where y != pad):

    L = (1 - alpha) * LS-CE(gold prefix)
        + alpha * (1/N) * sum_{n=1..N} sum_t [ KL_t^(n) + lambda * Rank_t^(n) ]

Pass 1 decodes the gold prefix; pass n >= 2 decodes [first column of the gold
prefix, the student's pass n-1 argmax shifted right], with the teacher
decoding the same prefix. Each encoder runs once per step.
"""

from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.logging import metrics

from ..losses import tie_kd_terms


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


@dataclass
class TieKDConfig(KDConfig):
    kd_topk: int = field(
        default=5, metadata={"help": "k of the hierarchical ranking loss (the teacher's top-k tokens)"}
    )
    kd_iterations: int = field(
        default=3,
        metadata={"help": "N decoder passes per step; pass n >= 2 decodes the student's own shifted argmax"},
    )
    rank_weight: float = field(
        default=1.0, metadata={"help": "weight lambda of the ranking loss; 0 gives iterative KD without ranking"}
    )


def student_prefix(gold_prev: torch.Tensor, predictions: torch.Tensor, pad: int) -> torch.Tensor:
    """Decoder input for the next pass: the first gold column, then the predictions shifted right.

    Padding stays where the gold prefix has it, so the decoder masks the same positions.
    """
    shifted = torch.cat([gold_prev[:, :1], predictions[:, :-1]], dim=1)
    return shifted.masked_fill(gold_prev.eq(pad), pad)


@register_criterion("tie_kd", dataclass=TieKDConfig)
class TieKDCriterion(LabelSmoothedCrossEntropyCriterion):
    needs_teacher = True
    name = "tie_kd"

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        kd_alpha,
        kd_topk,
        kd_iterations,
        rank_weight,
        kd_temperature,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.require_flag(hasattr(task, "teacher"), "needs --task translation_kd, which provides the teacher")
        self.require_flag(0 <= kd_alpha <= 1, f"--kd-alpha must be in [0, 1], got {kd_alpha}")
        self.require_flag(kd_topk >= 1, f"--kd-topk must be >= 1, got {kd_topk}")
        self.require_flag(kd_iterations >= 1, f"--kd-iterations must be >= 1, got {kd_iterations}")
        self.require_flag(rank_weight >= 0, f"--rank-weight must be >= 0, got {rank_weight}")
        self.require_flag(kd_temperature > 0, f"--kd-temperature must be > 0, got {kd_temperature}")
        self.alpha = kd_alpha
        self.topk = kd_topk
        self.iterations = kd_iterations
        self.rank_weight = rank_weight
        self.temperature = kd_temperature

    def require_flag(self, ok, message):
        """Stop before training with one line naming the flag."""
        if not ok:
            raise SystemExit(f"{self.name}: error: {message}")

    def forward(self, model, sample, reduce=True):
        # Validation (and alpha = 0) is plain label-smoothed CE, comparable with a CE run.
        if not model.training or self.alpha == 0:
            return super().forward(model, sample, reduce=reduce)
        teacher = self.task.teacher
        teacher.follow(next(model.parameters()))
        net_input = sample["net_input"]
        src_lengths = net_input["src_lengths"]
        gold_prev = net_input["prev_output_tokens"]

        # One forward through the (possibly DDP-wrapped) model; its encoder output is
        # captured for the later passes, which call the decoder alone.
        encoder_outs = []
        hook = model.encoder.register_forward_hook(lambda _m, _i, out: encoder_outs.append(out))
        try:
            net_output = model(**net_input)
        finally:
            hook.remove()
        teacher_encoder_out = teacher.encode(net_input["src_tokens"], src_lengths)

        target = model.get_targets(sample, net_output)
        mask = target.ne(self.padding_idx)
        mask[:, : self.ignore_prefix_size] = False
        prev = gold_prev
        kd_sum = rank_sum = 0.0
        for n in range(self.iterations):
            if n > 0:
                prev = student_prefix(gold_prev, predictions, self.padding_idx)
                net_output = model.decoder(prev, encoder_out=encoder_outs[0], src_lengths=src_lengths)
            student_logits = net_output[0]
            teacher_logits = teacher.decode(prev, teacher_encoder_out, src_lengths)
            if n == 0:
                # Only the gold pass has a CE term, so only it needs the dense log-probabilities.
                lprobs = model.get_normalized_probs(net_output, log_probs=True)
                ce, nll = self._gold_loss(lprobs, target)
                top1 = student_logits.detach().argmax(dim=-1)
                agreement = self._agreement(top1, teacher_logits.argmax(dim=-1), target, mask)
            kl, rank = self.kd_terms(student_logits, lprobs if n == 0 else None, teacher_logits, target)
            kd_sum = kd_sum + kl.masked_fill(~mask, 0).sum()
            rank_sum = rank_sum + rank.masked_fill(~mask, 0).sum()
            if n + 1 < self.iterations:
                # A predicted pad would be masked out of the next prefix: take the runner-up there.
                top2 = student_logits.detach().topk(2, dim=-1).indices
                predictions = torch.where(top2[..., 0].eq(self.padding_idx), top2[..., 1], top2[..., 0])

        kd = kd_sum / self.iterations
        rank = rank_sum / self.iterations
        loss = (1 - self.alpha) * ce + self.alpha * (kd + self.rank_weight * rank)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            "kd": kd.data,
            **agreement,
        }
        if self.rank_weight:
            logging_output["rank"] = rank.data
        return loss, sample_size, logging_output

    def kd_terms(self, student_logits, student_lprobs, teacher_logits, target):
        """Per-position (KL, ranking) for one pass, from the logits (no dense softmax kept)."""
        return tie_kd_terms(student_logits, teacher_logits, self.topk, self.temperature, self.rank_weight > 0)

    def _gold_loss(self, lprobs, target):
        lprobs = lprobs[:, self.ignore_prefix_size :]
        target = target[:, self.ignore_prefix_size :]
        return label_smoothed_nll_loss(
            lprobs.reshape(-1, lprobs.size(-1)), target.reshape(-1), self.eps, ignore_index=self.padding_idx
        )

    @staticmethod
    def _agreement(student_top1, teacher_top1, target, mask):
        """Counts over the KD positions: student argmax = teacher's, and teacher argmax = gold."""
        return {
            "kd_tokens": mask.sum(),
            "top1_agree": (student_top1.eq(teacher_top1) & mask).sum(),
            "teacher_gold": (teacher_top1.eq(target) & mask).sum(),
        }

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        kd_tokens = utils.item(sum(log.get("kd_tokens", 0) for log in logging_outputs))
        if kd_tokens == 0:
            return
        for key, scale, digits in (("kd", 1, 4), ("rank", 1, 4), ("top1_agree", 100, 2), ("teacher_gold", 100, 2)):
            if not any(key in log for log in logging_outputs):
                continue
            total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
            # kd and rank: nats / sum of probability gaps per target token; the others: % of tokens.
            metrics.log_scalar(key, scale * total / kd_tokens, kd_tokens, round=digits)
