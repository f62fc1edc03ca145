"""Sequence-level KD data: the teacher's beam output becomes the target side of a new data-bin.

The teacher decodes the source side of one subset with ``fairseq-generate``, one
shard (a contiguous range of sentence ids) at a time. A finished shard is a file,
so a killed run resumes at the first unfinished one. The result is a data-bin with
the same dictionaries, the original binarized source and the teacher's output,
in the same subword vocabulary, as target; the other subsets are copied.
"""

import argparse
import logging
import math
import os
import shutil
from pathlib import Path

from fairseq.data import data_utils, indexed_dataset
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from tqdm import tqdm

from .cli import (
    GENERATE_FLAGS,
    UsageError,
    atomic_write_text,
    id_list,
    make_output_dir,
    record_run_settings,
    require_file,
    run_fairseq,
    run_tool,
)
from .teacher import TEACHER_DATA_HELP, TeacherError, load_teacher

DEFAULT_SHARD_SIZE = 50000
logger = logging.getLogger(__name__)


def build_seqkd_data(data_bin, subset, teacher, out, beam=5, lenpen=1.0, max_tokens=4096, shards=None,
                     shard_size=DEFAULT_SHARD_SIZE, cpu=False, source_lang=None, target_lang=None,
                     teacher_data=None) -> Path:
    """Decode ``subset`` of ``data_bin`` with ``teacher`` into ``out``; return the new data-bin ``out/data-bin``.

    ``out`` also holds ``<subset>.<tgt>`` (the teacher's output, tokenized, in corpus
    order) and ``shards/`` (the finished shards and the settings they were made with).
    Every input is checked before decoding starts; a rerun with the same settings
    decodes only the shards that are not finished.
    """
    data_bin, out = Path(data_bin), Path(out)
    for flag, value in (("--beam", beam), ("--max-tokens", max_tokens), ("--shards", shards),
                        ("--shard-size", shard_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    src, tgt = _language_pair(data_bin, subset, source_lang, target_lang)
    source_prefix = data_bin / f"{subset}.{src}-{tgt}.{src}"
    for lang in (src, tgt):
        require_file(data_bin / f"dict.{lang}.txt", "dictionary")
    for ext in ("idx", "bin"):
        require_file(f"{source_prefix}.{ext}", f"binarized {subset} source")
    make_output_dir(out)

    task = TranslationTask.setup_task(TranslationConfig(data=str(data_bin), source_lang=src, target_lang=tgt))
    sources = data_utils.load_indexed_dataset(str(source_prefix), task.src_dict)
    if len(sources) == 0:
        raise UsageError(f"{source_prefix}.idx holds no sentences")
    max_source, max_target = _teacher_positions(teacher, task, teacher_data)
    too_long = [i for i, size in enumerate(sources.sizes) if size > max_source]
    if too_long:
        raise UsageError(f"{len(too_long)} {subset} sentences are longer than the teacher's {max_source} "
                         f"source positions (ids {id_list(too_long)})")

    count = min(shards or math.ceil(len(sources) / shard_size), len(sources))
    shard_dir = out / "shards"
    record_run_settings(shard_dir / "plan.json", {
        "data_bin": str(data_bin.resolve()), "subset": subset, "source_lang": src, "target_lang": tgt,
        "sentences": len(sources), "teacher": str(Path(teacher).resolve()),
        "teacher_bytes": os.path.getsize(teacher), "teacher_mtime_ns": os.stat(teacher).st_mtime_ns,
        "beam": beam, "lenpen": lenpen, "shards": count,
    })
    final = out / "data-bin"
    if final.is_dir():
        logger.info("%s is already built", final)
        return final

    # The teacher's own position limits, not the task's default 1024: they decide, as checked
    # above, which sentences fairseq-generate accepts.
    generate_args = [
        *GENERATE_FLAGS, "--source-lang", src, "--target-lang", tgt,
        "--path", teacher, "--gen-subset", subset, "--beam", beam, "--lenpen", lenpen, "--nbest", 1,
        "--max-tokens", max_tokens, "--max-source-positions", max_source, "--max-target-positions", max_target,
        *(["--cpu"] if cpu else []),
    ]
    bounds = [(len(sources) * i // count, len(sources) * (i + 1) // count) for i in range(count)]
    pending = [i for i in range(count) if not _shard_file(shard_dir, i).is_file()]
    logger.info("%s %s: %d sentences in %d shards, %d already decoded",
                data_bin, subset, len(sources), count, count - len(pending))
    with tqdm(total=count, initial=count - len(pending), unit="shard", desc=f"teacher decodes {subset}") as bar:
        for i in pending:
            _decode_shard(sources, *bounds[i], task, subset, _shard_file(shard_dir, i), generate_args)
            bar.update()

    pairs = [pair for i in range(count) for pair in _read_shard(_shard_file(shard_dir, i))]
    hypotheses = _in_corpus_order(pairs, range(len(sources)), f"shards in {shard_dir}")
    text_prefix = out / subset
    atomic_write_text(f"{text_prefix}.{tgt}", "".join(h + "\n" for h in hypotheses))
    _build_data_bin(data_bin, subset, src, tgt, text_prefix, final)
    logger.info("%s: %s = original source and teacher output, other subsets copied", final, subset)
    return final


def _language_pair(data_bin, subset, source_lang, target_lang):
    """(src, tgt) as given, else read from the ``<subset>.<src>-<tgt>.<src>.idx`` file names."""
    if source_lang and target_lang:
        return source_lang, target_lang
    if not data_bin.is_dir():
        raise UsageError(f"data-bin {data_bin} is not a folder")
    pairs = set()
    for path in data_bin.glob(f"{subset}.*-*.*.idx"):
        langs, _, side = path.name[len(subset) + 1:-len(".idx")].rpartition(".")
        src, _, tgt = langs.partition("-")
        if side == src and (source_lang or src) == src and (target_lang or tgt) == tgt:
            pairs.add((src, tgt))
    if len(pairs) != 1:
        found = "no" if not pairs else "several (" + ", ".join(sorted(f"{s}-{t}" for s, t in pairs)) + ")"
        raise UsageError(f"{data_bin} has {found} binarized {subset} source files {subset}.SRC-TGT.SRC.idx"
                         + ("; pass --source-lang and --target-lang" if pairs else ""))
    return pairs.pop()


def _teacher_positions(teacher, task, teacher_data):
    """The teacher's (source, target) position limits, after checking that it reads and fits the task."""
    try:
        model = load_teacher(str(teacher), task, teacher_data).model
    except TeacherError as err:
        raise UsageError(str(err)) from None
    return model.max_positions()


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
    pairs = []
    for line in output.splitlines():
        if line.startswith("H-"):
            local_id, _score, tokens = line.split("\t", 2)
            pairs.append((start + int(local_id[2:]), tokens))
    hypotheses = _in_corpus_order(pairs, range(start, end), f"teacher output for {subset} shard {shard_file.stem}")
    atomic_write_text(shard_file, "".join(f"{i}\t{h}\n" for i, h in zip(range(start, end), hypotheses)))
    shutil.rmtree(work)


def _read_shard(shard_file):
    with open(shard_file, encoding="utf-8") as f:
        return [(int(sid), tokens) for sid, tokens in (line.rstrip("\n").split("\t", 1) for line in f)]


def _in_corpus_order(pairs, ids, where):
    """The hypotheses of ``ids`` in order: exactly one per id, else one line naming how many and which ids."""
    by_id, unexpected = {}, []
    for sid, tokens in pairs:
        if sid in by_id or sid not in ids:
            unexpected.append(sid)
        by_id[sid] = tokens
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UsageError(f"{where}: {len(missing)} of {len(ids)} sentences got no hypothesis "
                         f"(ids {id_list(missing)})")
    if unexpected:
        raise UsageError(f"{where}: repeated or foreign hypotheses for ids {id_list(unexpected)}")
    return [by_id[i] for i in ids]


def _build_data_bin(data_bin, subset, src, tgt, text_prefix, final):
    """Copy ``data_bin`` but the subset's target, binarize the teacher output as target, rename into place."""
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left over by a killed run
    partial.mkdir()
    target = f"{subset}.{src}-{tgt}.{tgt}"
    for path in data_bin.iterdir():
        if path.is_file() and path.name not in (f"{target}.bin", f"{target}.idx"):
            shutil.copy2(path, partial)
    binarized = partial / ".binarized"
    run_fairseq("preprocess", [
        "--only-source", "--source-lang", tgt, "--trainpref", text_prefix,
        "--srcdict", data_bin / f"dict.{tgt}.txt", "--destdir", binarized, "--workers", 1,
    ])
    for ext in ("bin", "idx"):
        os.replace(binarized / f"train.{tgt}-None.{tgt}.{ext}", partial / f"{target}.{ext}")
    shutil.rmtree(binarized)
    os.rename(partial, final)


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
    parser.add_argument("--out", required=True, help="output folder: data-bin/, <subset>.<tgt>, shards/")
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
