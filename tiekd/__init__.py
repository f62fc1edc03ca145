"""TIE-KD on tensors: the KD terms, the hierarchical ranking loss, chunking, and the later passes' prefixes.

torch only, no fairseq. The derivations behind the functions are in README.md, "Numerics".
"""

from .agreement import agreement_counts
from .cached_terms import cached_kd_terms
from .chunking import DENSE_BLOCKS, max_rows_for_budget, row_chunks
from .entropy import entropy_sum
from .feature_loss import FeatureLoss
from .kl import kl_divergence
from .logit_terms import tie_kd_terms
from .partial_kd import KD_TARGETS, partial_kd
from .prefixes import next_predictions, prefix_and_target, student_prefix
from .ranking import RANK_SPACES, hierarchical_ranking_loss, ranking_from_topk

__all__ = [
    "DENSE_BLOCKS", "FeatureLoss", "KD_TARGETS", "RANK_SPACES", "agreement_counts", "cached_kd_terms", "entropy_sum",
    "hierarchical_ranking_loss", "kl_divergence", "max_rows_for_budget", "next_predictions", "partial_kd",
    "prefix_and_target", "ranking_from_topk", "row_chunks", "student_prefix", "tie_kd_terms",
]
