"""The later passes' decoder inputs: the runner-up rule, the shifted student prefix, hypotheses as fairseq targets."""

import torch

from tiekd import next_predictions, prefix_and_target, student_prefix

PAD, EOS = 1, 2


def logits_ranking(*rankings, vocab=6):
    """(B, T, V) logits where ``rankings[b][t]`` lists the position's tokens from best to worst (the rest lower)."""
    logits = torch.full((len(rankings), len(rankings[0]), vocab), -10.0)
    for b, row in enumerate(rankings):
        for t, ranking in enumerate(row):
            for place, token in enumerate(ranking):
                logits[b, t, token] = 5.0 - place
    return logits


def test_a_predicted_pad_is_replaced_by_the_runner_up_and_other_positions_keep_the_argmax():
    logits = logits_ranking(
        [(3, PAD, 4), (PAD, 4, 3), (0, 5, PAD)],
        [(PAD, 2, 5), (2, PAD, 0), (PAD, 0, 4)],
    )
    assert torch.equal(logits.argmax(-1), torch.tensor([[3, PAD, 0], [PAD, 2, PAD]]))
    assert torch.equal(next_predictions(logits, PAD), torch.tensor([[3, 4, 0], [2, 2, 0]]))


def test_pad_tied_with_a_token_at_the_top_gives_that_token_whichever_comes_first():
    # topk does not define the order of equal values: with pad first or second, the answer is token 4.
    logits = torch.full((1, 2, 6), -3.0)
    logits[0, :, PAD] = logits[0, :, 4] = 2.0
    logits[0, 1, 5] = 1.0  # a distinct third place: pad must not push the answer down to it
    assert torch.equal(next_predictions(logits, PAD), torch.tensor([[4, 4]]))


def test_predictions_are_detached_and_take_any_floating_dtype():
    logits = logits_ranking([(PAD, 3), (5, PAD)]).half().requires_grad_()
    predictions = next_predictions(logits, PAD)
    assert not predictions.requires_grad and predictions.dtype == torch.long
    assert predictions.tolist() == [[3, 5]]


def test_student_prefix_is_the_first_gold_column_then_the_predictions_shifted_right_with_the_gold_padding():
    gold_prev = torch.tensor([
        [EOS, 10, 11, 12],
        [EOS, 20, PAD, PAD],
        [7, 30, 31, PAD],  # a first column other than EOS (a language tag) is copied too
    ])
    predictions = torch.tensor([
        [40, 41, 42, 43],
        [50, 51, 52, 53],
        [60, 61, 62, 63],
    ])
    assert torch.equal(student_prefix(gold_prev, predictions, PAD), torch.tensor([
        [EOS, 40, 41, 42],
        [EOS, 50, PAD, PAD],
        [7, 60, 61, PAD],
    ]))


def test_prefix_and_target_match_what_fairseqs_collater_builds_from_a_right_padded_target():
    hyps = torch.tensor([
        [10, 11, 12, EOS],
        [20, EOS, PAD, PAD],
        [EOS, PAD, PAD, PAD],  # an empty hypothesis
    ])
    prev, target = prefix_and_target(hyps, eos=EOS, pad=PAD)
    # The EOS of a short hypothesis moves to the front; the position after it is padding, not a second EOS.
    assert torch.equal(prev, torch.tensor([
        [EOS, 10, 11, 12],
        [EOS, 20, PAD, PAD],
        [EOS, PAD, PAD, PAD],
    ]))
    assert torch.equal(target, hyps)
