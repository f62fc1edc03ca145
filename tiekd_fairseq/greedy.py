"""Batched greedy decoding with incremental state: the target side of source-only sentences.

The rules are fairseq-generate's with ``--beam 1``, so the output equals its
SequenceGenerator: the length limit is ``int(a * src_len + b)`` with src_len the
batch's padded source width (capped by the model's positions), padding is never
chosen, EOS not at the first step, and only EOS at the limit.
"""

import torch


@torch.no_grad()
def greedy_decode(model, src_tokens, src_lengths, max_len_a=0.0, max_len_b=200, eos=2, pad=1):
    """(B, L) hypotheses of a fairseq encoder-decoder model, each up to and including its EOS, right-padded.

    Args:
        model: in eval mode already (nothing here changes its mode).
        src_tokens: (B, S) source ids; src_lengths: (B,).
        max_len_a, max_len_b: the length limit ``int(a * S + b)``.
        eos, pad: the dictionary's indices.
    """
    max_len = min(int(max_len_a * src_tokens.size(1) + max_len_b), model.max_decoder_positions() - 1)
    encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
    bsz = src_tokens.size(0)
    tokens = src_tokens.new_full((bsz, max_len + 2), pad)
    tokens[:, 0] = eos
    finished = src_tokens.new_zeros(bsz, dtype=torch.bool)
    incremental_state = {}
    for step in range(max_len + 1):
        logits = model.decoder(tokens[:, : step + 1], encoder_out=encoder_out, incremental_state=incremental_state)[0]
        lprobs = model.get_normalized_probs((logits[:, -1:], None), log_probs=True)[:, -1]
        lprobs[lprobs != lprobs] = -float("inf")
        lprobs[:, pad] = -float("inf")
        if step >= max_len:
            lprobs[:, :eos] = -float("inf")
            lprobs[:, eos + 1 :] = -float("inf")
        elif step == 0:
            lprobs[:, eos] = -float("inf")
        choice = lprobs.argmax(dim=-1).masked_fill(finished, pad)
        tokens[:, step + 1] = choice
        finished |= choice.eq(eos)
        if finished.all():
            break
    hyps = tokens[:, 1 : step + 2]
    return hyps
