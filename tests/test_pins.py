"""The full tie_kd loss pinned at alpha 0.3, lambda 2.5, k 3, tau 2, N 2, against the paper's formulas written out here.

Nothing of the product computes the expected values: the reference below runs the
student's and the teacher's encoder and decoder itself, builds each pass's prefix
from the student's argmax (the runner-up where that is the padding symbol), and sums
label-smoothed CE, the tempered KL and the two ranking levels position by position in
float64, with plain Python loops for the ranking loss.
"""

import math
from dataclasses import dataclass, replace

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from test_criterion import build, valid_sample
from test_mono import binarize_mono, first_batch

from tiekd_fairseq.criterions.tie_kd import LOGPROB_MARGIN

EPS = 0.1  # the label smoothing build() sets


@dataclass(frozen=True)
class Knobs:
    alpha: float = 0.3
    rank_weight: float = 2.5
    k: int = 3
    tau: float = 2.0
    passes: int = 2
    space: str = "prob"  # what the ranking hinges compare: probabilities, or log-probabilities
    margin: float = 0.0
    # Ways to misplace a knob, for the tests that show each mistake would be caught.
    kl_scaled_by_tau_squared: bool = True
    ranking_at_tau: bool = False
    mean_over_passes: bool = True
    log_levels_averaged: bool = True  # in log space, each ranking level the mean of its hinges

    def flags(self):
        return ["--kd-alpha", str(self.alpha), "--rank-weight", str(self.rank_weight), "--kd-topk", str(self.k),
                "--kd-temperature", str(self.tau), "--kd-iterations", str(self.passes), "--rank-space", self.space,
                "--rank-margin", str(self.margin)]


PINNED = Knobs()
# The ranking loss in log space, at a margin away from the default and from 0.
PINNED_LOG = replace(PINNED, space="logprob", margin=0.8)


def label_smoothed_ce(lprobs, target, pad):
    """fairseq's label smoothing: eps / (V - 1) on every other token, summed over non-pad positions."""
    vocab = lprobs.size(-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    eps_i = EPS / (vocab - 1)
    return (((1 - EPS - eps_i) * nll + eps_i * smooth) * target.ne(pad)).sum().item()


def ranking(p, q, k, space, margin, averaged=True):
    """R_top1 + R_topk of one position from its probability lists p (student) and q (teacher).

    The hinges compare p, or log p in log space, with ``margin`` added; in log space each level is the mean of
    its hinges.
    """
    x = p if space == "prob" else [math.log(v) for v in p]
    a = sorted(range(len(q)), key=lambda v: -q[v])[:k]
    b = sorted(range(len(p)), key=lambda v: -p[v])[:k]
    top1 = sum(max(0.0, x[a_i] - x[a[0]] + margin) for a_i in a[1:])
    topk = sum(max(0.0, x[b_j] - x[a_i] + margin) for a_i in a for b_j in b if q[a_i] > q[b_j])
    if space == "logprob" and averaged:
        return top1 / max(k - 1, 1) + topk / k**2
    return top1 + topk


def kd_sum(student_logits, teacher_logits, mask, knobs):
    """Sum over the masked positions of KL + lambda * ranking, in float64."""
    s, t = student_logits.double(), teacher_logits.double()
    log_p_tau, log_q_tau = torch.log_softmax(s / knobs.tau, -1), torch.log_softmax(t / knobs.tau, -1)
    kl = (log_q_tau.exp() * (log_q_tau - log_p_tau)).sum(-1)
    if knobs.kl_scaled_by_tau_squared:
        kl = knobs.tau**2 * kl
    rank_tau = knobs.tau if knobs.ranking_at_tau else 1.0
    p, q = torch.softmax(s / rank_tau, -1), torch.softmax(t / rank_tau, -1)
    total = 0.0
    for row, position in mask.nonzero().tolist():
        rank = ranking(p[row, position].tolist(), q[row, position].tolist(), knobs.k, knobs.space, knobs.margin,
                       knobs.log_levels_averaged)
        total += kl[row, position].item() + knobs.rank_weight * rank
    return total


def next_prefix(first_prev, student_logits, pad):
    """The next pass's decoder input: first gold column, then the argmax (runner-up where it is pad) shifted."""
    order = student_logits.argsort(dim=-1, descending=True)
    predicted = torch.where(order[..., 0].eq(pad), order[..., 1], order[..., 0])
    shifted = torch.cat([first_prev[:, :1], predicted[:, :-1]], dim=1)
    return shifted.masked_fill(first_prev.eq(pad), pad)


@torch.no_grad()
def kd_over_passes(model, teacher, src_tokens, src_lengths, first_prev, mask, knobs, pad):
    """(sum over passes of the KD sums, the student's pass-1 log-probs)."""
    student_enc = model.encoder(src_tokens, src_lengths=src_lengths)
    teacher_enc = teacher.encoder(src_tokens, src_lengths=src_lengths)
    prev, total, first_lprobs = first_prev, 0.0, None
    for n in range(knobs.passes):
        student_logits = model.decoder(prev, encoder_out=student_enc)[0]
        teacher_logits = teacher.decoder(prev, encoder_out=teacher_enc)[0]
        total += kd_sum(student_logits, teacher_logits, mask, knobs)
        if n == 0:
            first_lprobs = torch.log_softmax(student_logits.double(), -1)
        prev = next_prefix(first_prev, student_logits, pad)
    return (total / knobs.passes if knobs.mean_over_passes else total), first_lprobs


def reference_parallel_loss(model, teacher, sample, knobs, pad, ignore_prefix=0):
    """The loss of a parallel batch whose first ``ignore_prefix`` target positions count for nothing."""
    net_input, target = sample["net_input"], sample["target"]
    mask = target.ne(pad)
    mask[:, :ignore_prefix] = False
    kd, lprobs = kd_over_passes(model, teacher, net_input["src_tokens"], net_input["src_lengths"],
                                net_input["prev_output_tokens"], mask, knobs, pad)
    ce = label_smoothed_ce(lprobs[:, ignore_prefix:], target[:, ignore_prefix:], pad)
    return (1 - knobs.alpha) * ce + knobs.alpha * kd


def reference_source_only_loss(model, teacher, task, sample, knobs, max_len_a, max_len_b, ignore_prefix=0):
    """(loss, generated tokens, KD positions) on the student's beam-1 output, written by fairseq's own search."""
    pad, eos = task.tgt_dict.pad(), task.tgt_dict.eos()
    generator = SequenceGenerator([model], task.tgt_dict, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b)
    with torch.no_grad():
        hyps = [h[0]["tokens"] for h in generator.generate([model], sample)]
    width = max(len(h) for h in hyps)
    target = torch.full((len(hyps), width), pad)
    prev = torch.full((len(hyps), width), pad)
    for row, hyp in enumerate(hyps):
        target[row, : len(hyp)] = hyp
        prev[row, 0], prev[row, 1 : len(hyp)] = eos, hyp[:-1]
    mask = target.ne(pad)
    mask[:, :ignore_prefix] = False
    net_input = sample["net_input"]
    kd, _ = kd_over_passes(model, teacher, net_input["src_tokens"], net_input["src_lengths"], prev, mask, knobs, pad)
    return knobs.alpha * kd, sum(len(h) for h in hyps), int(mask.sum())


@pytest.fixture(scope="module")
def pinned(corpus, teacher):
    task, model, criterion = build(corpus.data_bin, teacher, *PINNED.flags())
    sample = valid_sample(task)
    model.train()
    loss, sample_size, _ = criterion(model, sample)
    expected = reference_parallel_loss(model, task.teacher.model, sample, PINNED, task.tgt_dict.pad())
    return task, model, sample, loss.item(), sample_size, expected


def test_tie_kd_loss_on_a_parallel_batch_is_the_papers_formula(pinned):
    _, _, sample, loss, sample_size, expected = pinned
    assert loss == pytest.approx(expected, rel=1e-5)
    assert sample_size == sample["ntokens"]


# Each knob moved the way a mistake would move it: the pinned reference must tell them apart.
MISTAKES = {
    "alpha swapped with 1 - alpha": replace(PINNED, alpha=1 - PINNED.alpha),
    "lambda ignored": replace(PINNED, rank_weight=1.0),
    "k ignored (the default 5)": replace(PINNED, k=5),
    "tau ignored": replace(PINNED, tau=1.0),
    "KL not scaled by tau^2": replace(PINNED, kl_scaled_by_tau_squared=False),
    "tau applied to the ranking loss too": replace(PINNED, ranking_at_tau=True),
    "N ignored (one pass)": replace(PINNED, passes=1),
    "passes summed, not averaged": replace(PINNED, mean_over_passes=False),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_knob_is_used_where_the_formula_puts_it(pinned, mistake):
    task, model, sample, loss, _, expected = pinned
    wrong = reference_parallel_loss(model, task.teacher.model, sample, MISTAKES[mistake], task.tgt_dict.pad())
    assert not math.isclose(expected, wrong, rel_tol=1e-3), f"the pinned loss cannot tell '{mistake}' apart"
    assert loss == pytest.approx(expected, rel=1e-5)


LOG_MISTAKES = {
    "margin ignored": replace(PINNED_LOG, margin=0.0),
    "the default margin instead of --rank-margin": replace(PINNED_LOG, margin=LOGPROB_MARGIN),
    "probabilities compared, not log-probabilities": replace(PINNED_LOG, space="prob"),
    "log-space hinges summed, not averaged": replace(PINNED_LOG, log_levels_averaged=False),
}


def test_tie_kd_loss_with_the_ranking_loss_in_log_space_is_the_formula_and_each_knob_shows(corpus, teacher):
    task, model, criterion = build(corpus.data_bin, teacher, *PINNED_LOG.flags())
    sample = valid_sample(task)
    model.train()
    loss, _, _ = criterion(model, sample)
    pad = task.tgt_dict.pad()
    expected = reference_parallel_loss(model, task.teacher.model, sample, PINNED_LOG, pad)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for mistake, knobs in LOG_MISTAKES.items():
        wrong = reference_parallel_loss(model, task.teacher.model, sample, knobs, pad)
        assert not math.isclose(expected, wrong, rel_tol=1e-3), f"the pinned loss cannot tell '{mistake}' apart"


@pytest.fixture(scope="module")
def shard(corpus, tmp_path_factory):
    lines = (corpus.root / "sp.train.en").read_text().splitlines()[:60]
    return binarize_mono(corpus, lines, tmp_path_factory.mktemp("pins") / "mono")


# --ignore-prefix-size 1 (a target-language tag, say): the first target position counts for nothing.
@pytest.mark.parametrize("ignore_prefix", [0, 1])
def test_tie_kd_loss_on_a_source_only_batch_is_the_papers_formula(corpus, teacher, shard, ignore_prefix):
    task, model, criterion = build(corpus.data_bin, teacher, *PINNED.flags(), "--mono-data", str(shard),
                                   "--mono-max-len-a", "1.0", "--mono-max-len-b", "5",
                                   "--ignore-prefix-size", str(ignore_prefix))
    sample = first_batch(task, "mono")
    model.train()
    loss, sample_size, log = criterion(model, sample)
    model.eval()
    expected, tokens, kd_positions = reference_source_only_loss(model, task.teacher.model, task, sample, PINNED,
                                                                1.0, 5, ignore_prefix)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert sample_size == tokens and log["mono_tokens"] == kd_positions
    assert kd_positions == tokens - ignore_prefix * sample["net_input"]["src_tokens"].size(0)


def test_ignore_prefix_size_leaves_the_first_positions_out_of_ce_and_kd(corpus, teacher, pinned):
    _, _, sample, _, _, with_prefix = pinned
    task, model, criterion = build(corpus.data_bin, teacher, *PINNED.flags(), "--ignore-prefix-size", "1")
    model.train()
    loss, sample_size, log = criterion(model, sample)
    pad = task.tgt_dict.pad()
    expected = reference_parallel_loss(model, task.teacher.model, sample, PINNED, pad, ignore_prefix=1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(expected, with_prefix, rel_tol=1e-3)
    assert log["kd_tokens"] == sample["target"].ne(pad).sum() - sample["target"].size(0)
    assert sample_size == sample["ntokens"]  # fairseq's own convention with a prefix
