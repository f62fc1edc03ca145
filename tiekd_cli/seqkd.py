"""``tiekd-seqkd``: sequence-level KD data, the teacher's beam output as the target side of a new data-bin.

The teacher decodes the source side of one subset with ``fairseq-generate``, one
shard (a contiguous range of sentence ids) at a time. ``--out`` is a run folder
(``RunFolder``: ``settings.json``, ``.lock``); a finished shard is a file in
``shards/``, so a killed run resumes at the first unfinished one. The result is a
data-bin with the same dictionaries, the original binarized source and the
teacher's output, in the same subword vocabulary, as target; the other subsets
are copied.
"""

import argparse
import logging
import math
import os
import shutil
from pathlib import Path

from fairseq.data import data_utils, indexed_dataset
from tqdm import tqdm

from tiekd_fairseq.data.data_bin import language_pair, translation_task
from tiekd_fairseq.data.dictionaries import TEACHER_DATA_HELP
from tiekd_fairseq.frozen_model import load_frozen_model

from .fairseq_runner import GENERATE_FLAGS, run_fairseq
from .files import atomic_write_text, file_fingerprint, require_file
from .generate_output import generated_hypotheses, in_corpus_order
from .run_folder import RunFolder
from .shell import UsageError, id_list, positive, run_tool

DEFAULT_SHARD_SIZE = 50000
logger = logging.getLogger(__name__)


def build_seqkd_data(data_bin, subset, teacher, out, beam=5, lenpen=1.0, max_tokens=4096, shards=None,
                     shard_size=DEFAULT_SHARD_SIZE, cpu=False, source_lang=None, target_lang=None,
                     teacher_data=None) -> Path:
    """Decode ``subset`` of ``data_bin`` with ``teacher`` into the run folder ``out``, every input checked before
    anything is written; return the new data-bin ``out/data-bin``.

    ``out`` also holds ``<subset>.<tgt>`` (the teacher's output, tokenized, in corpus order) and ``shards/``
    (the finished shards: a rerun decodes only the others).

    Args:
        data_bin, subset: the data-bin and the subset whose source the teacher decodes.
        teacher, teacher_data: the teacher checkpoint and the folder of its dictionaries.
        beam, lenpen, max_tokens: of fairseq-generate.
        shards, shard_size: the number of shards, or else the sentences per shard.
        cpu: decode on the CPU; source_lang, target_lang: default: from the subset's file names.
    """
    data_bin, out = Path(data_bin), Path(out)
    positive(**{"--beam": beam, "--max-tokens": max_tokens, "--shards": shards, "--shard-size": shard_size})
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

    count = min(shards or math.ceil(len(sources) / shard_size), len(sources))
    settings = {
        "data_bin": str(data_bin.resolve()), "subset": subset, "source_lang": src, "target_lang": tgt,
        "sentences": len(sources), "teacher": file_fingerprint(teacher), "beam": beam, "lenpen": lenpen,
        "shards": count,
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
            *(["--cpu"] if cpu else []),
        ]
        shard_dir = out / "shards"
        shard_dir.mkdir(exist_ok=True)
        bounds = [(len(sources) * i // count, len(sources) * (i + 1) // count) for i in range(count)]
        pending = [i for i in range(count) if not _shard_file(shard_dir, i).is_file()]
        logger.info("%s %s: %d sentences in %d shards, %d already decoded",
                    data_bin, subset, len(sources), count, count - len(pending))
        with tqdm(total=count, initial=count - len(pending), unit="shard", desc=f"teacher decodes {subset}") as bar:
            for i in pending:
                _decode_shard(sources, *bounds[i], task, subset, _shard_file(shard_dir, i), generate_args)
                bar.update()

        pairs = [pair for i in range(count) for pair in _read_shard(_shard_file(shard_dir, i))]
        hypotheses = in_corpus_order(pairs, range(len(sources)), f"shards in {shard_dir}")
        text_prefix = out / subset
        atomic_write_text(f"{text_prefix}.{tgt}", "".join(h + "\n" for h in hypotheses))
        with folder.staged(final) as partial:
            _build_data_bin(data_bin, subset, src, tgt, text_prefix, partial)
    logger.info("%s: %s = original source and teacher output, other subsets copied", final, subset)
    return final


def _shard_file(shard_dir, i):
    return shard_dir / f"{i:05d}.txt"


def _decode_shard(sources, start, end, task, subset, shard_file, generate_args):
    """Decode sentences start..end-1 from a data dir holding only them; write ``id<TAB>tokens`` lines."""
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
    output = run_fairseq("generate", [work, *generate_args])
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
    parser.add_argument("--source-lang", help="default: from the subset's file names")
    parser.add_argument("--target-lang", help="default: from the subset's file names")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    build_seqkd_data(**vars(parser.parse_args(argv)))
