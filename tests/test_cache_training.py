"""--teacher-cache in translation_kd: the gold pass reads the teacher from tiekd-cache-teacher's output."""

import sys
from pathlib import Path

import pytest
import torch
from test_criterion import build

from conftest import fairseq, kd_train_args, run

CACHE_TOOL = Path(sys.executable).parent / "tiekd-cache-teacher"


def make_cache(corpus, teacher, out, k):
    run([CACHE_TOOL, "--data-bin", corpus.data_bin, "--subset", "valid", "--teacher", teacher, "--kd-topk", k,
         "--out", out, "--cpu"])
    return out


@pytest.fixture(scope="module")
def full_cache(corpus, teacher, tmp_path_factory):
    """The whole vocabulary cached (K = V): the cached KL is then the exact KL, up to fp16 storage."""
    vocab = len((corpus.data_bin / "dict.de.txt").read_text().splitlines()) + 4
    return make_cache(corpus, teacher, tmp_path_factory.mktemp("cache") / "full", vocab)


@pytest.fixture(scope="module")
def small_cache(corpus, teacher, tmp_path_factory):
    return make_cache(corpus, teacher, tmp_path_factory.mktemp("cache") / "k8", 8)


def first_batch(task):
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return dataset.collater([dataset[i] for i in range(16)])


@pytest.mark.parametrize("criterion", [["--criterion", "word_kd"], ["--kd-iterations", "1"],
                                       ["--kd-iterations", "1", "--rank-space", "logprob", "--rank-margin", "0.6",
                                        "--rank-weight", "1.7"]])
def test_a_whole_vocabulary_cache_gives_the_online_loss_without_a_teacher(corpus, teacher, full_cache, criterion):
    flags = ["--train-subset", "valid", *criterion]
    online_task, model, online = build(corpus.data_bin, teacher, *flags)
    cached_task, _, cached = build(corpus.data_bin, teacher, *flags, "--teacher-cache", str(full_cache))
    cached_task.load_dataset("valid")  # checks the cache against the training subset
    assert cached_task.teacher is None  # one pass, no source-only data: the cache is the whole teacher
    sample = first_batch(online_task)
    model.train()
    want, _, want_log = online(model, sample)
    got, _, got_log = cached(model, sample)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)
    for key in ("kd", "rank"):
        if key in want_log:
            assert got_log[key].item() == pytest.approx(want_log[key].item(), rel=2e-3, abs=1e-3), key
    assert got_log["entropy"].item() == pytest.approx(want_log["entropy"].item(), rel=1e-5)
    assert torch.equal(got_log["teacher_gold"], want_log["teacher_gold"])


def test_later_passes_still_run_the_teacher(corpus, teacher, small_cache):
    task, model, criterion = build(corpus.data_bin, teacher, "--train-subset", "valid",
                                   "--teacher-cache", str(small_cache), "--kd-iterations", "2")
    assert task.teacher is not None
    calls = []
    hook = task.teacher.model.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0]))
    try:
        model.train()
        criterion(model, first_batch(task))
    finally:
        hook.remove()
    assert len(calls) == 1  # pass 2 only; pass 1 came from the cache


def test_a_cache_of_another_subset_is_refused_in_one_line(corpus, teacher, small_cache):
    task, _, _ = build(corpus.data_bin, teacher, "--teacher-cache", str(small_cache))
    with pytest.raises(SystemExit, match=r"translation_kd: error: teacher cache \S+ is of subset 'valid', not 'train'"):
        task.load_dataset("train")


def test_the_cache_serves_the_temperature_1_kl_only(corpus, teacher, small_cache):
    with pytest.raises(SystemExit, match="--teacher-cache holds temperature-1 top-K log-probs"):
        build(corpus.data_bin, teacher, "--teacher-cache", str(small_cache), "--kd-temperature", "2")
    with pytest.raises(SystemExit, match="--teacher-cache holds temperature-1 top-K log-probs"):
        build(corpus.data_bin, teacher, "--teacher-cache", str(small_cache), "--criterion", "word_kd",
              "--kd-target", "top1")


def test_fairseq_train_with_the_cache(corpus, teacher, small_cache, tmp_path):
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, teacher, tmp_path / "s", "--max-update", "6",
                                                   "--train-subset", "valid", "--teacher-cache", small_cache,
                                                   "--kd-iterations", "1"))
    last = [line for line in (proc.stdout + proc.stderr).splitlines() if "| train |" in line][-1]
    assert "| kd " in last and "| rank " in last and "num_updates 6" in last
    assert "frozen" not in proc.stdout + proc.stderr  # the teacher was never loaded
