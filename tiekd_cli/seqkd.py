"""``tiekd-seqkd``: sequence-level KD data, the teacher's beam output as the target side of a new data-bin.

The teacher decodes the source side of one subset with ``fairseq-generate``, one
shard (a contiguous range of sentence ids) at a time, in half precision on GPUs,
one process per GPU, each taking the next shard nobody has taken. ``--out`` is a
run folder (``RunFolder``: ``settings.json``, ``.lock``); a finished shard is a
file in ``shards/``, so a killed run resumes at the unfinished ones. The output is
written shard by shard in corpus order, so memory does not grow with the corpus.
The result is a data-bin with the same dictionaries, the original binarized source
and the teacher's output, in the same subword vocabulary, as target; the other
subsets are copied.
"""

import argparse
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from queue import SimpleQueue

from fairseq.data import data_utils, indexed_dataset
from tqdm import tqdm

from tiekd_fairseq.data.data_bin import language_pair, translation_task
from tiekd_fairseq.data.dictionaries import TEACHER_DATA_HELP
from tiekd_fairseq.frozen_model import load_frozen_model

from .fairseq_runner import GENERATE_FLAGS, run_fairseq
from .files import atomic_write, atomic_write_text, file_fingerprint, require_file
from .generate_output import generated_hypotheses, in_corpus_order
from .run_folder import RunFolder
from .shell import UsageError, id_list, positive, run_tool

DEFAULT_SHARD_SIZE = 50000
# Room above the longest target of the subset relative to its source, in tokens.
MAX_LEN_ROOM = 10
logger = logging.getLogger(__name__)


def build_seqkd_data(data_bin, subset, teacher, out, beam=5, lenpen=1.0, max_tokens=4096, shards=None,
                     shard_size=DEFAULT_SHARD_SIZE, cpu=False, precision=None, workers=None, max_len_a=None,
                     max_len_b=None, source_lang=None, target_lang=None, teacher_data=None) -> Path:
    """Decode ``subset`` of ``data_bin`` with ``teacher`` into the run folder ``out``, every input checked before
    anything is written; return the new data-bin ``out/data-bin``.

    ``out`` also holds ``<subset>.<tgt>`` (the teacher's output, tokenized, in corpus order) and ``shards/``
    (the finished shards: a rerun decodes only the others).

    Args:
        data_bin, subset: the data-bin and the subset whose source the teacher decodes.
        teacher, teacher_data: the teacher checkpoint and the folder of its dictionaries.
        beam, lenpen, max_tokens: of fairseq-generate.
        shards, shard_size: the number of shards, or else the sentences per shard.
        cpu: decode on the CPU; precision: ``fp16`` or ``fp32`` (default: fp16 on GPUs, fp32 on the CPU).
        workers: fairseq-generate processes at a time (default: one per visible GPU; 1 on the CPU).
        max_len_a, max_len_b: the output length bound ``a * source length + b`` (default: from the subset's
            target side, so that no training target would be cut).
        source_lang, target_lang: default: from the subset's file names.
    """
    data_bin, out = Path(data_bin), Path(out)
    positive(**{"--beam": beam, "--max-tokens": max_tokens, "--shards": shards, "--shard-size": shard_size,
                "--workers": workers})
    precision = precision or ("fp32" if cpu else "fp16")
    src, tgt = language_pair(data_bin, subset, source_lang, target_lang)
    task = translation_task(data_bin, None, src, tgt)
    source_prefix = data_bin / f"{subset}.{src}-{tgt}.{src}"
    for ext in ("idx", "bin"):
        require_file(f"{source_prefix}.{ext}", f"binarized {subset} source")
    sources = data_utils.load_indexed_dataset(str(source_prefix), task.src_dict)
    if len(sources) == 0:
        raise UsageError(f"{source_prefix}.idx holds no sentences")
    # The teacher's own position limits, not the task's default 1024: they decide which sentences
    # fairseq-generate accepts.
    max_source, max_target = load_frozen_model(str(teacher), task, teacher_data).model.max_positions()
    too_long = [i for i, size in enumerate(sources.sizes) if size > max_source]
    if too_long:
        raise UsageError(f"{len(too_long)} {subset} sentences are longer than the teacher's {max_source} "
                         f"source positions (ids {id_list(too_long)})")
    max_len_a, max_len_b = _length_bound(data_bin / f"{subset}.{src}-{tgt}.{tgt}", sources.sizes, max_len_a,
                                         max_len_b)
    devices = _devices(cpu, workers)

    count = min(shards or math.ceil(len(sources) / shard_size), len(sources))
    settings = {
        "data_bin": str(data_bin.resolve()), "subset": subset, "source_lang": src, "target_lang": tgt,
        "sentences": len(sources), "teacher": file_fingerprint(teacher), "beam": beam, "lenpen": lenpen,
        "shards": count, "precision": precision, "max_len_a": max_len_a, "max_len_b": max_len_b,
    }
    with RunFolder(out, settings, "tiekd-seqkd") as folder:
        final = out / "data-bin"
        if final.is_dir():
            logger.info("%s is already built", final)
            return final
        generate_args = [
            *GENERATE_FLAGS, "--source-lang", src, "--target-lang", tgt,
            "--path", teacher, "--gen-subset", subset, "--beam", beam, "--lenpen", lenpen, "--nbest", 1,
            "--max-tokens", max_tokens, "--max-source-positions", max_source, "--max-target-positions", max_target,
            "--max-len-a", max_len_a, "--max-len-b", max_len_b,
            *(["--fp16"] if precision == "fp16" else []), *(["--cpu"] if cpu else []),
        ]
        shard_dir = out / "shards"
        shard_dir.mkdir(exist_ok=True)
        bounds = [(len(sources) * i // count, len(sources) * (i + 1) // count) for i in range(count)]
        pending = [i for i in range(count) if not _shard_file(shard_dir, i).is_file()]
        logger.info("%s %s: %d sentences in %d shards, %d already decoded; %d processes, %s",
                    data_bin, subset, len(sources), count, count - len(pending), len(devices), precision)
        free = SimpleQueue()
        for env in devices:
            free.put(env)

        def decode(i):
            env = free.get()  # a device no other running shard holds
            try:
                _decode_shard(sources, *bounds[i], task, subset, _shard_file(shard_dir, i), generate_args, env)
            finally:
                free.put(env)

        with tqdm(total=count, initial=count - len(pending), unit="shard", desc=f"teacher decodes {subset}") as bar, \
                ThreadPoolExecutor(len(devices)) as pool:
            jobs = [pool.submit(decode, i) for i in pending]
            try:
                for job in as_completed(jobs):
                    job.result()
                    bar.update()
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise

        text_prefix = out / subset
        atomic_write(f"{text_prefix}.{tgt}", lambda f: _write_in_order(
            f, [(_shard_file(shard_dir, i), bounds[i]) for i in range(count)]))
        with folder.staged(final) as partial:
            _build_data_bin(data_bin, subset, src, tgt, text_prefix, partial)
    logger.info("%s: %s = original source and teacher output, other subsets copied", final, subset)
    return final


def _devices(cpu, workers):
    """The added environment of each decoding process: one visible GPU each (round robin), or CPU threads."""
    if cpu:
        workers = workers or 1
        return [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}] * workers
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError("no GPU is visible: pass --cpu to decode on the CPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": ids[i % count]} for i in range(workers or count)]


def _length_bound(target_prefix, source_sizes, max_len_a, max_len_b):
    """(a, b) of fairseq-generate's length bound; unset ones from the subset's target side, else a clear error.

    The default a is the largest target/source length ratio of the subset rounded up to a hundredth,
    so ``a * source length + b`` is above every target (EOS counted on both sides).
    """
    if max_len_a is not None and max_len_b is not None:
        return max_len_a, max_len_b
    if not Path(f"{target_prefix}.idx").is_file():
        raise UsageError(f"{target_prefix}.idx does not exist, so the output length cannot be sized from the "
                         "targets: give --max-len-a and --max-len-b")
    targets = indexed_dataset.make_dataset(str(target_prefix), impl="mmap")
    if targets is None or len(targets.sizes) != len(source_sizes):
        raise UsageError(f"{target_prefix}.idx does not hold one target per source sentence")
    ratio = max(t / s for t, s in zip(targets.sizes.tolist(), source_sizes.tolist()))
    return (math.ceil(ratio * 100) / 100 if max_len_a is None else max_len_a,
            MAX_LEN_ROOM if max_len_b is None else max_len_b)


def _write_in_order(f, shards):
    """Write each shard's hypotheses to the binary file ``f`` in corpus order, one shard in memory at a time.

    Args:
        shards: ``(shard file, (first id, end id))`` in corpus order.
    """
    for shard_file, (start, end) in shards:
        for hypothesis in in_corpus_order(_read_shard(shard_file), range(start, end), f"shard {shard_file}"):
            f.write(hypothesis.encode("utf-8") + b"\n")


def _shard_file(shard_dir, i):
    return shard_dir / f"{i:05d}.txt"


def _decode_shard(sources, start, end, task, subset, shard_file, generate_args, env):
    """Decode sentences start..end-1 from a data dir holding only them, in a process given the environment
    ``env``; write ``id<TAB>tokens`` lines."""
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    work = shard_file.with_name(f".input-{shard_file.stem}")
    shutil.rmtree(work, ignore_errors=True)  # left over by a killed run
    work.mkdir()
    for lang in (src, tgt):
        shutil.copy(Path(task.cfg.data) / f"dict.{lang}.txt", work)
    prefix = work / f"{subset}.{src}-{tgt}.{src}"
    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(task.src_dict))
    for i in range(start, end):
        builder.add_item(sources[i])
    builder.finalize(f"{prefix}.idx")
    output = run_fairseq("generate", [work, *generate_args], env=env)
    hypotheses = in_corpus_order(generated_hypotheses(output, first_id=start), range(start, end),
                                 f"teacher output for {subset} shard {shard_file.stem}")
    atomic_write_text(shard_file, "".join(f"{i}\t{h}\n" for i, h in zip(range(start, end), hypotheses)))
    shutil.rmtree(work)


def _read_shard(shard_file):
    with open(shard_file, encoding="utf-8") as f:
        return [(int(sid), tokens) for sid, tokens in (line.rstrip("\n").split("\t", 1) for line in f)]


def _build_data_bin(data_bin, subset, src, tgt, text_prefix, dest):
    """Fill the empty folder ``dest``: ``data_bin`` but the subset's target, and the teacher output binarized as it."""
    target = f"{subset}.{src}-{tgt}.{tgt}"
    for path in data_bin.iterdir():
        if path.is_file() and path.name not in (f"{target}.bin", f"{target}.idx"):
            shutil.copy2(path, dest)
    binarized = dest / ".binarized"
    run_fairseq("preprocess", [
        "--only-source", "--source-lang", tgt, "--trainpref", text_prefix,
        "--srcdict", data_bin / f"dict.{tgt}.txt", "--destdir", binarized, "--workers", 1,
    ])
    for ext in ("bin", "idx"):
        os.replace(binarized / f"train.{tgt}-None.{tgt}.{ext}", dest / f"{target}.{ext}")
    shutil.rmtree(binarized)


def main(argv=None):
    run_tool("tiekd-seqkd", _main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="tiekd-seqkd",
        description="Sequence-level KD data: the teacher's beam output as the target side of a new data-bin.",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq data-bin holding the subset and dictionaries")
    parser.add_argument("--subset", default="train", help="subset whose source the teacher decodes (default: train)")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--out", required=True, help="output folder: data-bin/, <subset>.<tgt>, shards/, settings.json")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per decoding batch")
    sharding = parser.add_mutually_exclusive_group()
    sharding.add_argument("--shards", type=int, help="number of shards")
    sharding.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                          help=f"sentences per shard (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU")
    parser.add_argument("--precision", choices=("fp16", "fp32"),
                        help="the teacher's precision (default: fp16 on GPUs, fp32 with --cpu)")
    parser.add_argument("--workers", type=int,
                        help="fairseq-generate processes at a time (default: one per visible GPU; 1 with --cpu)")
    parser.add_argument("--max-len-a", type=float,
                        help="output length bound a * source length + b (default: the subset's largest "
                             "target/source length ratio, rounded up to 0.01)")
    parser.add_argument("--max-len-b", type=int, help=f"(default: {MAX_LEN_ROOM})")
    parser.add_argument("--source-lang", help="default: from the subset's file names")
    parser.add_argument("--target-lang", help="default: from the subset's file names")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    build_seqkd_data(**vars(parser.parse_args(argv)))
