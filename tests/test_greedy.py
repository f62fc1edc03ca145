"""Greedy prefixes for source-only sentences equal fairseq's own SequenceGenerator with beam 1."""

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.translation import TranslationConfig, TranslationTask

import tiekd_fairseq  # noqa: F401  (allow-lists checkpoint globals)
from tiekd import prefix_and_target
from tiekd_fairseq.greedy import greedy_decode


@pytest.mark.parametrize("max_len_a,max_len_b", [(0.0, 200), (1.2, 3)])
def test_greedy_equals_sequence_generator_beam_1(corpus, teacher, max_len_a, max_len_b):
    task = TranslationTask.setup_task(TranslationConfig(
        data=str(corpus.data_bin), source_lang="en", target_lang="de", dataset_impl=None, required_seq_len_multiple=1,
        train_subset="train"))
    model = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)[0][0].eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(24)])
    generator = SequenceGenerator([model], task.tgt_dict, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b)
    expected = [h[0]["tokens"].tolist() for h in generator.generate([model], sample)]
    hyps = greedy_decode(model, sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"],
                         max_len_a, max_len_b, eos=task.tgt_dict.eos(), pad=task.tgt_dict.pad())
    got = [[tok for tok in row if tok != task.tgt_dict.pad()] for row in hyps.tolist()]
    assert got == expected
    assert any(len(h) > 3 for h in got) and all(h[-1] == task.tgt_dict.eos() for h in got)
    assert not model.training


def test_prefix_and_target_shift_like_the_collater():
    hyps = torch.tensor([[5, 6, 2, 1], [7, 2, 1, 1], [8, 9, 10, 2]])
    prev, target = prefix_and_target(hyps, eos=2, pad=1)
    assert prev.tolist() == [[2, 5, 6, 1], [2, 7, 1, 1], [2, 8, 9, 10]]
    assert torch.equal(target, hyps)
