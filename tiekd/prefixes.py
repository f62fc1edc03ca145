"""Decoder inputs of the later passes: the student's own predictions, shifted right."""

import torch


def next_predictions(student_logits: torch.Tensor, pad: int) -> torch.Tensor:
    """The student's argmax per position, or its runner-up where the argmax is ``pad``.

    A predicted pad would be masked out of the next prefix, so the next-best token stands in.

    Args:
        student_logits: (B, T, V) logits of one pass.
        pad: the padding index.

    Returns:
        (B, T) token ids.
    """
    top2 = student_logits.detach().topk(2, dim=-1).indices
    return torch.where(top2[..., 0].eq(pad), top2[..., 1], top2[..., 0])


def student_prefix(gold_prev: torch.Tensor, predictions: torch.Tensor, pad: int) -> torch.Tensor:
    """Decoder input of the next pass: the first gold column, then ``predictions`` shifted right.

    Padding stays where the gold prefix has it, so the decoder masks the same positions.

    Args:
        gold_prev: (B, T) the gold decoder input (prev_output_tokens).
        predictions: (B, T) the previous pass's predictions.
        pad: the padding index.
    """
    shifted = torch.cat([gold_prev[:, :1], predictions[:, :-1]], dim=1)
    return shifted.masked_fill(gold_prev.eq(pad), pad)


def prefix_and_target(hyps: torch.Tensor, eos: int, pad: int):
    """Decoder input and target for hypotheses, as fairseq's collater builds them from a target.

    Args:
        hyps: (B, L) hypotheses, each ending with ``eos``, right-padded with ``pad``.

    Returns:
        (prev_output_tokens (B, L), target (B, L)).
    """
    prev = torch.cat([hyps.new_full((hyps.size(0), 1), eos), hyps[:, :-1]], dim=1)
    return prev.masked_fill(hyps.eq(pad), pad), hyps
