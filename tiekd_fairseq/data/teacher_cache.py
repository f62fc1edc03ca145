"""The teacher cache: the teacher's top-K on the gold prefix of a subset, written once, read back per batch.

``tiekd-cache-teacher`` runs the teacher once over a binarized subset (eval mode,
no gradients, the gold prefix as fairseq's collater builds it) and stores, for
every target position of every sentence (EOS included), the teacher's top-K token
ids and log-probabilities and the log of the probability mass outside them.
``TeacherCache`` reads them back aligned with a collated batch, for
``tiekd.cached_kd_terms``.

Layout of the cache folder:

- ``meta.json``: what the cache was made from (``cache_metadata``), its dtypes and shards;
- ``shard-NNNNN/``: the sentences [start, end) of one shard, as three fairseq mmap
  indexed datasets (``NAME.idx`` + ``NAME.bin``) holding one item per sentence, in
  sample-id order: ``ids`` (len*K, uint16, or int32 for vocabularies of 65536 or
  more), ``lprobs`` (len*K, float16) and ``tail`` (len, float16). Items are
  position-major: entry t*K + i is the i-th best token at target position t.
  fairseq's mmap format has no float16 type, so the float16 values are stored as
  their bits in its uint16 slot: fairseq's own reader returns those bits.

A shard is written under a temporary name and renamed when complete (``write_shard``
fills the folder it is given): a killed run leaves no half-written shard.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from fairseq import utils
from fairseq.data.indexed_dataset import MMapIndexedDataset

from ..errors import InputError

FORMAT = "tiekd-teacher-cache/1"
# (file name, K values per target position rather than 1, dtype; None for the ids, whose dtype depends
# on the vocabulary). The tail comes first: the other two are checked against its lengths when read.
ARRAYS = (("tail", False, np.float16), ("ids", True, None), ("lprobs", True, np.float16))


class TeacherCacheError(InputError):
    """A cache that cannot be read or does not fit the data: the message is one line naming the cache."""


def cache_metadata(data_bin, subset, task, teacher, k, shard_size):
    """meta.json of a new cache: the data, dictionary and teacher it is made of, and how it is stored.

    Args:
        data_bin, subset: where the sentences come from; task: a translation task with ``subset`` loaded.
        teacher: what identifies the teacher checkpoint (any JSON value).
        k: K, tokens cached per position; shard_size: sentences per shard.
    """
    sizes = task.dataset(subset).tgt_sizes
    count = len(sizes)
    return {
        "format": FORMAT, "data_bin": str(Path(data_bin).resolve()), "subset": subset,
        "source_lang": task.cfg.source_lang, "target_lang": task.cfg.target_lang,
        "sentences": count, "positions": int(sizes.sum()), "target_sizes_sha256": _sizes_digest(sizes),
        "dictionary_size": len(task.tgt_dict), "dictionary_sha256": _dictionary_digest(task.tgt_dict),
        "k": k, "teacher": teacher,
        "dtypes": {"ids": "uint16" if len(task.tgt_dict) < 2**16 else "int32",
                   "lprobs": "float16", "tail": "float16"},
        "shards": [[start, min(start + shard_size, count)] for start in range(0, count, shard_size)],
    }


def _sizes_digest(sizes):
    return hashlib.sha256(np.asarray(sizes, dtype="<i8").tobytes()).hexdigest()


def _dictionary_digest(dictionary):
    # The symbols in index order are what the cached ids mean; the counts in dict.txt are not.
    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def shard_name(i):
    """The folder name of shard ``i``."""
    return f"shard-{i:05d}"


def write_shard(frozen, dataset, start, end, k, ids_dtype, max_tokens, device, folder, after_batch=None):
    """Run the teacher on sentences start..end-1 in fairseq's length-sorted batches; write the shard into ``folder``.

    Args:
        frozen: the teacher (``FrozenModel``) on ``device``.
        dataset: the subset's ``LanguagePairDataset``; start, end: the sentence ids of the shard.
        k: K; ids_dtype: numpy dtype of the ids (``meta["dtypes"]["ids"]``); max_tokens: per batch.
        folder: an empty folder, renamed into place by the caller once this returns.
        after_batch: called with the number of sentences of each batch done.
    """
    partial = Path(folder)
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
        if after_batch is not None:
            after_batch(len(batch))
    for name, per_k, dtype in ARRAYS:
        arrays[name].flush()
        with MMapIndexedDataset.Index.writer(str(partial / f"{name}.idx"), _storage_dtype(dtype or ids_dtype)) as idx:
            idx.write(lengths * (k if per_k else 1))
    del arrays


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
        missing = [shard_name(i) for i in range(len(shards)) if not (self.path / shard_name(i)).is_dir()]
        if missing:
            raise TeacherCacheError(f"teacher cache {self.path} is incomplete: {len(missing)} of {len(shards)} "
                                    f"shards missing ({', '.join(missing[:5])}); rerun tiekd-cache-teacher")
        self._starts = np.array([start for start, _ in shards])
        self._shards = [self._open_shard(self.path / shard_name(i), end - start)
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
