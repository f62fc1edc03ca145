"""``tiekd-cache-teacher``: the teacher's top-K on the gold prefix of a subset, computed once for training.

The cache's format and its reader are the plugin's (``tiekd_fairseq.data.teacher_cache``).
``--out`` is a run folder (``RunFolder``) whose settings are the cache's ``meta.json``,
the teacher identified by its file; each shard is written into a staged folder
and renamed when complete, so a killed run leaves no half-written shard and a
rerun computes only the missing ones.
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tiekd_fairseq.data.data_bin import translation_task
from tiekd_fairseq.data.dictionaries import TEACHER_DATA_HELP
from tiekd_fairseq.data.teacher_cache import cache_metadata, shard_name, write_shard
from tiekd_fairseq.frozen_model import load_frozen_model

from .files import file_fingerprint, kill_point
from .run_folder import RunFolder
from .shell import UsageError, id_list, positive, run_tool

DEFAULT_SHARD_SIZE = 50000
logger = logging.getLogger(__name__)


def build_teacher_cache(data_bin, subset, teacher, k, out, max_tokens=4096, shard_size=DEFAULT_SHARD_SIZE,
                        cpu=False, teacher_data=None) -> Path:
    """Cache the teacher's top-``k`` on ``subset`` of ``data_bin`` in the run folder ``out``, every input checked
    before anything is written; return ``out``.

    Args:
        data_bin, subset: the data-bin and the subset to cache.
        teacher, teacher_data: the teacher checkpoint and the folder of its dictionaries.
        k: K, tokens cached per position; max_tokens: per teacher batch; shard_size: sentences per shard.
        cpu: run on the CPU even when CUDA is available.
    """
    out = Path(out)
    positive(**{"--kd-topk": k, "--max-tokens": max_tokens, "--shard-size": shard_size})
    task = translation_task(data_bin, subset)
    dataset, vocab = task.dataset(subset), len(task.tgt_dict)
    if k > vocab:
        raise UsageError(f"--kd-topk {k} exceeds the target vocabulary ({vocab} symbols)")
    longest = int(max(dataset.src_sizes.max(), dataset.tgt_sizes.max()))
    if max_tokens < longest:
        raise UsageError(f"--max-tokens {max_tokens} is below the longest sentence of {subset} ({longest} tokens)")
    frozen = load_frozen_model(str(teacher), task, teacher_data)
    for side, sizes, limit in zip(("source", "target"), (dataset.src_sizes, dataset.tgt_sizes),
                                  frozen.model.max_positions()):
        too_long = np.flatnonzero(sizes > limit).tolist()
        if too_long:
            raise UsageError(f"{len(too_long)} {subset} sentences are longer than the teacher's {limit} "
                             f"{side} positions (ids {id_list(too_long)})")

    meta = cache_metadata(data_bin, subset, task, file_fingerprint(teacher), k, shard_size)
    with RunFolder(out, meta, "tiekd-cache-teacher", settings_file="meta.json") as folder:
        shards = meta["shards"]
        pending = [i for i in range(len(shards)) if not (out / shard_name(i)).is_dir()]
        logger.info("%s %s: %d sentences in %d shards, %d already cached",
                    data_bin, subset, len(dataset), len(shards), len(shards) - len(pending))
        device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
        frozen.model.to(device)
        ids_dtype = np.dtype(meta["dtypes"]["ids"])
        with tqdm(total=sum(shards[i][1] - shards[i][0] for i in pending), unit="sentence",
                  desc=f"teacher top-{k} on {subset}") as bar:
            for i in pending:
                _cache_shard(folder, frozen, dataset, *shards[i], k, ids_dtype, max_tokens, device, shard_name(i),
                             bar)

    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"{out}: {meta['positions']} target positions x top-{k}, {size} bytes on disk "
          f"({size / (meta['positions'] * k):.2f} bytes per position per K)")
    return out


def _cache_shard(folder, frozen, dataset, start, end, k, ids_dtype, max_tokens, device, name, bar):
    """Write the shard of sentences start..end-1 into a staged folder, renamed to ``name`` in ``folder`` when whole."""

    def after_batch(sentences):
        bar.update(sentences)
        kill_point(name)

    with folder.staged(folder.path / name) as partial:
        write_shard(frozen, dataset, start, end, k, ids_dtype, max_tokens, device, partial, after_batch)


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
    parser.add_argument("--kd-topk", type=int, required=True,
                        help="K: tokens cached per position (at least the --kd-topk of the training run)")
    parser.add_argument("--out", required=True, help="cache folder: meta.json and shard-NNNNN/")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per teacher batch (default: 4096)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"sentences per shard, the unit of resumption (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    args = parser.parse_args(argv)
    build_teacher_cache(args.data_bin, args.subset, args.teacher, args.kd_topk, args.out, max_tokens=args.max_tokens,
                        shard_size=args.shard_size, cpu=args.cpu, teacher_data=args.teacher_data)
