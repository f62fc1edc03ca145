"""``tie_kd``: label-smoothed CE plus iterative KD with the hierarchical ranking loss (the loss: ``kd_base``)."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from tiekd import RANK_SPACES, tie_kd_terms

from .kd_base import KDConfig, KDCriterion

# The margin of --rank-space logprob: the best valid BLEU of the candidates 0.5, 1, 2 on the demo (README.md, "The
# ranking loss in log space").
LOGPROB_MARGIN = 0.5
DEFAULT_MARGIN = {"prob": 0.0, "logprob": LOGPROB_MARGIN}


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
    rank_space: ChoiceEnum(RANK_SPACES) = field(
        default="prob",
        metadata={"help": "what the ranking loss's hinges compare: prob, the student's probabilities, summed (the "
                          "paper's loss, which a flat student satisfies); logprob, its log-probabilities with "
                          "--rank-margin, each level the mean of its hinges, the student's own top-k held constant"},
    )
    rank_margin: Optional[float] = field(
        default=None,
        metadata={"help": f"margin of the ranking loss's hinges, in the units of --rank-space (default: 0 with "
                          f"prob, the paper's; {LOGPROB_MARGIN} nats with logprob, chosen on the demo's valid "
                          f"split)"},
    )


@register_criterion("tie_kd", dataclass=TieKDConfig)
class TieKDCriterion(KDCriterion):
    name = "tie_kd"

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_topk, kd_iterations, rank_weight,
                 kd_temperature, kd_path="features", kd_chunk_size=1024, kd_keep_activations=False,
                 kd_memory_budget=2048, kd_max_skipped_frac=0.2, kd_skipped_window=100, ignore_prefix_size=0,
                 report_accuracy=False, rank_space="prob", rank_margin=None):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy, alpha=kd_alpha,
                         temperature=kd_temperature, path=kd_path, chunk_size=kd_chunk_size,
                         keep_activations=kd_keep_activations, memory_budget=kd_memory_budget,
                         max_skipped_frac=kd_max_skipped_frac, skipped_window=kd_skipped_window, topk=kd_topk,
                         iterations=kd_iterations, rank_weight=rank_weight, rank_space=rank_space,
                         rank_margin=DEFAULT_MARGIN[str(rank_space)] if rank_margin is None else rank_margin)
        self.require_flag(kd_iterations >= 1, f"--kd-iterations must be >= 1, got {kd_iterations}")
        self.require_flag(rank_weight >= 0, f"--rank-weight must be >= 0, got {rank_weight}")
        self.require_flag(self.rank_margin >= 0, f"--rank-margin must be >= 0, got {self.rank_margin}")

    def kd_terms(self, student_logits, student_lprobs, teacher_logits, target):
        # From the logits: no dense softmax kept for backward.
        return tie_kd_terms(student_logits, teacher_logits, self.topk, self.temperature, self.rank_weight > 0,
                            max_rows=self.max_rows(student_logits), rank_space=self.rank_space,
                            rank_margin=self.rank_margin)
