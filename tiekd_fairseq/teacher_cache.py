"""``tiekd-cache-teacher``: the teacher's top-K on the gold prefix, computed once, read back per batch.

One teacher pass over a binarized subset (eval mode, no gradients, the gold
prefix as fairseq's collater builds it) stores, for every target position of
every sentence (EOS included), the teacher's top-K token ids and log-probabilities
and the log of the probability mass outside them. ``TeacherCache`` reads them
back aligned with a collated batch, for ``losses.cached_kd_terms``.

Layout of the cache folder:

- ``meta.json``: what the cache was made from (``_plan``), its dtypes and shards;
- ``shard-NNNNN/``: the sentences [start, end) of one shard, as three fairseq mmap
  indexed datasets (``NAME.idx`` + ``NAME.bin``) holding one item per sentence, in
  sample-id order: ``ids`` (len*K, uint16, or int32 for vocabularies of 65536 or
  more), ``lprobs`` (len*K, float16) and ``tail`` (len, float16). Items are
  position-major: entry t*K + i is the i-th best token at target position t.
  fairseq's mmap format has no float16 type, so the float16 values are stored as
  their bits in its uint16 slot: fairseq's own reader returns those bits.

A shard is written under a temporary name and renamed when complete: a killed run
leaves no half-written shard, and a rerun computes only the missing ones.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from fairseq import utils
from fairseq.data.indexed_dataset import MMapIndexedDataset
from tqdm import tqdm

from .cli import UsageError, id_list, kill_point, make_output_dir, record_run_settings, require_file, run_tool
from .data_bin import translation_task
from .teacher import TEACHER_DATA_HELP, TeacherError, load_teacher

FORMAT = "tiekd-teacher-cache/1"
DEFAULT_SHARD_SIZE = 50000
# (file name, K values per target position rather than 1, dtype; None for the ids, whose dtype depends
# on the vocabulary). The tail comes first: the other two are checked against its lengths when read.
ARRAYS = (("tail", False, np.float16), ("ids", True, None), ("lprobs", True, np.float16))
logger = logging.getLogger(__name__)


class TeacherCacheError(Exception):
    """A cache that cannot be read or does not fit the data: the message is one line naming the cache."""


def build_teacher_cache(data_bin, subset, teacher, k, out, max_tokens=4096, shard_size=DEFAULT_SHARD_SIZE,
                        cpu=False, teacher_data=None) -> Path:
    """Cache the teacher's top-``k`` on ``subset`` of ``data_bin`` in the folder ``out``; return ``out``.

    Bad input raises UsageError before the teacher runs; a rerun with the same
    settings computes only the shards that are not finished.
    """
    out = Path(out)
    for flag, value in (("--topk", k), ("--max-tokens", max_tokens), ("--shard-size", shard_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    require_file(teacher, "teacher checkpoint")
    task = translation_task(data_bin, subset)
    dataset, vocab = task.dataset(subset), len(task.tgt_dict)
    if k > vocab:
        raise UsageError(f"--topk {k} exceeds the target vocabulary ({vocab} symbols)")
    longest = int(max(dataset.src_sizes.max(), dataset.tgt_sizes.max()))
    if max_tokens < longest:
        raise UsageError(f"--max-tokens {max_tokens} is below the longest sentence of {subset} ({longest} tokens)")
    make_output_dir(out)
    try:
        frozen = load_teacher(str(teacher), task, teacher_data)
    except TeacherError as err:
        raise UsageError(str(err)) from None
    for side, sizes, limit in zip(("source", "target"), (dataset.src_sizes, dataset.tgt_sizes),
                                  frozen.model.max_positions()):
        too_long = np.flatnonzero(sizes > limit).tolist()
        if too_long:
            raise UsageError(f"{len(too_long)} {subset} sentences are longer than the teacher's {limit} "
                             f"{side} positions (ids {id_list(too_long)})")

    meta = _plan(data_bin, subset, task, teacher, k, shard_size)
    record_run_settings(out / "meta.json", meta)
    pending = [i for i in range(len(meta["shards"])) if not (out / _shard_name(i)).is_dir()]
    logger.info("%s %s: %d sentences in %d shards, %d already cached",
                data_bin, subset, len(dataset), len(meta["shards"]), len(meta["shards"]) - len(pending))
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    frozen.model.to(device)
    ids_dtype, shards = np.dtype(meta["dtypes"]["ids"]), meta["shards"]
    with tqdm(total=sum(shards[i][1] - shards[i][0] for i in pending), unit="sentence",
              desc=f"teacher top-{k} on {subset}") as bar:
        for i in pending:
            _cache_shard(frozen, dataset, *shards[i], k, ids_dtype, max_tokens, device, out / _shard_name(i), bar)

    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"{out}: {meta['positions']} target positions x top-{k}, {size} bytes on disk "
          f"({size / (meta['positions'] * k):.2f} bytes per position per K)")
    return out


def _plan(data_bin, subset, task, teacher, k, shard_size):
    """meta.json: the data, dictionary and teacher the cache is made of, and how it is stored."""
    sizes = task.dataset(subset).tgt_sizes
    count = len(sizes)
    return {
        "format": FORMAT, "data_bin": str(Path(data_bin).resolve()), "subset": subset,
        "source_lang": task.cfg.source_lang, "target_lang": task.cfg.target_lang,
        "sentences": count, "positions": int(sizes.sum()), "target_sizes_sha256": _sizes_digest(sizes),
        "dictionary_size": len(task.tgt_dict), "dictionary_sha256": _dictionary_digest(task.tgt_dict),
        "k": k, "teacher": str(Path(teacher).resolve()),
        "teacher_bytes": os.path.getsize(teacher), "teacher_mtime_ns": os.stat(teacher).st_mtime_ns,
        "dtypes": {"ids": "uint16" if len(task.tgt_dict) < 2**16 else "int32",
                   "lprobs": "float16", "tail": "float16"},
        "shards": [[start, min(start + shard_size, count)] for start in range(0, count, shard_size)],
    }


def _sizes_digest(sizes):
    return hashlib.sha256(np.asarray(sizes, dtype="<i8").tobytes()).hexdigest()


def _dictionary_digest(dictionary):
    # The symbols in index order are what the cached ids mean; the counts in dict.txt are not.
    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def _shard_name(i):
    return f"shard-{i:05d}"


def _cache_shard(frozen, dataset, start, end, k, ids_dtype, max_tokens, device, shard_dir, bar):
    """Run the teacher on sentences start..end-1 in fairseq's length-sorted batches; write the shard."""
    partial = shard_dir.with_name(f".{shard_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left over by a killed run
    partial.mkdir()
    lengths = dataset.tgt_sizes[start:end].astype(np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)])  # first[i - start]: first position of sentence i
    # Batches come in length order, not id order: each sentence is written in place at its offset.
    positions = int(first[-1])
    arrays = {name: np.memmap(partial / f"{name}.bin", dtype=dtype or ids_dtype, mode="w+",
                              shape=(positions, k) if per_k else (positions,))
              for name, per_k, dtype in ARRAYS}
    order = dataset.ordered_indices()
    order = order[(order >= start) & (order < end)]
    for batch in dataset.batch_by_size(order, max_tokens=max_tokens):
        sample = utils.apply_to_sample(lambda t: t.to(device), dataset.collater([dataset[i] for i in batch]))
        top_ids, top_lprobs, tail = teacher_topk(frozen, sample["net_input"], k)
        values = {"ids": top_ids.cpu().numpy(), "lprobs": top_lprobs.half().cpu().numpy(),
                  "tail": tail.half().cpu().numpy()}
        for row, sid in enumerate(sample["id"].tolist()):
            lo, hi = first[sid - start], first[sid - start + 1]
            for name, array in arrays.items():
                array[lo:hi] = values[name][row, :hi - lo]
        bar.update(len(batch))
        kill_point(shard_dir.name)
    for name, per_k, dtype in ARRAYS:
        arrays[name].flush()
        with MMapIndexedDataset.Index.writer(str(partial / f"{name}.idx"), _storage_dtype(dtype or ids_dtype)) as idx:
            idx.write(lengths * (k if per_k else 1))
    del arrays
    os.rename(partial, shard_dir)


def _storage_dtype(dtype):
    """The fairseq mmap dtype a file is declared with: its format has no float16, which goes in as uint16 bits."""
    return np.uint16 if np.dtype(dtype) == np.float16 else np.dtype(dtype).type


@torch.no_grad()
def teacher_topk(frozen, net_input, k):
    """(ids (B, T, k), log-probs (B, T, k), log of the mass outside them (B, T)) of the teacher on the gold prefix."""
    lprobs = frozen.gold_prefix_lprobs(net_input).float()
    top_lprobs, top_ids = lprobs.topk(k, dim=-1)
    # log(1 - sum of the top-k probabilities) as a logsumexp over the others: no cancellation near 1.
    tail = lprobs.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1)
    return top_ids, top_lprobs, tail


class TeacherCache:
    """A finished cache of ``tiekd-cache-teacher``, memory-mapped; ``check`` it against the task before use."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise TeacherCacheError(f"teacher cache {self.path}: cannot read meta.json ({err})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise TeacherCacheError(f"teacher cache {self.path}: meta.json is not of a {FORMAT} cache")
        self.k = self.meta["k"]
        shards = self.meta["shards"]
        missing = [_shard_name(i) for i in range(len(shards)) if not (self.path / _shard_name(i)).is_dir()]
        if missing:
            raise TeacherCacheError(f"teacher cache {self.path} is incomplete: {len(missing)} of {len(shards)} "
                                    f"shards missing ({', '.join(missing[:5])}); rerun tiekd-cache-teacher")
        self._starts = np.array([start for start, _ in shards])
        self._shards = [self._open_shard(self.path / _shard_name(i), end - start)
                        for i, (start, end) in enumerate(shards)]
        lengths = np.concatenate([shard["tail"][0] for shard in self._shards])
        if _sizes_digest(lengths) != self.meta["target_sizes_sha256"]:
            raise TeacherCacheError(f"teacher cache {self.path}: its shards do not hold the sentence lengths "
                                    "recorded in meta.json")

    def _open_shard(self, shard_dir, count):
        """{name: (sentence lengths, item offsets in values, values)} for the three arrays of a shard, checked."""
        arrays = {}
        for name, per_k, dtype in ARRAYS:
            dtype = np.dtype(dtype or self.meta["dtypes"]["ids"])
            idx, bin_ = shard_dir / f"{name}.idx", shard_dir / f"{name}.bin"
            # fairseq's index: 9-byte magic, version, dtype code, count, then int32 sizes and int64 pointers.
            if not idx.is_file() or idx.stat().st_size != 26 + 12 * count:
                raise TeacherCacheError(f"teacher cache {self.path}: {idx} is missing or truncated")
            index = MMapIndexedDataset.Index(str(idx))
            if len(index) != count or index.dtype != _storage_dtype(dtype):
                raise TeacherCacheError(f"teacher cache {self.path}: {idx} does not index {count} {dtype} items")
            sizes = np.array(index.sizes, dtype=np.int64)
            expected = int(sizes.sum()) * dtype.itemsize
            if not bin_.is_file() or bin_.stat().st_size != expected:
                raise TeacherCacheError(f"teacher cache {self.path}: {bin_} is missing or truncated "
                                        f"(expected {expected} bytes)")
            per_position = self.k if per_k else 1
            if "tail" in arrays and not np.array_equal(sizes, arrays["tail"][0] * per_position):
                raise TeacherCacheError(f"teacher cache {self.path}: {idx} and {shard_dir / 'tail.idx'} disagree "
                                        "on the sentence lengths")
            pointers = np.array([index[i][0] for i in range(count)], dtype=np.int64) // dtype.itemsize
            arrays[name] = (sizes // per_position, pointers, np.memmap(bin_, dtype=dtype, mode="r"))
        return arrays

    def check(self, task, subset, k):
        """Refuse, with a TeacherCacheError, a cache not made for ``subset`` of ``task`` or holding fewer than k."""
        meta, where = self.meta, f"teacher cache {self.path}"
        if meta["subset"] != subset:
            raise TeacherCacheError(f"{where} is of subset {meta['subset']!r}, not {subset!r}")
        dataset = task.dataset(subset)
        if len(dataset) != meta["sentences"]:
            raise TeacherCacheError(f"{where} holds {meta['sentences']} sentences, {subset} has {len(dataset)}")
        if _sizes_digest(dataset.tgt_sizes) != meta["target_sizes_sha256"]:
            raise TeacherCacheError(f"{where}: its target lengths differ from those of {subset} (other data)")
        if len(task.tgt_dict) != meta["dictionary_size"]:
            raise TeacherCacheError(f"{where} was made with another target dictionary "
                                    f"({meta['dictionary_size']} symbols there, {len(task.tgt_dict)} here)")
        if _dictionary_digest(task.tgt_dict) != meta["dictionary_sha256"]:
            raise TeacherCacheError(f"{where} was made with another target dictionary (same size, other symbols)")
        if k > self.k:
            raise TeacherCacheError(f"{where} holds the teacher's top-{self.k}, fewer than the {k} asked for")

    def batch(self, sample_ids, target_length, pad):
        """(ids (B, T, K) long, lprobs (B, T, K) float32, tail_logmass (B, T) float32) for a collated batch.

        Row b is sentence ``sample_ids[b]``, right-padded to T = ``target_length`` like
        fairseq's targets. Padded positions hold ids ``pad`` and log-probs and tail
        -inf: a teacher with no mass there, on which ``cached_kd_terms`` gives 0 and
        no gradient.
        """
        sample_ids = torch.as_tensor(sample_ids).tolist()
        k, count = self.k, self.meta["sentences"]
        ids = torch.full((len(sample_ids), target_length, k), pad, dtype=torch.long)
        lprobs = torch.full((len(sample_ids), target_length, k), float("-inf"))
        tail = torch.full((len(sample_ids), target_length), float("-inf"))
        for row, sid in enumerate(sample_ids):
            if not 0 <= sid < count:
                raise TeacherCacheError(f"teacher cache {self.path} has no sentence {sid} (it holds {count})")
            shard_index = int(np.searchsorted(self._starts, sid, side="right")) - 1
            local = sid - self._starts[shard_index]
            shard = self._shards[shard_index]
            length = int(shard["tail"][0][local])
            if length > target_length:
                raise TeacherCacheError(f"teacher cache {self.path}: sentence {sid} has {length} target positions, "
                                        f"more than the batch's {target_length}")
            for name, out in (("ids", ids), ("lprobs", lprobs), ("tail", tail)):
                _, pointers, values = shard[name]
                dest = out[row, :length]
                item = values[pointers[local]:pointers[local] + dest.numel()]
                dest.copy_(torch.from_numpy(item.astype(np.int64 if name == "ids" else np.float32).reshape(dest.shape)))
        return ids, lprobs, tail


def main(argv=None):
    run_tool("tiekd-cache-teacher", _main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="tiekd-cache-teacher",
        description="Cache the teacher's top-K token ids and log-probabilities, and the log of its remaining "
        "mass, at every target position of a subset (gold prefix), for KD without running the teacher.",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq-preprocess output holding the subset")
    parser.add_argument("--subset", default="train", help="subset to cache (default: train)")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--topk", type=int, required=True, help="K: tokens cached per position")
    parser.add_argument("--out", required=True, help="cache folder: meta.json and shard-NNNNN/")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per teacher batch (default: 4096)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"sentences per shard, the unit of resumption (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    args = parser.parse_args(argv)
    build_teacher_cache(args.data_bin, args.subset, args.teacher, args.topk, args.out, max_tokens=args.max_tokens,
                        shard_size=args.shard_size, cpu=args.cpu, teacher_data=args.teacher_data)
