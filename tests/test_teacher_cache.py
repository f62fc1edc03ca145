"""tiekd-cache-teacher through its console script, TeacherCache against the data, and the loss on a cached teacher."""

import json
import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiekd import cached_kd_terms, hierarchical_ranking_loss, kl_divergence
from tiekd_cli.cache_teacher import build_teacher_cache
from tiekd_cli.files import file_fingerprint
from tiekd_fairseq.data.data_bin import translation_task
from tiekd_fairseq.data.teacher_cache import TeacherCache, TeacherCacheError
from tiekd_fairseq.errors import InputError
from tiekd_fairseq.frozen_model import load_frozen_model

from conftest import built_once, data_bin_with_swapped_symbols, run

CACHE_TOOL = Path(sys.executable).parent / "tiekd-cache-teacher"
K = 8


def cache_args(corpus, teacher, out):
    # The 200 valid sentences in shards of 80: three shards, the last one shorter.
    return ["--data-bin", corpus.data_bin, "--subset", "valid", "--teacher", teacher, "--kd-topk", K,
            "--out", out, "--shard-size", 80, "--max-tokens", 1024, "--cpu"]


def cache_output(corpus, teacher, tmp_path_factory):
    """tiekd-cache-teacher's cache with ``cache_args`` (``out``) and what it printed (``stdout``), made once per
    test run (robustness/test_processes.py compares a killed and resumed run with it)."""
    def build(folder):
        (folder / "stdout.txt").write_text(run([CACHE_TOOL, *cache_args(corpus, teacher, folder / "valid")]).stdout)

    folder = built_once(tmp_path_factory, "cache", build)
    return SimpleNamespace(out=folder / "valid", stdout=(folder / "stdout.txt").read_text())


@pytest.fixture(scope="module")
def cache(corpus, teacher, tmp_path_factory):
    return cache_output(corpus, teacher, tmp_path_factory)


@pytest.fixture(scope="module")
def task(corpus):
    return translation_task(corpus.data_bin, "valid")


def test_layout_meta_and_reported_size(cache, task, corpus, teacher):
    sizes = task.dataset("valid").tgt_sizes
    meta = json.loads((cache.out / "meta.json").read_text())
    assert meta["subset"] == "valid" and meta["k"] == K and meta["sentences"] == 200
    assert meta["positions"] == int(sizes.sum()) and meta["dictionary_size"] == len(task.tgt_dict)
    assert meta["data_bin"] == str(corpus.data_bin.resolve())
    assert meta["teacher"] == file_fingerprint(teacher) and meta["teacher"]["path"] == str(teacher.resolve())
    assert meta["shards"] == [[0, 80], [80, 160], [160, 200]]
    assert meta["dtypes"] == {"ids": "uint16", "lprobs": "float16", "tail": "float16"}
    files = sorted(f"{p.parent.name}/{p.name}" for p in cache.out.glob("shard-*/*"))
    assert files == sorted(f"shard-0000{i}/{n}.{e}" for i in range(3) for n in ("ids", "lprobs", "tail")
                           for e in ("bin", "idx"))
    assert sorted(p.name for p in cache.out.iterdir()) == [
        ".lock", "meta.json", "shard-00000", "shard-00001", "shard-00002"]
    total = sum(p.stat().st_size for p in cache.out.rglob("*") if p.is_file())
    line = cache.stdout.strip().splitlines()[-1]
    assert line == (f"{cache.out}: {meta['positions']} target positions x top-{K}, {total} bytes on disk "
                    f"({total / (meta['positions'] * K):.2f} bytes per position per K)")
    # 2 bytes for an id and 2 for a log-prob per position and K, 2 for the tail per position, a little index.
    assert 4 + 2 / K < total / (meta["positions"] * K) < 4.5


def test_fairseq_reads_the_shards_one_item_per_sentence_in_id_order(cache, task):
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    sizes = task.dataset("valid").tgt_sizes
    for i, (start, end) in enumerate([(0, 80), (80, 160), (160, 200)]):
        ids = MMapIndexedDataset(str(cache.out / f"shard-0000{i}" / "ids"))
        lprobs = MMapIndexedDataset(str(cache.out / f"shard-0000{i}" / "lprobs"))
        tail = MMapIndexedDataset(str(cache.out / f"shard-0000{i}" / "tail"))
        assert len(ids) == len(lprobs) == len(tail) == end - start
        assert ids.sizes.tolist() == lprobs.sizes.tolist() == (sizes[start:end] * K).tolist()
        assert tail.sizes.tolist() == sizes[start:end].tolist()
        assert int(ids[0].max()) < len(task.tgt_dict)
        # fairseq's reader gives the float16 bits of the log-probs as integers.
        first = lprobs[0].numpy().astype(np.uint16).view(np.float16).reshape(-1, K)
        assert (first <= 0).all() and (np.diff(first, axis=-1) <= 0).all()


@pytest.mark.parametrize("sid", [0, 79, 80, 159, 160, 199])
def test_entries_are_the_teachers_top_k_on_the_gold_prefix(sid, cache, task, teacher):
    dataset = task.dataset("valid")
    frozen = load_frozen_model(str(teacher), task)
    sample = dataset.collater([dataset[sid]])
    net_input = sample["net_input"]
    encoder_out = frozen.encode(net_input["src_tokens"], net_input["src_lengths"])
    logits = frozen.decode(net_input["prev_output_tokens"], encoder_out, net_input["src_lengths"])[0]
    reference = torch.log_softmax(logits.double(), dim=-1)
    length = int(dataset.tgt_sizes[sid])
    assert reference.size(0) == length
    ref_lprobs, ref_ids = reference.topk(K, dim=-1)
    ref_tail = reference.scatter(-1, ref_ids, -math.inf).logsumexp(-1)

    ids, lprobs, tail = TeacherCache(cache.out).batch([sid], length, task.tgt_dict.pad())
    assert ids.shape == (1, length, K) and ids.dtype == torch.long
    assert torch.equal(ids[0], ref_ids)
    # float16: 11 significant bits.
    assert torch.allclose(lprobs[0].double(), ref_lprobs, rtol=1e-3, atol=1e-3)
    assert torch.allclose(tail[0].double(), ref_tail, rtol=1e-3, atol=1e-3)
    assert torch.allclose(lprobs[0].double().exp().sum(-1) + tail[0].double().exp(),
                          torch.ones(length, dtype=torch.float64), atol=2e-3)


def test_batch_is_aligned_with_a_collated_batch_and_padding_costs_nothing(cache, task, teacher):
    dataset, pad = task.dataset("valid"), task.tgt_dict.pad()
    batches = task.get_batch_iterator(dataset, max_tokens=600).next_epoch_itr(shuffle=False)
    sample = next(b for b in batches if b["target"].eq(pad).any())
    target = sample["target"]
    reader = TeacherCache(cache.out)
    ids, lprobs, tail = reader.batch(sample["id"], target.size(1), pad)
    assert ids.shape == lprobs.shape == (*target.shape, K) and tail.shape == target.shape
    assert lprobs.dtype == tail.dtype == torch.float32
    padding = target.eq(pad)
    assert ids[padding].eq(pad).all() and lprobs[padding].eq(-math.inf).all() and tail[padding].eq(-math.inf).all()
    for row, sid in enumerate(sample["id"].tolist()):
        length = int(target[row].ne(pad).sum())
        assert length == dataset.tgt_sizes[sid]
        alone = reader.batch([sid], length, pad)
        assert torch.equal(ids[row, :length], alone[0][0]) and torch.equal(lprobs[row, :length], alone[1][0])

    # The teacher itself as the student: both terms near 0 on real positions, exactly 0 on padding.
    frozen = load_frozen_model(str(teacher), task)
    net_input = sample["net_input"]
    encoder_out = frozen.encode(net_input["src_tokens"], net_input["src_lengths"])
    logits = frozen.decode(net_input["prev_output_tokens"], encoder_out, net_input["src_lengths"]).requires_grad_()
    kl, rank = cached_kd_terms(logits, ids, lprobs, tail, 5)
    assert kl.shape == rank.shape == target.shape
    assert kl.abs().max() < 1e-2 and rank.max() < 1e-5
    assert kl[padding].eq(0).all() and rank[padding].eq(0).all()
    (kl.sum() + rank.sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[padding].eq(0).all()


def _refusal(make_reader, check_args=None):
    with pytest.raises(TeacherCacheError) as err:
        reader = make_reader()
        if check_args:
            reader.check(*check_args)
    message = str(err.value)
    assert "\n" not in message
    return message


def _data_bin_with_valid_from(corpus, dest, subset, count):
    """A copy of the data-bin whose valid subset is the first ``count`` sentences of ``subset``."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

    shutil.copytree(corpus.data_bin, dest)
    for lang in ("en", "de"):
        source = MMapIndexedDataset(str(corpus.data_bin / f"{subset}.en-de.{lang}"))
        builder = MMapIndexedDatasetBuilder(str(dest / f"valid.en-de.{lang}.bin"), dtype=np.uint16)
        for i in range(count):
            builder.add_item(source[i])
        builder.finalize(str(dest / f"valid.en-de.{lang}.idx"))
    return dest


def test_a_cache_that_does_not_fit_the_data_is_refused_in_one_line(cache, task, corpus, tmp_path):
    def reader():
        return TeacherCache(cache.out)

    reader().check(task, "valid", K)
    reader().check(task, "valid", 3)
    where = f"teacher cache {cache.out}"
    assert _refusal(reader, (task, "valid", K + 1)) == (
        f"{where} holds the teacher's top-{K}, fewer than the {K + 1} asked for")
    test_task = translation_task(corpus.data_bin, "test")
    assert _refusal(reader, (test_task, "test", K)) == f"{where} is of subset 'valid', not 'test'"
    fewer = translation_task(_data_bin_with_valid_from(corpus, tmp_path / "fewer", "test", 100), "valid")
    assert _refusal(reader, (fewer, "valid", K)) == f"{where} holds 200 sentences, valid has 100"
    other = translation_task(_data_bin_with_valid_from(corpus, tmp_path / "other", "train", 200), "valid")
    assert _refusal(reader, (other, "valid", K)) == (
        f"{where}: its target lengths differ from those of valid (other data)")
    data_bin_with_swapped_symbols(corpus.data_bin, tmp_path / "swapped")
    swapped = translation_task(tmp_path / "swapped", "valid")
    assert _refusal(reader, (swapped, "valid", K)) == (
        f"{where} was made with another target dictionary (same size, other symbols)")


def test_a_truncated_or_incomplete_cache_is_refused_in_one_line(cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache.out, out)
    data = out / "shard-00001" / "lprobs.bin"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 2)
    assert _refusal(lambda: TeacherCache(out)) == (
        f"teacher cache {out}: {data} is missing or truncated (expected {size} bytes)")
    index = out / "shard-00001" / "ids.idx"
    index.write_bytes(index.read_bytes()[:-8])
    assert _refusal(lambda: TeacherCache(out)) == f"teacher cache {out}: {index} is missing or truncated"
    shutil.rmtree(out / "shard-00002")
    assert _refusal(lambda: TeacherCache(out)) == (
        f"teacher cache {out} is incomplete: 1 of 3 shards missing (shard-00002); rerun tiekd-cache-teacher")
    (out / "meta.json").unlink()
    assert re.fullmatch(rf"teacher cache {re.escape(str(out))}: cannot read meta\.json \(.*\)",
                        _refusal(lambda: TeacherCache(out)))


def test_bad_input_exits_2_with_one_line(corpus, tmp_path):
    proc = run([CACHE_TOOL, "--data-bin", corpus.data_bin, "--subset", "valid", "--teacher", tmp_path / "missing.pt",
                "--kd-topk", K, "--out", tmp_path / "out", "--cpu"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tiekd-cache-teacher: error: teacher checkpoint {tmp_path / 'missing.pt'} does not exist")
    assert not (tmp_path / "out").exists()


BAD_INPUTS = {
    "k": (dict(k=0), r"--kd-topk must be at least 1, not 0"),
    "k above the vocabulary": (dict(k=5000), r"--kd-topk 5000 exceeds the target vocabulary \(\d+ symbols\)"),
    "no such subset": (dict(subset="nosuch"), r"data-bin \S+ has no subset 'nosuch' \(nosuch\.en-de\.\*\)"),
    "max tokens": (dict(max_tokens=5), r"--max-tokens 5 is below the longest sentence of valid \(\d+ tokens\)"),
    "other settings": (dict(k=4), r"\S+ holds a run with other settings \(k 8 there, 4 now\): "
                                  r"rerun with the same arguments or use another --out"),
    "other teacher": (dict(teacher="copy"), r"\S+ holds a run with other settings \(teacher \{'path': '\S+/"
                                            r"checkpoint_best\.pt', .*\} there, \{'path': '\S+/copy/teacher\.pt', "
                                            r".*\} now\): rerun with the same arguments or use another --out"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_the_teacher_runs(case, cache, corpus, teacher, tmp_path):
    out = cache.out if case.startswith("other") else tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in cache.out.rglob("*")}
    overrides, pattern = BAD_INPUTS[case]
    if overrides.get("teacher") == "copy":  # the same weights in another file
        (tmp_path / "copy").mkdir()
        overrides = dict(teacher=shutil.copy(teacher, tmp_path / "copy" / "teacher.pt"))
    args = dict(data_bin=corpus.data_bin, subset="valid", teacher=teacher, k=K, out=out, shard_size=80, cpu=True)
    with pytest.raises(InputError, match=f"^{pattern}$"):
        build_teacher_cache(**{**args, **overrides})
    assert not (tmp_path / "out").exists()
    assert {p: p.stat().st_mtime_ns for p in cache.out.rglob("*")} == before


# The loss on cached teacher knowledge.

def _cached(teacher_lprobs, size):
    """What the cache holds for full teacher log-probs: top-``size`` ids and log-probs, log of the rest."""
    top, ids = teacher_lprobs.topk(size, dim=-1)
    return ids, top, teacher_lprobs.scatter(-1, ids, -math.inf).logsumexp(-1)


def _grad(value, x):
    return torch.autograd.grad(value.sum(), x, retain_graph=True)[0]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_whole_vocabulary_cached_equals_the_full_kl_and_ranking_loss(k):
    gen = torch.Generator().manual_seed(k)
    s = (torch.randn(3, 4, 29, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    teacher = torch.log_softmax(torch.randn(3, 4, 29, dtype=torch.float64, generator=gen) * 3, -1)
    ids, lprobs, tail = _cached(teacher, 29)
    assert tail.eq(-math.inf).all()
    kl, rank = cached_kd_terms(s, ids, lprobs, tail, k)
    ref_kl = kl_divergence(torch.log_softmax(s, -1), teacher)
    ref_rank = hierarchical_ranking_loss(torch.softmax(s, -1), teacher.exp(), k)
    assert torch.allclose(kl, ref_kl, atol=1e-12) and torch.allclose(rank, ref_rank, atol=1e-12)
    w = torch.rand(3, 4, dtype=torch.float64, generator=gen)
    assert torch.allclose(_grad(kl + w * rank, s), _grad(ref_kl + w * ref_rank, s), atol=1e-12)


@pytest.mark.parametrize("k,size", [(1, 4), (3, 4), (4, 4), (5, 10)])
def test_ranking_on_a_partial_cache_is_exact(k, size):
    gen = torch.Generator().manual_seed(10 * k + size)
    s = (torch.randn(6, 5, 40, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    teacher = torch.log_softmax(torch.randn(6, 5, 40, dtype=torch.float64, generator=gen) * 2, -1)
    ids, lprobs, tail = _cached(teacher, size)
    kl, rank = cached_kd_terms(s, ids, lprobs, tail, k)
    ref_rank = hierarchical_ranking_loss(torch.softmax(s, -1), teacher.exp(), k)
    assert torch.allclose(rank, ref_rank, atol=1e-12) and ref_rank.gt(0).any()
    assert torch.allclose(_grad(rank, s), _grad(ref_rank, s), atol=1e-12)
    # Student top-k tokens outside the cache occur, and count as below every cached token.
    student_top = s.detach().topk(k, -1).indices
    assert not (student_top.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).all()
    # K + 1 buckets never exceed the full KL (merging outcomes does not increase a KL).
    assert (kl <= kl_divergence(torch.log_softmax(s, -1), teacher) + 1e-12).all() and kl.gt(0).all()


def test_tail_bucket_hand_computed():
    # Teacher q = [0.5, 0.3, 0.15, 0.05], cached top-2 and tail 0.2; student p = [0.4, 0.2, 0.1, 0.3], p_tail = 0.4.
    q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    p = torch.tensor([0.4, 0.2, 0.1, 0.3], dtype=torch.float64)
    tail = torch.tensor(0.2, dtype=torch.float64).log()
    kl, rank = cached_kd_terms(p.log(), torch.tensor([0, 1]), q[:2].log(), tail, 2)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    # a = [0, 1], b = [0, 3]; token 3 is not cached, so q(1) > q(3): max(0, p(3) - p(1)) = 0.1, the only term.
    assert rank.item() == pytest.approx(0.1, rel=1e-12)
    assert rank.item() == pytest.approx(hierarchical_ranking_loss(p, q, 2).item(), rel=1e-12)


def test_gradcheck_float64_with_a_tail():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    ids, lprobs, tail = _cached(torch.log_softmax(torch.randn(2, 3, 9, dtype=torch.float64, generator=gen), -1), 4)
    for with_rank in (True, False):
        assert torch.autograd.gradcheck(lambda x: cached_kd_terms(x, ids, lprobs, tail, 3, with_rank), (s,))


def test_padding_positions_give_zero_and_no_gradient_and_the_teacher_gets_none():
    s = torch.randn(2, 3, 11, requires_grad=True)
    ids, lprobs, tail = _cached(torch.log_softmax(torch.randn(2, 3, 11), -1), 4)
    lprobs.requires_grad_()
    ids[1], lprobs.data[1], tail[1] = 1, -math.inf, -math.inf  # row 1: padding, as TeacherCache.batch writes it
    kl, rank = cached_kd_terms(s, ids, lprobs, tail, 4)
    assert kl[1].eq(0).all() and rank[1].eq(0).all() and kl[0].gt(0).all()
    (kl.sum() + rank.sum()).backward()
    assert s.grad[1].eq(0).all() and torch.isfinite(s.grad).all() and lprobs.grad is None


def test_half_logits_give_finite_fp32_terms_and_half_gradients():
    s = (torch.randn(4, 6, 500) * 20).half().requires_grad_()
    ids, lprobs, tail = _cached(torch.log_softmax(torch.randn(4, 6, 500) * 20, -1), 8)
    kl, rank = cached_kd_terms(s, ids, lprobs.half(), tail.half(), 5)
    assert kl.dtype == rank.dtype == torch.float32 and torch.isfinite(kl).all() and torch.isfinite(rank).all()
    (kl.sum() + rank.sum()).backward()
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all()


def test_k_above_the_cache_is_rejected():
    ids, lprobs, tail = _cached(torch.log_softmax(torch.randn(2, 10), -1), 4)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.4 \(the cached top-K\), got 5"):
        cached_kd_terms(torch.randn(2, 10), ids, lprobs, tail, 5)
