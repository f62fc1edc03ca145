"""``word_kd``: vanilla word-level KD, and the paper's knowledge-removal study (``--kd-target``).

L = (1 - alpha) * LS-CE + alpha * sum_t KD_t: one pass, no ranking loss.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from tiekd import KD_TARGETS, partial_kd, tie_kd_terms

from .kd_base import KDConfig, KDCriterion


@dataclass
class WordKDConfig(KDConfig):
    # --kd-temperature applies to kd-target full only.
    kd_target: ChoiceEnum(KD_TARGETS) = field(
        default="full",
        metadata={"help": "what the student learns from the teacher: full distribution, top1 only, "
                          "no-top1 (top-1 mass moved to the gold token), or topk"},
    )
    kd_topk: int = field(default=5, metadata={"help": "k of --kd-target topk"})


@register_criterion("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterion):
    name = "word_kd"

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_target, kd_topk,
                 kd_path="features", kd_chunk_size=1024, kd_keep_activations=False,
                 kd_memory_budget=2048, kd_max_skipped_frac=0.2, kd_skipped_window=100, ignore_prefix_size=0,
                 report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy, alpha=kd_alpha,
                         temperature=kd_temperature, path=kd_path, chunk_size=kd_chunk_size,
                         keep_activations=kd_keep_activations, memory_budget=kd_memory_budget,
                         max_skipped_frac=kd_max_skipped_frac, skipped_window=kd_skipped_window, topk=kd_topk,
                         iterations=1, rank_weight=0.0)
        self.require_flag(
            kd_target == "full" or kd_temperature == 1,
            f"--kd-temperature applies to --kd-target full only, got {kd_temperature} with {kd_target}",
        )
        self.kd_target = str(kd_target)
        self.kd_needs_lprobs = self.kd_target != "full"

    @property
    def teacher_use(self):
        # no-top1 moves mass onto the gold token, which a source-only sentence lacks.
        use = super().teacher_use
        return dataclasses.replace(use, learns_from_source_only=use.learns_from_source_only
                                   and self.kd_target != "no-top1")

    def kd_terms(self, student_logits, student_lprobs, teacher_logits, target):
        if self.kd_target == "full":
            kl, _ = tie_kd_terms(student_logits, teacher_logits, self.topk, self.temperature, with_rank=False,
                                 max_rows=self.max_rows(student_logits))
            return kl, torch.zeros_like(kl)
        teacher_lprobs = F.log_softmax(teacher_logits.float(), dim=-1)
        kd = partial_kd(student_lprobs, teacher_lprobs, target, self.kd_target, self.topk)
        return kd, torch.zeros_like(kd)
