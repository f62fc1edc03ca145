"""A batch whose KD temporaries exceed --kd-memory-budget: computed over chunks of positions, same result, logged.

Controls, not robustness cases: chunking is an equivalence, no fault is provoked.
"""

import re
import weakref

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tiekd import DENSE_BLOCKS, cached_kd_terms, max_rows_for_budget, tie_kd_terms

from conftest import fairseq, kd_train_args


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create while active (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.held = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor._is_view():
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in self.held and key not in inputs:
                self.held.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, key, size)
        return out

    def _free(self, key, size):
        self.held.discard(key)
        self.live -= size


def _forward_backward(fn, x, weights):
    x = x.detach().clone().requires_grad_()
    kl, rank = fn(x)
    grad = torch.autograd.grad((weights[0] * kl).sum() + (weights[1] * rank).sum(), x)[0]
    return kl, rank, grad


def _assert_same(fn_of_max_rows, x, rows):
    weights = torch.rand(2, rows, generator=torch.Generator().manual_seed(rows))
    whole = _forward_backward(lambda y: fn_of_max_rows(y, None), x, weights)
    for max_rows in (1, 7, rows - 1):
        chunked = _forward_backward(lambda y: fn_of_max_rows(y, max_rows), x, weights)
        for got, want in zip(chunked, whole):
            assert torch.equal(got, want), max_rows


def test_tie_kd_terms_by_chunks_equal_all_at_once_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(20, 300, generator=gen) * 4, torch.randn(20, 300, generator=gen) * 4
    for dtype in (torch.float32, torch.float16):
        for tau, with_rank in ((1.0, True), (2.0, True), (1.0, False)):
            _assert_same(lambda x, m: tie_kd_terms(x, t.to(dtype), 5, tau, with_rank, max_rows=m), s.to(dtype), 20)


def test_cached_terms_by_chunks_equal_all_at_once_in_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    lq = F.log_softmax(torch.randn(20, 300, generator=gen) * 4, -1)
    top, ids = lq.topk(8, -1)
    tail = lq.scatter(-1, ids, float("-inf")).logsumexp(-1)
    # Half the positions put almost all their mass on the cached tokens: their p_tail is recomputed densely.
    s = torch.randn(20, 300, generator=gen)
    s[::2] = s[::2].scatter(-1, ids[::2], 12.0)
    p_tail = 1 - F.softmax(s, -1).gather(-1, ids).sum(-1)
    assert p_tail[::2].max() < 1e-2 < p_tail[1::2].min()
    for normalized in (False, True):
        x = F.log_softmax(s, -1) if normalized else s
        _assert_same(lambda y, m: cached_kd_terms(y, ids, top, tail, 5, normalized=normalized, max_rows=m), x, 20)


def _temporaries(fn, x):
    """Peak bytes of everything the terms' forward and backward allocate, less the gradient they return."""
    x = x.detach().clone().requires_grad_()
    with LiveBytes() as live:
        kl, rank = fn(x)
        (kl.sum() + rank.sum()).backward()
    return live.peak - x.grad.untyped_storage().nbytes()


def test_tie_kd_terms_temporaries_stay_within_the_budget():
    rows, vocab = 512, 4000
    s, t = torch.randn(rows, vocab) * 3, torch.randn(rows, vocab) * 3
    budget = 2**20
    max_rows = max_rows_for_budget(vocab, budget)
    assert max_rows == budget // (DENSE_BLOCKS * vocab * 4) < rows
    for dtype in (torch.float32, torch.float16):
        for tau in (1.0, 2.0):
            def terms(m):
                return lambda x: tie_kd_terms(x, t.to(dtype), 5, tau, max_rows=m)

            assert _temporaries(terms(max_rows), s.to(dtype)) <= budget
            assert _temporaries(terms(None), s.to(dtype)) > 8 * budget  # what the budget saved


def _train(corpus, teacher, save_dir, *extra):
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, teacher, save_dir, "--kd-iterations", "2",
                                                   "--max-update", "3", "--train-subset", "valid",
                                                   "--max-tokens", "1024", "--dropout", "0", *extra))
    params = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))["model"]
    return proc.stdout + proc.stderr, params


def test_fairseq_train_over_a_tiny_budget_chunks_logs_it_and_trains_the_same(corpus, teacher, tmp_path):
    logits = ("--kd-path", "logits")  # the budget is the logits path's; the features path has --kd-chunk-size
    chunked_log, chunked = _train(corpus, teacher, tmp_path / "chunked", *logits, "--kd-memory-budget", "1")
    whole_log, whole = _train(corpus, teacher, tmp_path / "whole", *logits, "--kd-memory-budget", "0")
    found = re.search(r"tie_kd: the KD terms of (\d+) positions x (\d+) vocabulary exceed --kd-memory-budget 1 MiB: "
                      r"computed in (\d+) chunks of up to (\d+) positions", chunked_log)
    assert found, chunked_log[-3000:]
    positions, vocab, chunks, per_chunk = map(int, found.groups())
    assert per_chunk == 2**20 // (DENSE_BLOCKS * vocab * 4) and chunks == -(-positions // per_chunk) > 1
    assert chunked_log.count("--kd-memory-budget") == 1  # logged once
    assert "chunks of up to" not in whole_log
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name
