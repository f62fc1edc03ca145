"""Source-only (monolingual) shards, and the training set that alternates them with parallel batches.

A shard is a folder made by ``fairseq-preprocess --only-source --source-lang SRC
--srcdict DATA/dict.SRC.txt --trainpref TEXT --destdir SHARD``. Batches are
alternated, never mixed: each batch is all parallel or all source-only, so a
step runs one kind of loss. The batch list is built from the epoch number
alone, identically on every rank, before fairseq shuffles it with its seed and
deals batch i to rank i mod world size.
"""

import logging
import os

import numpy as np
from fairseq.data import Dictionary, FairseqDataset, LanguagePairDataset, data_utils

from ..errors import InputError
from .dictionaries import dictionary_difference

logger = logging.getLogger(__name__)


class MonoDataError(InputError):
    """A shard that cannot be used; the message is one line naming the folder and what is wrong."""


def shard_prefix(path, src):
    """The path prefix of a shard's binarized sentences (``.idx``/``.bin``)."""
    return os.path.join(path, f"train.{src}-None.{src}")


def check_shard(path, src, src_dict):
    """Refuse a shard that is missing, empty, or binarized with another dictionary, before training."""
    prefix = shard_prefix(path, src)
    for ext in ("idx", "bin"):
        if not os.path.isfile(f"{prefix}.{ext}"):
            raise MonoDataError(
                f"source-only shard {path} has no {os.path.basename(prefix)}.{ext} "
                f"(make it with fairseq-preprocess --only-source --source-lang {src} --srcdict DATA/dict.{src}.txt)"
            )
    dict_path = os.path.join(path, f"dict.{src}.txt")
    if os.path.isfile(dict_path):
        diff = dictionary_difference(src_dict, Dictionary.load(dict_path), "shard")
        if diff:
            raise MonoDataError(f"source-only shard {path} was binarized with another dictionary ({dict_path}): {diff}")
    # An empty .bin cannot even be memory-mapped.
    tokens = data_utils.load_indexed_dataset(prefix, src_dict) if os.path.getsize(f"{prefix}.bin") else None
    if tokens is None or len(tokens) == 0:
        raise MonoDataError(f"source-only shard {path} holds no sentences")
    # Without the dictionary file, out-of-range ids are the sign of another vocabulary.
    largest = max(int(tokens[i].max()) for i in range(len(tokens)))
    if largest >= len(src_dict):
        raise MonoDataError(
            f"source-only shard {path} holds token id {largest}, beyond the {len(src_dict)}-symbol source dictionary"
        )
    return tokens


def load_shard(path, src, src_dict, left_pad_source):
    """A checked shard as a source-only ``LanguagePairDataset``."""
    tokens = check_shard(path, src, src_dict)
    return LanguagePairDataset(tokens, tokens.sizes, src_dict, left_pad_source=left_pad_source)


class ParallelWithMono(FairseqDataset):
    """Indices [0, P) are the parallel set, [P, P + M) the source-only shard.

    ``batch_by_size`` batches each part on its own, then keeps enough source-only
    batches for them to be ``ratio`` of all batches (all of them if the shard is
    too small, which is logged).
    """

    def __init__(self, parallel, mono, ratio):
        super().__init__()
        self.parallel, self.mono, self.ratio = parallel, mono, ratio
        self.offset = len(parallel)
        self.epoch = 1

    def __len__(self):
        return self.offset + len(self.mono)

    def _part(self, index):
        return (self.parallel, index) if index < self.offset else (self.mono, index - self.offset)

    def __getitem__(self, index):
        part, i = self._part(index)
        item = part[i]
        if part is self.mono:
            item["id"] = index
        return item

    def collater(self, samples):
        if not samples:
            return {}
        if samples[0].get("target") is not None:
            return self.parallel.collater(samples)
        batch = self.mono.collater(samples)
        batch["mono"] = True
        return batch

    def num_tokens(self, index):
        part, i = self._part(index)
        return part.num_tokens(i)

    def num_tokens_vec(self, indices):
        return np.array([self.num_tokens(i) for i in indices], dtype=np.int64)

    def size(self, index):
        part, i = self._part(index)
        return part.size(i)

    @property
    def sizes(self):
        return np.concatenate([self.parallel.src_sizes, self.mono.src_sizes])

    def ordered_indices(self):
        return np.concatenate([self.parallel.ordered_indices(), self.mono.ordered_indices() + self.offset])

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.parallel.set_epoch(epoch)

    @property
    def supports_prefetch(self):
        return False

    def filter_indices_by_size(self, indices, max_sizes):
        par, mono = indices[indices < self.offset], indices[indices >= self.offset] - self.offset
        par, par_ignored = self.parallel.filter_indices_by_size(par, max_sizes)
        mono, mono_ignored = self.mono.filter_indices_by_size(mono, max_sizes)
        if len(mono_ignored):
            logger.warning("source-only shard: skipped %d sentences longer than the max positions", len(mono_ignored))
        # Skipped source-only lines are counted above; only parallel ones go back to fairseq's own check.
        return np.concatenate([par, mono + self.offset]), list(par_ignored)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        par, mono = indices[indices < self.offset], indices[indices >= self.offset] - self.offset
        par_batches = self.parallel.batch_by_size(par, max_tokens, max_sentences, required_batch_size_multiple)
        mono_batches = self.mono.batch_by_size(mono, max_tokens, max_sentences, required_batch_size_multiple)
        wanted = int(round(self.ratio / (1 - self.ratio) * len(par_batches)))
        if wanted > len(mono_batches):
            logger.warning(
                "source-only shard has %d batches, fewer than the %d that --mono-ratio %g asks for: using all",
                len(mono_batches), wanted, self.ratio,
            )
            wanted = len(mono_batches)
        # Chosen from the epoch alone, so every rank keeps the same batches.
        keep = np.random.RandomState(self.epoch).permutation(len(mono_batches))[:wanted]
        chosen = [mono_batches[i] + self.offset for i in sorted(keep)]
        logger.info("epoch %d: %d parallel and %d source-only batches", self.epoch, len(par_batches), len(chosen))
        return list(par_batches) + chosen
