"""tie_kd on tiny real fairseq models, in process: the loss formula, the passes, and what must not change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    label_smoothed_nll_loss,
)
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from tiekd import hierarchical_ranking_loss, kl_divergence
from tiekd_fairseq.criterions.tie_kd import LOGPROB_MARGIN

from conftest import STUDENT_ARCH, USER_DIR


def training_config(data_bin, teacher, *extra):
    """fairseq-train's configuration for a tiny tie_kd student (no dropout) with these flags added."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_bin), "--user-dir", USER_DIR, "--task", "translation_kd", "--teacher", str(teacher),
        *STUDENT_ARCH, "--dropout", "0", "--cpu", "--max-tokens", "4096", "--label-smoothing", "0.1",
        "--criterion", "tie_kd", *extra,
    ])
    return convert_namespace_to_omegaconf(args)


def build(data_bin, teacher, *extra):
    """task, student and criterion exactly as fairseq-train builds them from these flags."""
    cfg = training_config(data_bin, teacher, *extra)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(3)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def valid_sample(task, size=12):
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return dataset.collater([dataset[i] for i in range(size)])


@pytest.fixture(scope="module")
def setup(corpus, teacher):
    task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "3", "--kd-alpha", "0.5")
    return task, model, criterion, valid_sample(task)


def test_alpha_zero_equals_label_smoothed_cross_entropy(corpus, teacher, setup):
    task, model, _, sample = setup
    _, _, kd_zero = build(corpus.data_bin, teacher, "--kd-alpha", "0")
    reference = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    model.train()
    got, got_size, _ = kd_zero(model, sample)
    want, want_size, _ = reference(model, sample)
    assert torch.equal(got, want) and got_size == want_size


@pytest.mark.parametrize("path,space,margin", [("features", "prob", 0.0), ("logits", "prob", 0.0),
                                               ("features", "logprob", 0.9), ("logits", "logprob", 0.9)])
def test_loss_is_the_paper_formula_and_later_passes_decode_the_student_argmax(corpus, teacher, path, space, margin):
    task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "3", "--kd-alpha", "0.5",
                                   "--kd-path", path, "--rank-space", space, "--rank-margin", str(margin))
    sample = valid_sample(task)
    teacher = task.teacher.model
    model.train()
    calls = {"student_dec": [], "student_out": [], "student_enc": 0, "teacher_dec": [], "teacher_enc": 0}
    hooks = [
        model.decoder.register_forward_pre_hook(lambda m, a: calls["student_dec"].append(a[0].clone())),
        model.decoder.register_forward_hook(lambda m, a, out: calls["student_out"].append(out[0].detach())),
        teacher.decoder.register_forward_pre_hook(lambda m, a: calls["teacher_dec"].append(a[0].clone())),
        model.encoder.register_forward_hook(lambda *a: calls.__setitem__("student_enc", calls["student_enc"] + 1)),
        teacher.encoder.register_forward_hook(lambda *a: calls.__setitem__("teacher_enc", calls["teacher_enc"] + 1)),
    ]
    try:
        loss, sample_size, log = criterion(model, sample)
    finally:
        for h in hooks:
            h.remove()
    if path == "features":  # the decoder returned features: its logits are their output projection
        calls["student_out"] = [model.decoder.output_layer(x).detach() for x in calls["student_out"]]
    gold = sample["net_input"]["prev_output_tokens"]
    pad = task.tgt_dict.pad()
    assert calls["student_enc"] == 1 and calls["teacher_enc"] == 1
    assert len(calls["student_dec"]) == 3 and len(calls["teacher_dec"]) == 3
    assert torch.equal(calls["student_dec"][0], gold)
    for n in (1, 2):
        argmax = calls["student_out"][n - 1].argmax(-1)
        expected = torch.cat([gold[:, :1], argmax[:, :-1]], 1).masked_fill(gold.eq(pad), pad)
        assert torch.equal(calls["student_dec"][n], expected)
        assert torch.equal(calls["teacher_dec"][n], expected)
        assert not torch.equal(expected, gold)

    # Rebuild the loss from the recorded passes with the pure functions.
    target = sample["target"]
    mask = target.ne(pad)
    enc = teacher.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    kd = 0.0
    for prefix, student_logits in zip(calls["student_dec"], calls["student_out"]):
        t_logits = teacher.decoder(prefix, encoder_out=enc)[0]
        s_lp, t_lp = F.log_softmax(student_logits.float(), -1), F.log_softmax(t_logits.float(), -1)
        per_pos = kl_divergence(s_lp, t_lp) + 1.0 * hierarchical_ranking_loss(s_lp.exp(), t_lp.exp(), 5, space, margin)
        kd = kd + per_pos[mask].sum()
    lp0 = F.log_softmax(calls["student_out"][0].float(), -1)
    ce, _ = label_smoothed_nll_loss(lp0.view(-1, lp0.size(-1)), target.view(-1), 0.1, ignore_index=pad)
    expected = 0.5 * ce + 0.5 * kd / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sample_size == sample["ntokens"] and log["kd_tokens"] == mask.sum()
    assert log["kd"] > 0 and log["rank"] > 0
    # The student's entropy on pass 1's KD positions, a sum like the counts.
    p0 = lp0.double().exp()
    assert float(log["entropy"]) == pytest.approx(-(p0 * p0.log())[mask].sum().item(), rel=1e-5)


def _loss_and_gradients(corpus, teacher, sample_of, *flags):
    """A fresh student (the same initial weights every call), one criterion call and its gradients."""
    task, model, criterion = build(corpus.data_bin, teacher, "--dropout", "0", *flags)
    model.train()
    loss, sample_size, log = criterion(model, sample_of(task))
    loss.backward()
    return loss.detach(), log, {name: p.grad for name, p in model.named_parameters()}


def _mono_sample(task):
    sample = valid_sample(task)
    net_input = sample["net_input"]
    return {"id": sample["id"], "nsentences": len(sample["id"]), "ntokens": 0, "mono": True, "target": None,
            "net_input": {"src_tokens": net_input["src_tokens"], "src_lengths": net_input["src_lengths"]}}


# (flags, batch): every knob away from its default and from the others' values.
EQUAL_PATHS = {
    "N=3 k=3 tau=2 chunks of 7": (["--kd-iterations", "3", "--kd-topk", "3", "--kd-temperature", "2",
                                   "--kd-alpha", "0.3", "--rank-weight", "2.5", "--kd-chunk-size", "7"], valid_sample),
    "N=1 k=8 one chunk": (["--kd-iterations", "1", "--kd-topk", "8", "--kd-alpha", "0.7", "--rank-weight", "0.4",
                           "--label-smoothing", "0.2", "--kd-chunk-size", "100000"], valid_sample),
    "no ranking, prefix ignored": (["--kd-iterations", "2", "--rank-weight", "0", "--kd-alpha", "0.6",
                                    "--ignore-prefix-size", "1", "--kd-chunk-size", "33"], valid_sample),
    "activations kept, N=3": (["--kd-iterations", "3", "--kd-alpha", "0.4", "--kd-keep-activations",
                               "--kd-chunk-size", "50"], valid_sample),
    "source-only batch": (["--kd-iterations", "2", "--kd-topk", "4", "--kd-alpha", "0.8", "--rank-weight", "1.5",
                           "--kd-chunk-size", "10", "--mono-prefix", "student"], _mono_sample),
    "log space, margin 0.7": (["--kd-iterations", "2", "--kd-topk", "4", "--kd-alpha", "0.6", "--rank-weight", "0.3",
                               "--rank-space", "logprob", "--rank-margin", "0.7", "--kd-chunk-size", "9"],
                              valid_sample),
}


@pytest.mark.parametrize("case", EQUAL_PATHS)
def test_the_features_path_equals_the_logits_path_in_loss_logs_and_every_gradient(corpus, teacher, case):
    flags, sample_of = EQUAL_PATHS[case]
    feats = _loss_and_gradients(corpus, teacher, sample_of, *flags, "--kd-path", "features")
    logits = _loss_and_gradients(corpus, teacher, sample_of, *flags, "--kd-path", "logits")
    assert feats[0].item() == pytest.approx(logits[0].item(), rel=1e-5)
    for key in ("kd", "rank", "nll_loss", "kd_mono", "rank_mono", "top1_agree", "teacher_gold", "kd_tokens",
                "entropy"):
        if key in logits[1]:
            assert float(feats[1][key]) == pytest.approx(float(logits[1][key]), rel=1e-5, abs=1e-6), key
    assert feats[2].keys() == logits[2].keys()
    # Relative to the largest gradient: some (attention key biases) are zero up to rounding on both paths.
    scale = max(g.abs().max() for g in logits[2].values())
    for name, want in logits[2].items():
        # Shared embeddings: the output projection's gradient reaches the one embedding matrix.
        assert torch.allclose(feats[2][name], want, rtol=1e-5, atol=1e-5 * scale), name


def test_passes_recomputed_in_backward_keep_their_dropout(corpus, teacher):
    """With dropout, recomputing passes 2..N in backward gives the gradients of keeping their activations."""
    results = []
    for keep in ([], ["--kd-keep-activations"]):
        task, model, criterion = build(corpus.data_bin, teacher, "--dropout", "0.3", "--kd-iterations", "3", *keep)
        model.train()
        torch.manual_seed(11)
        loss, _, _ = criterion(model, valid_sample(task))
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (recomputed, grads), (kept, want) = results
    assert torch.equal(recomputed, kept)
    for name in want:
        assert torch.allclose(grads[name], want[name], rtol=1e-6, atol=1e-7), name


def test_sample_unchanged_and_teacher_frozen_through_a_training_step(setup):
    task, model, criterion, sample = setup
    teacher = task.teacher.model
    before_sample = copy.deepcopy(sample)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    teacher.train()  # what a trainer might do; the teacher must stay in eval mode
    loss, _, _ = criterion(model, sample)
    loss.backward()
    optimizer.step()
    for key, value in before_sample["net_input"].items():
        assert torch.equal(value, sample["net_input"][key])
    assert torch.equal(before_sample["target"], sample["target"])
    assert not teacher.training and not any(m.training for m in teacher.modules())
    for name, param in teacher.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, before_teacher[name]), name
    assert any(not torch.equal(v, before_student[k]) for k, v in model.state_dict().items())
    # Not reachable from the student or the criterion: not in the optimizer, DDP or a checkpoint.
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not teacher_params & {id(p) for p in criterion.parameters()}
    assert not any("teacher" in k for k in criterion.state_dict())


def test_validation_is_plain_label_smoothed_ce(setup):
    task, model, criterion, sample = setup
    reference = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    model.eval()
    with torch.no_grad():
        got, _, log = criterion(model, sample)
        want, _, _ = reference(model, sample)
    assert torch.equal(got, want) and "kd" not in log


def test_temperature_softens_the_kl_only_and_scales_it_by_tau_squared(corpus, teacher):
    _, _, criterion = build(corpus.data_bin, teacher, "--kd-temperature", "2")
    s, t_ = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    s_lp = F.log_softmax(s, -1)
    kl, rank = criterion.kd_terms(s, s_lp, t_, torch.zeros(2, 3, dtype=torch.long))
    assert torch.allclose(kl, 4 * kl_divergence(F.log_softmax(s / 2, -1), F.log_softmax(t_ / 2, -1)))
    assert torch.allclose(rank, hierarchical_ranking_loss(s_lp.exp(), F.softmax(t_, -1), 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_teacher_follows_the_student_precision(setup, dtype):
    task, _, _, _ = setup
    teacher = copy.deepcopy(task.teacher)
    teacher.follow(torch.zeros(1, dtype=dtype))
    assert {p.dtype for p in teacher.model.parameters()} == {dtype}


@pytest.mark.parametrize("flag,value,message", [
    ("--kd-alpha", "1.5", "--kd-alpha must be in [0, 1]"),
    ("--kd-iterations", "0", "--kd-iterations must be >= 1"),
    ("--kd-topk", "0", "--kd-topk must be >= 1"),
    ("--kd-max-skipped-frac", "1.5", "--kd-max-skipped-frac must be in [0, 1]"),
    ("--kd-skipped-window", "0", "--kd-skipped-window must be >= 1"),
    ("--rank-margin", "-0.5", "--rank-margin must be >= 0"),
])
def test_bad_criterion_flags_are_one_clear_line(corpus, teacher, flag, value, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(corpus.data_bin, teacher, flag, value)


def test_word_kd_equals_tie_kd_with_one_pass_and_no_ranking(corpus, teacher, setup):
    task, model, _, sample = setup
    _, _, tie = build(corpus.data_bin, teacher, "--kd-iterations", "1", "--rank-weight", "0")
    _, _, word = build(corpus.data_bin, teacher, "--criterion", "word_kd")
    model.train()
    got, _, log = word(model, sample)
    want, _, _ = tie(model, sample)
    assert torch.equal(got, want) and "rank" not in log and log["kd"] > 0


@pytest.mark.parametrize("kd_target", ["top1", "no-top1", "topk"])
def test_word_kd_targets_use_partial_kd(corpus, teacher, setup, kd_target):
    from tiekd import partial_kd

    task, model, _, sample = setup
    _, _, word = build(corpus.data_bin, teacher, "--criterion", "word_kd", "--kd-target", kd_target, "--kd-topk", "3")
    model.train()
    loss, _, log = word(model, sample)
    net_output = model(**sample["net_input"])
    s_lp = F.log_softmax(net_output[0].float(), -1)
    teacher_model = task.teacher.model
    t_logits = teacher_model(**sample["net_input"])[0]
    target = sample["target"]
    mask = target.ne(task.tgt_dict.pad())
    kd = partial_kd(s_lp, F.log_softmax(t_logits.float(), -1), target, kd_target, 3)[mask].sum()
    assert log["kd"].item() == pytest.approx(kd.item(), rel=1e-5)


def test_word_kd_refuses_temperature_outside_full(corpus, teacher):
    with pytest.raises(SystemExit, match="word_kd: error: --kd-temperature applies to --kd-target full only"):
        build(corpus.data_bin, teacher, "--criterion", "word_kd", "--kd-target", "top1", "--kd-temperature", "2")


@pytest.mark.parametrize("path", ["features", "logits"])
def test_no_tensor_of_all_positions_by_the_vocabulary_on_the_features_path(corpus, teacher, path):
    """Every tensor with a vocabulary-sized dimension that any op makes in a tie_kd N=2 step (forward and
    backward) is recorded by its rows (its size over the vocabulary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    chunk = 80

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and vocab in t.shape:
                    LargestOutput.largest = max(LargestOutput.largest, t.numel() // vocab)
            return out

    task, model, criterion = build(corpus.data_bin, teacher, "--kd-iterations", "2", "--kd-path", path,
                                   "--kd-chunk-size", str(chunk))
    sample = valid_sample(task)
    vocab, positions = len(task.tgt_dict), sample["target"].numel()
    # The bound below tells chunks from the batch, and from the output weights (vocabulary x width).
    assert positions > 4 * chunk and max(model.decoder.embed_dim, task.teacher.model.decoder.embed_dim) < chunk
    model.train()
    with LargestOutput():
        loss, _, _ = criterion(model, sample)
        loss.backward()
    if path == "features":
        assert LargestOutput.largest <= chunk
    else:
        assert LargestOutput.largest >= positions


def test_without_rank_margin_the_paper_has_none_and_log_space_the_one_chosen_on_valid(corpus, teacher):
    for space, margin in (("prob", 0.0), ("logprob", LOGPROB_MARGIN)):
        _, _, criterion = build(corpus.data_bin, teacher, "--rank-space", space)
        assert (criterion.rank_space, criterion.rank_margin) == (space, margin)
    assert LOGPROB_MARGIN > 0  # a flat student must not satisfy the log-space default
