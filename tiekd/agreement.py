"""How often the student's top-1 is the teacher's, and the teacher's is the gold token."""

import torch


def agreement_counts(student_logits: torch.Tensor, teacher_top1: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor) -> dict:
    """Counts over the positions in ``mask``: all of them, student top-1 = teacher's, teacher top-1 = gold.

    The student agrees where its logit at the teacher's top-1 is its maximum: a max is
    several times cheaper than an argmax, and differs only on exact ties.

    Args:
        student_logits: (..., V) student logits.
        teacher_top1: (...) the teacher's argmax.
        target: (...) gold ids.
        mask: (...) the positions counted.

    Returns:
        {"kd_tokens", "top1_agree", "teacher_gold"}: 0-dim integer tensors.
    """
    student_logits = student_logits.detach()
    agrees = student_logits.gather(-1, teacher_top1.unsqueeze(-1)).squeeze(-1) >= student_logits.amax(dim=-1)
    return {
        "kd_tokens": mask.sum(),
        "top1_agree": (agrees & mask).sum(),
        "teacher_gold": (teacher_top1.eq(target) & mask).sum(),
    }
