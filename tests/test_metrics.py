"""What a KD criterion reports: agreement counts of a real batch, and their reduction into the logged metrics."""

import math

import pytest
import torch
from fairseq.logging import metrics
from test_criterion import build

from tiekd_fairseq.criterions.tie_kd import TieKDCriterion

from conftest import TEACHER_ARCH


@pytest.fixture(scope="module")
def noisy_teacher_student(corpus, teacher):
    """tie_kd with one pass and a student that is the teacher plus noise: it agrees with it at some tokens only."""
    task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "1", *TEACHER_ARCH)
    state = torch.load(teacher, map_location="cpu")["model"]
    generator = torch.Generator().manual_seed(0)
    model.load_state_dict({key: value + 0.05 * torch.randn(value.shape, generator=generator)
                           if value.is_floating_point() else value for key, value in state.items()})
    task.load_dataset("valid")
    return task, model, criterion


@pytest.mark.parametrize("start, size", [(0, 12), (40, 7)])
def test_agreement_counts_are_the_models_argmax_over_non_pad_targets(noisy_teacher_student, start, size):
    task, model, criterion = noisy_teacher_student
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(start, start + size)])
    target = sample["target"]
    non_pad = target.ne(task.tgt_dict.pad())
    assert not non_pad.all(), "the batch must have padding for the mask to matter"
    model.train()
    _, _, log = criterion(model, sample)
    with torch.no_grad():
        student_top1 = model(**sample["net_input"])[0].argmax(-1)
        teacher_top1 = task.teacher.model(**sample["net_input"])[0].argmax(-1)
    kd_tokens = int(non_pad.sum())
    top1_agree = int((student_top1.eq(teacher_top1) & non_pad).sum())
    teacher_gold = int((teacher_top1.eq(target) & non_pad).sum())
    # Counts strictly inside (0, kd_tokens) and different from each other: a swap or a constant would show.
    assert 0 < teacher_gold < top1_agree < kd_tokens
    assert (int(log["kd_tokens"]), int(log["top1_agree"]), int(log["teacher_gold"])) == (
        kd_tokens, top1_agree, teacher_gold)
    assert int(log["kd_skipped"]) == 0


def batch_log(loss, sample_size, nsentences, ntokens=0, nll_loss=0.0, **kd):
    """A training batch's logging output as a criterion with source-only shards and a ranking loss writes it."""
    keys = ("kd", "rank", "kd_tokens", "top1_agree", "teacher_gold", "kd_skipped",
            "kd_mono", "rank_mono", "mono_tokens", "mono_sentences")
    return {"loss": torch.tensor(loss), "nll_loss": torch.tensor(nll_loss), "ntokens": ntokens,
            "nsentences": nsentences, "sample_size": sample_size,
            **{key: torch.tensor(kd.get(key, 0)) for key in keys}}


# --sentence-avg --ignore-prefix-size 1: sample_size counts sentences, kd_tokens = ntokens - nsentences.
PARALLEL = [
    batch_log(120.0, 4, 4, ntokens=50, nll_loss=90.0, kd=33.0, rank=5.5, kd_tokens=46, top1_agree=30,
              teacher_gold=25),
    batch_log(150.0, 6, 6, ntokens=70, nll_loss=110.0, kd=40.0, rank=7.0, kd_tokens=64, top1_agree=41,
              teacher_gold=37),
    batch_log(60.0, 3, 3, ntokens=30, nll_loss=45.0, kd_skipped=1),  # KD dropped: CE only
]
SOURCE_ONLY = [
    batch_log(20.0, 5, 5, kd_mono=36.0, rank_mono=4.0, mono_tokens=40, mono_sentences=5),
    batch_log(12.0, 3, 3, kd_mono=21.0, rank_mono=2.5, mono_tokens=25, mono_sentences=3),
]
SOURCE_ONLY_ONLY = [
    batch_log(9.0, 2, 2, kd_mono=14.0, rank_mono=1.0, mono_tokens=16, mono_sentences=2),
    batch_log(30.0, 7, 7, kd_mono=50.0, rank_mono=6.0, mono_tokens=55, mono_sentences=7),
    batch_log(0.0, 0, 4, kd_skipped=1),  # KD dropped: nothing learned, nothing weighed
]


def total(logs, key):
    return sum(float(log[key]) for log in logs)


def reduced(*log_sets):
    """The meters after reducing each set of logging outputs in turn, as fairseq does over a log interval."""
    with metrics.aggregate(new_root=True) as meters:
        for logs in log_sets:
            TieKDCriterion.reduce_metrics(logs)
    return meters


def test_parallel_and_source_only_batches_are_reduced_per_their_own_denominators():
    logs = PARALLEL + SOURCE_ONLY
    meters = reduced(logs)
    # Denominators that differ: a wrong one shows.
    assert len({total(logs, "sample_size"), total(logs, "ntokens"), total(logs, "kd_tokens"),
                total(logs, "mono_tokens")}) == 4
    kd_tokens, mono_tokens = total(logs, "kd_tokens"), total(logs, "mono_tokens")
    expected = {
        "loss": (120 + 150 + 60 + 20 + 12) / (4 + 6 + 3 + 5 + 3) / math.log(2),
        "nll_loss": (90 + 110 + 45) / (50 + 70 + 30) / math.log(2),
        "kd": (33 + 40) / kd_tokens,
        "rank": (5.5 + 7) / kd_tokens,
        "top1_agree": 100 * (30 + 41) / kd_tokens,
        "teacher_gold": 100 * (25 + 37) / kd_tokens,
        "kd_mono": (36 + 21) / mono_tokens,
        "rank_mono": (4 + 2.5) / mono_tokens,
    }
    assert kd_tokens == 46 + 64 and mono_tokens == 40 + 25
    for key, value in expected.items():
        assert float(meters[key].avg) == pytest.approx(value, rel=1e-6), key
    assert meters.get_smoothed_value("ppl") == pytest.approx(2 ** expected["nll_loss"], abs=0.005)  # 2 decimals
    sums = {key: float(meters[key].sum) for key in ("kd_skipped", "mono_sents", "mono_toks")}
    assert sums == {"kd_skipped": 1, "mono_sents": 5 + 3, "mono_toks": 40 + 25}


def test_only_source_only_batches_log_the_loss_per_sample_size_and_no_gold_metric():
    meters = reduced(SOURCE_ONLY_ONLY)
    assert float(meters["loss"].avg) == pytest.approx((9 + 30 + 0) / (2 + 7 + 0) / math.log(2), rel=1e-6)
    assert float(meters["kd_mono"].avg) == pytest.approx((14 + 50) / (16 + 55), rel=1e-6)
    assert float(meters["rank_mono"].avg) == pytest.approx((1 + 6) / (16 + 55), rel=1e-6)
    assert {key: float(meters[key].sum) for key in ("kd_skipped", "mono_sents", "mono_toks")} == {
        "kd_skipped": 1, "mono_sents": 2 + 7, "mono_toks": 16 + 55}
    for key in ("nll_loss", "ppl", "kd", "rank", "top1_agree", "teacher_gold"):
        assert key not in meters, key


def test_a_set_of_skipped_source_only_batches_logs_no_loss_only_the_skip_count():
    meters = reduced(SOURCE_ONLY_ONLY[2:] * 2)
    assert set(meters.keys()) == {"kd_skipped"} and float(meters["kd_skipped"].sum) == 2


def test_successive_reductions_weigh_each_value_by_its_denominator():
    # One interval with parallel batches, one with source-only batches only: an epoch's metrics pool both.
    meters = reduced(PARALLEL + SOURCE_ONLY, SOURCE_ONLY_ONLY)
    logs = PARALLEL + SOURCE_ONLY + SOURCE_ONLY_ONLY
    assert float(meters["loss"].avg) == pytest.approx(
        total(logs, "loss") / total(logs, "sample_size") / math.log(2), rel=1e-6)
    assert float(meters["kd_mono"].avg) == pytest.approx(total(logs, "kd_mono") / total(logs, "mono_tokens"), rel=1e-6)
    assert float(meters["nll_loss"].avg) == pytest.approx(
        total(logs, "nll_loss") / total(logs, "ntokens") / math.log(2), rel=1e-6)
    assert float(meters["mono_sents"].sum) == total(logs, "mono_sentences") == 5 + 3 + 2 + 7
