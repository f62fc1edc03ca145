"""Extreme numbers: fp16/bf16 logits of +-1e4, ties, one-hot teachers, and a teacher whose output is NaN or inf.

The loss functions stay finite (and close to float64 math) with finite gradients; a batch on
which the teacher's output is not finite loses its KD term, is counted as ``kd_skipped``, and
never puts a NaN into the student's gradients. Protected: the values and gradients the student
learns from, and its parameters after a step, against float64 math or a step on CE alone.
"""

import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from test_criterion import build, valid_sample

from tiekd import (
    cached_kd_terms,
    hierarchical_ranking_loss,
    kl_divergence,
    partial_kd,
    tie_kd_terms,
)

from conftest import BIN, kd_train_args, run

V = 64
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _one_hot(index, low, high=1e4):
    row = torch.full((3, V), low)
    row[:, index] = high
    return row


def _signs(seed):
    return (torch.randint(0, 2, (3, V), generator=torch.Generator().manual_seed(seed)) * 2 - 1).float()


# (student logits, teacher logits), before the cast to the tested dtype.
EXTREMES = {
    "logits +-1e4": lambda: (_signs(0) * 1e4, _signs(1) * 1e4),
    "all equal": lambda: (torch.zeros(3, V), torch.zeros(3, V)),
    "all equal at +-1e4": lambda: (torch.full((3, V), 1e4), torch.full((3, V), -1e4)),
    "one-hot teacher, -inf elsewhere": lambda: (torch.randn(3, V) * 3, _one_hot(3, -math.inf, 0.0)),
    "one-hot teacher, gap 2e4": lambda: (torch.randn(3, V) * 3, _one_hot(3, -1e4)),
    "one-hot student on another token": lambda: (_one_hot(7, -1e4), _one_hot(3, -1e4)),
}


def _inputs(extreme, dtype):
    torch.manual_seed(0)
    s, t = EXTREMES[extreme]()
    s, t = s.to(dtype), t.to(dtype)
    return s, t, s.double(), t.double()  # the float64 reference sees the same rounded numbers


def _value_and_grad(fn, s):
    x = s.clone().requires_grad_()
    values = fn(x)
    values = values if isinstance(values, tuple) else (values,)
    grad = torch.autograd.grad(sum(v.sum() for v in values), x)[0]
    return values, grad


def _check(protected, what, got, want, grad):
    """Register the values ``got`` (finite, within 1e-4 of the float64 ``want``) and ``grad`` (finite)."""
    for i, (g, w) in enumerate(zip(got, want)):
        protected.finite(f"{what}: value {i}", g)
        protected.same(f"{what}: value {i}", g, w, rtol=1e-4, atol=1e-3)
    protected.finite(f"{what}: gradient", grad)


def _kl_and_ranking_on_probabilities(protected, what, s, t, s64, t64):
    dtype = s.dtype
    lq = F.log_softmax(t.float(), -1).to(dtype)
    got, grad = _value_and_grad(lambda x: kl_divergence(F.log_softmax(x.float(), -1).to(dtype), lq), s)
    _check(protected, f"{what} kl_divergence", got,
           [kl_divergence(F.log_softmax(s.float(), -1).to(dtype).double(), lq.double())], grad)
    q = lq.float().exp().to(dtype)
    got, grad = _value_and_grad(lambda x: hierarchical_ranking_loss(F.softmax(x.float(), -1).to(dtype), q, 5), s)
    _check(protected, f"{what} ranking loss", got,
           [hierarchical_ranking_loss(F.softmax(s.float(), -1).to(dtype).double(), q.double(), 5)], grad)


def _tie_kd_terms_from_logits(protected, what, s, t, s64, t64):
    for tau in (1.0, 2.0):
        got, grad = _value_and_grad(lambda x: tie_kd_terms(x, t, 5, tau), s)
        want_kl = tau**2 * kl_divergence(F.log_softmax(s64 / tau, -1), F.log_softmax(t64 / tau, -1))
        want_rank = hierarchical_ranking_loss(F.softmax(s64, -1), F.softmax(t64, -1), 5)
        _check(protected, f"{what} tie_kd_terms tau {tau}", got, [want_kl, want_rank], grad)
        assert grad.dtype == s.dtype


def _cached_terms(protected, what, s, t, s64, t64):
    lq = F.log_softmax(t64, -1)
    top, ids = lq.topk(8, -1)
    tail = lq.scatter(-1, ids, -math.inf).logsumexp(-1)
    top, tail = top.half(), tail.half()  # as the cache stores them
    want = cached_kd_terms(s64, ids, top.double(), tail.double(), 5)
    for normalized in (False, True):
        got, grad = _value_and_grad(lambda x: cached_kd_terms(
            F.log_softmax(x.float(), -1) if normalized else x, ids, top, tail, 5, normalized=normalized), s)
        _check(protected, f"{what} cached_kd_terms normalized={normalized}", got, want, grad)


@pytest.mark.parametrize("extreme", EXTREMES)
def test_loss_functions_stay_finite_with_finite_gradients(case, extreme):
    """kl_divergence, the ranking loss, tie_kd_terms (tau 1, 2) and cached_kd_terms, in fp16, bf16 and fp32."""
    protected = case(f"extreme logits: {extreme} (fp16, bf16, fp32)",
                     "the KD values and their gradient: finite, within 1e-4 of float64 math")
    for dtype in DTYPES:
        for check in (_kl_and_ranking_on_probabilities, _tie_kd_terms_from_logits, _cached_terms):
            check(protected, str(dtype), *_inputs(extreme, dtype))
    protected.verify()


def test_partial_kd_ignores_tokens_the_teacher_rules_out_even_at_minus_inf(case):
    protected = case("a student at -inf on tokens a one-hot teacher rules out (partial_kd top1, topk)",
                     "the KD value: log(V - 2) over the student's remaining tokens")
    # One-hot teacher; the student puts -inf on two of the teacher's (zero-mass) top-3 tokens.
    log_q = F.log_softmax(_one_hot(3, -math.inf, 0.0)[:1], -1)
    s = torch.zeros(1, V)
    s[0, :2] = -math.inf
    log_p = F.log_softmax(s, -1)
    for mode in ("top1", "topk"):
        value = partial_kd(log_p, log_q, torch.tensor([3]), mode, k=3)
        protected.same(f"partial_kd {mode}", value.item(), pytest.approx(math.log(V - 2)))
    protected.verify()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_teacher_shows_in_the_kl_value_of_its_row_only(case, bad):
    protected = case(f"a teacher logit {bad} at one of 3 positions (the KD functions)",
                     "the KD values of the other positions, finite (its own NaN, for the criterion to see)")
    s, t = torch.randn(3, V) * 3, torch.randn(3, V) * 3
    t[1, 5] = bad
    lq = F.log_softmax(t, -1)
    top, ids = lq.topk(8, -1)
    tail = lq.scatter(-1, ids, -math.inf).logsumexp(-1)
    values = {
        "kl_divergence": kl_divergence(F.log_softmax(s, -1), lq),
        "tie_kd_terms": tie_kd_terms(s, t, 5)[0],
        "cached_kd_terms": cached_kd_terms(s, ids, top, tail, 5)[0],
        **{f"partial_kd {mode}": partial_kd(F.log_softmax(s, -1), lq, torch.tensor([0, 1, 2]), mode)
           for mode in ("full", "top1", "no-top1", "topk")},
    }
    for name, value in values.items():
        protected.same(f"{name}: finite by position", torch.isfinite(value).tolist(), [True, False, True])
    protected.verify()


# ---- the criterion, in process: a teacher output that is not finite on one batch ----

def _poison(logits, prev, pad, kind):
    """Teacher logits made non-finite: one entry at a padding position, a whole row, or -inf everywhere on a row."""
    logits = logits.clone()
    if kind == "nan at padding":
        row, col = prev.eq(pad).nonzero()[0].tolist()
        logits[row, col, 5] = math.nan
    elif kind == "+inf row":
        logits[0, 1] = math.inf
    elif kind == "-inf row":
        logits[1, 0] = -math.inf
    return logits


@pytest.fixture(scope="module", params=["features", "logits"])
def kd_setup(corpus, teacher, request):
    task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "2", "--kd-alpha", "0.5",
                                   "--kd-path", request.param)
    return task, model, criterion, valid_sample(task)


def _teacher_output(criterion):
    """The teacher method whose output the criterion's path reads: features or logits (B, T, .)."""
    return "decode_features" if criterion.path == "features" else "decode"


def _grads(model, loss):
    """{parameter name: its gradient of ``loss``}, for the parameters ``loss`` reaches."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _stepped(model, grads):
    """The student's parameters after one SGD step (learning rate 1) with ``grads``; the model keeps its own."""
    params = dict(model.named_parameters())
    return {name: params[name].detach() - grad for name, grad in grads.items()}


def _ce_only_step(task, model, sample, alpha=0.5):
    """The parameters after a step on (1 - alpha) * label-smoothed CE, the loss of a batch without KD."""
    torch.manual_seed(5)
    ce, _, _ = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)
    return ce, _stepped(model, _grads(model, (1 - alpha) * ce))


@pytest.mark.parametrize("poisoned_pass", [0, 1])
@pytest.mark.parametrize("kind", ["nan at padding", "+inf row", "-inf row"])
def test_a_non_finite_teacher_output_drops_the_batch_kd_and_counts_it(case, kd_setup, kind, poisoned_pass,
                                                                     monkeypatch):
    task, model, criterion, sample = kd_setup
    protected = case(f"teacher {criterion.path} {kind} on pass {poisoned_pass + 1} of 2 (the criterion)",
                     "the student's parameters after a step: finite, equal to a step on CE alone")
    pad = task.tgt_dict.pad()
    assert sample["net_input"]["prev_output_tokens"].eq(pad).any()  # the padding case has a place to hit
    decode, calls = getattr(task.teacher, _teacher_output(criterion)), []

    def poisoned(prev, encoder_out, src_lengths):
        logits = decode(prev, encoder_out, src_lengths)
        calls.append(kind)
        return _poison(logits, prev, pad, kind) if len(calls) - 1 == poisoned_pass else logits

    monkeypatch.setattr(task.teacher, _teacher_output(criterion), poisoned)
    model.train()
    torch.manual_seed(5)
    loss, sample_size, log = criterion(model, sample)
    grads = _grads(model, loss)
    stepped = _stepped(model, grads)
    ce, ce_stepped = _ce_only_step(task, model, sample)
    assert len(calls) == 2
    assert loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-6)  # (1 - alpha) * CE, no KD
    assert sample_size == sample["ntokens"]
    assert log["kd_skipped"] == 1 and log["kd_tokens"] == 0 and log["kd"] == 0 and log["top1_agree"] == 0
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    protected.finite("the student's parameters after a step", stepped)
    # The features path forms the CE gradient by its own formula, in chunks: equal up to rounding.
    tolerance = dict(rtol=1e-5, atol=1e-5) if criterion.path == "features" else {}
    protected.same("the student's parameters after a step", stepped, ce_stepped, **tolerance)
    protected.verify()


def test_a_finite_batch_counts_no_skip(kd_setup):
    """Control, not a robustness case: a finite teacher, nothing skipped."""
    task, model, criterion, sample = kd_setup
    model.train()
    _, _, log = criterion(model, sample)
    assert log["kd_skipped"] == 0 and log["kd_tokens"] > 0 and log["kd"] > 0


def test_a_non_finite_cached_teacher_drops_the_batch_kd(case, corpus, teacher):
    protected = case("a NaN in a cached teacher log-prob (--teacher-cache)",
                     "the student's parameters after a step: finite, equal to a step on CE alone")
    cached_task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "1")
    sample = valid_sample(cached_task)
    target = sample["target"]
    lq = F.log_softmax(cached_task.teacher.model(**sample["net_input"])[0].float(), -1)
    top, ids = lq.topk(8, -1)
    tail = lq.scatter(-1, ids, -math.inf).logsumexp(-1)
    top[2, 3, 1] = math.nan  # a damaged cache entry

    class Cache:
        def batch(self, sample_ids, target_length, pad):
            assert target_length == target.size(1)
            return ids, top, tail

    cached_task.teacher_cache = Cache()
    model.train()
    loss, _, log = criterion(model, sample)
    grads = _grads(model, loss)
    stepped = _stepped(model, grads)
    _, ce_stepped = _ce_only_step(cached_task, model, sample)
    assert log["kd_skipped"] == 1 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    protected.finite("the student's parameters after a step", stepped)
    protected.same("the student's parameters after a step", stepped, ce_stepped)
    protected.verify()


def test_a_non_finite_source_only_batch_weighs_nothing(case, kd_setup, monkeypatch):
    task, model, criterion, sample = kd_setup
    protected = case(f"a NaN teacher ({criterion.path}) on a source-only batch",
                     "the student's parameters: a step leaves them as they were")
    net_input = sample["net_input"]
    mono = {"id": sample["id"], "nsentences": len(sample["id"]), "ntokens": 0, "mono": True, "target": None,
            "net_input": {"src_tokens": net_input["src_tokens"], "src_lengths": net_input["src_lengths"]}}
    decode = getattr(task.teacher, _teacher_output(criterion))
    monkeypatch.setattr(task.teacher, _teacher_output(criterion), lambda *a: decode(*a).fill_(math.nan))
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, sample_size, log = criterion(model, mono)
    assert loss.item() == 0 and sample_size == 0 and log["kd_skipped"] == 1
    grads = _grads(model, loss)
    assert grads and all(g.eq(0).all() for g in grads.values())
    protected.same("the student's parameters after a step", _stepped(model, grads), {n: before[n] for n in grads})
    protected.verify()


# ---- fairseq-train: the skips are counted in the log, the student stays finite ----

POISONING_TRAIN = '''
import math, sys
from fairseq_cli.train import cli_main  # first: it sets fairseq's log format
from tiekd_fairseq.frozen_model import FrozenModel

poison = {int(call): kind for call, kind in (item.split(":") for item in sys.argv.pop(1).split(","))}
calls = [0]
decode = FrozenModel.decode_features  # what the default --kd-path features reads


def poisoned(self, prev_output_tokens, encoder_out, src_lengths):
    logits = decode(self, prev_output_tokens, encoder_out, src_lengths)
    kind = poison.get(calls[0])
    calls[0] += 1
    if kind == "nan":
        logits[-1, -1, 0] = math.nan
    elif kind == "inf":
        logits[0] = math.inf
    return logits


FrozenModel.decode_features = poisoned
cli_main()
'''


def test_fairseq_train_skips_and_counts_batches_with_a_non_finite_teacher(case, corpus, teacher, tmp_path):
    protected = case("fairseq-train with the teacher's output not finite on 3 of 6 steps",
                     "the student checkpoint: every parameter finite")
    script = tmp_path / "poisoning_train.py"
    script.write_text(POISONING_TRAIN)
    save = tmp_path / "student"
    # Two decoder passes a step: step 1 pass 2, step 3 pass 1 and step 4 pass 2 meet a broken teacher.
    proc = run([sys.executable, script, "1:nan,4:inf,7:nan",
                *kd_train_args(corpus.data_bin, teacher, save, "--kd-iterations", "2", "--max-update", "6",
                               "--train-subset", "valid", "--max-tokens", "1024")])
    log = proc.stdout + proc.stderr
    last = [line for line in log.splitlines() if "| train |" in line][-1]
    assert "num_updates 6" in last
    assert re.search(r"\| kd_skipped 3 \|", last), last
    assert "the teacher's output is not finite" in log
    params = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))["model"]
    protected.finite("the student checkpoint", params)
    protected.verify()


def test_fairseq_train_stops_in_one_line_when_most_recent_batches_had_a_non_finite_teacher(case, corpus, teacher,
                                                                                        tmp_path):
    protected = case("fairseq-train resumed with a teacher whose output is NaN on every batch",
                     "the student's last checkpoint: the run stops before saving over it")
    save = tmp_path / "student"
    common = ["--kd-iterations", "1", "--train-subset", "valid", "--max-tokens", "1024"]
    run([BIN / "fairseq-train", *kd_train_args(corpus.data_bin, teacher, save, *common, "--max-update", "2")])
    protected.keep(save)
    script = tmp_path / "poisoning_train.py"
    script.write_text(POISONING_TRAIN)
    every_call = ",".join(f"{call}:nan" for call in range(100))
    proc = run([sys.executable, script, every_call,
                *kd_train_args(corpus.data_bin, teacher, save, *common, "--max-update", "40",
                               "--kd-skipped-window", "4", "--kd-max-skipped-frac", "0.5")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "tie_kd: error: the teacher's output was not finite on 4 of the last 4 training batches, more than "
        "--kd-max-skipped-frac 0.5: stopping; check the teacher (a broken checkpoint, or half precision overflowing)")
    protected.verify()
