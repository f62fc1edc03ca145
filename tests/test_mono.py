"""Source-only shards in translation_kd: rotation, alternated batches, KD-only loss on greedy prefixes."""

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from test_criterion import build

from tiekd_fairseq.data.mono_shards import ParallelWithMono

from conftest import fairseq, kd_train_args


def binarize_mono(corpus, lines, dest):
    prefix = dest.parent / f"{dest.name}-text"
    prefix.with_name(prefix.name + ".en").write_text("".join(line + "\n" for line in lines))
    fairseq("fairseq-preprocess", "--only-source", "--source-lang", "en", "--trainpref", prefix, "--destdir", dest,
            "--srcdict", corpus.data_bin / "dict.en.txt", "--workers", "1")
    return dest


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """Two source-only shards of 150 and 250 English sentences (tokenized like the data-bin)."""
    root = tmp_path_factory.mktemp("mono")
    lines = (corpus.root / "sp.train.en").read_text().splitlines()
    return [binarize_mono(corpus, lines[:150], root / "a"), binarize_mono(corpus, lines[150:400], root / "b")]


def mono_flags(shards, *extra):
    return ["--mono-data", ":".join(str(s) for s in shards), *extra]


def first_batch(task, kind, epoch=1):
    task.load_dataset("train", epoch=epoch)
    dataset = task.dataset("train")
    itr = task.get_batch_iterator(dataset, max_tokens=2048, epoch=epoch).next_epoch_itr(shuffle=False)
    for sample in itr:
        if bool(sample.get("mono")) == (kind == "mono"):
            return sample
    raise AssertionError(f"no {kind} batch")


def test_epochs_rotate_over_the_shards_and_batches_alternate(corpus, teacher, shards):
    task, _, _ = build(corpus.data_bin, teacher, *mono_flags(shards, "--mono-ratio", "0.25"))
    sizes = []
    for epoch in (1, 2, 3):
        task.load_dataset("train", epoch=epoch)
        dataset = task.dataset("train")
        assert isinstance(dataset, ParallelWithMono)
        sizes.append(len(dataset.mono))
        dataset.set_epoch(epoch)
        batches = dataset.batch_by_size(dataset.ordered_indices(), max_tokens=2048)
        parallel = [b for b in batches if b.max() < dataset.offset]
        mono = [b for b in batches if b.min() >= dataset.offset]
        assert len(parallel) + len(mono) == len(batches), "a batch mixes parallel and source-only sentences"
        assert len(mono) == min(round(0.25 / 0.75 * len(parallel)), len(dataset.mono.batch_by_size(
            dataset.mono.ordered_indices(), max_tokens=2048)))
    assert sizes == [150, 250, 150]
    assert task.has_sharded_data("train")


def test_source_only_batch_is_kd_on_the_students_beam1_output(corpus, teacher, shards):
    task, model, criterion = build(corpus.data_bin, teacher, *mono_flags(shards, "--mono-max-len-a", "1.0",
                                                                        "--mono-max-len-b", "5"))
    sample = first_batch(task, "mono")
    assert "target" not in sample or sample["target"] is None
    model.train()
    seen = []
    # Only the training passes: the greedy prefix writer calls the decoder in eval mode.
    hook = model.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()) if m.training else None)
    try:
        loss, sample_size, log = criterion(model, sample)
    finally:
        hook.remove()
    assert model.training
    # What the student writes, in eval mode, is what fairseq's own beam-1 search writes.
    generator = SequenceGenerator([model.eval()], task.tgt_dict, beam_size=1, max_len_a=1.0, max_len_b=5)
    with torch.no_grad():
        hyps = [h[0]["tokens"] for h in generator.generate([model], sample)]
    model.train()
    pad, eos = task.tgt_dict.pad(), task.tgt_dict.eos()
    prefix = seen[0]
    for row, hyp in zip(prefix, hyps):
        tokens = row[row.ne(pad)].tolist()
        assert tokens == [eos] + hyp[:-1].tolist()
    assert sample_size == sum(len(h) for h in hyps) == log["mono_tokens"]
    # KD only: alpha * (kd + lambda * rank), no CE term, and nothing about gold tokens.
    assert loss.item() == pytest.approx(0.5 * (log["kd_mono"] + log["rank_mono"]).item(), rel=1e-6)
    assert log["ntokens"] == 0 and log["kd_tokens"] == 0 and log["top1_agree"] == 0
    assert len(seen) == 3  # the N passes run on source-only batches too


def test_teacher_can_write_the_prefix(corpus, teacher, shards):
    task, model, criterion = build(corpus.data_bin, teacher, *mono_flags(shards, "--mono-prefix", "teacher"))
    sample = first_batch(task, "mono")
    model.train()
    seen = []
    # Only the training passes: the greedy prefix writer calls the decoder in eval mode.
    hook = model.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()) if m.training else None)
    try:
        criterion(model, sample)
    finally:
        hook.remove()
    teacher_model = task.teacher.model
    generator = SequenceGenerator([teacher_model], task.tgt_dict, beam_size=1, max_len_a=1.2, max_len_b=10)
    hyps = [h[0]["tokens"] for h in generator.generate([teacher_model], sample)]
    pad, eos = task.tgt_dict.pad(), task.tgt_dict.eos()
    for row, hyp in zip(seen[0], hyps):
        assert row[row.ne(pad)].tolist() == [eos] + hyp[:-1].tolist()


def test_missing_shards_and_a_bad_ratio_stop_before_training_with_one_line(corpus, teacher, shards, tmp_path):
    # Empty shards and shards of another dictionary are robustness cases (tests/robustness/test_data.py).
    with pytest.raises(SystemExit, match="has no train.en-None.en.idx"):
        build(corpus.data_bin, teacher, "--mono-data", f"{shards[0]}:{tmp_path / 'nowhere'}")
    with pytest.raises(SystemExit, match=r"--mono-ratio must be in \[0, 1\)"):
        build(corpus.data_bin, teacher, *mono_flags(shards, "--mono-ratio", "1"))


def test_mono_data_needs_a_kd_criterion(corpus, teacher, shards):
    with pytest.raises(SystemExit, match="--mono-data needs a KD criterion"):
        build(corpus.data_bin, teacher, *mono_flags(shards, "--kd-alpha", "0"))


def test_fairseq_train_logs_source_only_terms(corpus, teacher, shards, tmp_path):
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, teacher, tmp_path / "s", "--max-update", "12",
                                                   *mono_flags(shards, "--mono-ratio", "0.5")))
    last = [line for line in (proc.stdout + proc.stderr).splitlines() if "| train |" in line][-1]
    for key in ("kd_mono", "rank_mono", "mono_sents", "mono_toks", "kd", "top1_agree"):
        assert f"| {key} " in last, key
