"""Bad data: refused in one line naming the file and line (or symbol) before training, or skipped and counted.

Protected: the user's files and data-bins, unchanged and with nothing half-written beside them; where
sentences are skipped, every other sentence still reaches training.
"""

import logging
import lzma
import shutil

import numpy as np
import pytest
import torch
from fairseq import utils
from fairseq.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from test_criterion import build

from tiekd_cli import eval as evaluation
from tiekd_cli.cache_teacher import build_teacher_cache
from tiekd_cli.iterate import iterate, mono_sentences
from tiekd_cli.raw_text import RawTextError, read_lines, read_parallel
from tiekd_cli.seqkd import build_seqkd_data
from tiekd_cli.shell import UsageError
from tiekd_fairseq.data.dictionaries import DictionaryError

from .helpers import iterate_kwargs, refused, source_only_shard, write
from conftest import data_bin_with_swapped_symbols

LONG = 1100  # tokens: beyond the 1024 positions of fairseq's transformers (student and teacher here)


def test_an_empty_line_on_one_side_is_refused_and_blank_mono_lines_are_skipped(case, tmp_path):
    protected = case("an empty line on one side of a parallel text",
                     "the user's texts; a pair blank on both sides, and the non-blank --mono lines")
    src = write(tmp_path / "a.en", "one\n\nthree\n")
    tgt = write(tmp_path / "a.de", "eins\nzwei\ndrei\n")
    both = write(tmp_path / "b.de", "eins\n \ndrei\n")
    mono = write(tmp_path / "mono.en", "one\n\n  \n two\n")
    protected.keep(tmp_path)
    refused(RawTextError, f"{src}:2: empty line, but line 2 of {tgt} is not", read_parallel, src, tgt)
    refused(RawTextError, f"{src}:2: empty line, but line 2 of {tgt} is not", read_parallel, tgt, src)
    # Blank on both sides: the files still align, the pair is kept.
    protected.same("pairs of a.en and b.de", read_parallel(src, both), [("one", "eins"), ("", " "), ("three", "drei")])
    protected.same("--mono sentences", list(mono_sentences(mono)), ["one", "two"])
    protected.verify()


def test_invalid_utf8_is_refused_naming_the_file_and_line_by_every_reader(case, corpus, teacher, tmp_path, capsys):
    protected = case("invalid UTF-8 in a text (parallel, --mono, --valid-ref, tiekd-eval --ref)",
                     "the user's texts and data-bin; no run folder or tiekd-eval output")
    bad = write(tmp_path / "latin1.de", "eins\nsch\u00f6n\n".encode("latin-1"))
    ok = write(tmp_path / "ok.en", "one\nbeautiful\n")
    protected.keep(tmp_path, corpus.data_bin)  # the run and out folders below may not appear in tmp_path
    message = f"{bad}:2: invalid UTF-8 at byte 3 of the line"
    refused(RawTextError, message, read_lines, bad)
    refused(RawTextError, message, read_parallel, ok, bad)
    refused(UsageError, message, iterate, **iterate_kwargs(corpus, teacher, tmp_path / "run", mono=bad))
    refused(UsageError, message, iterate, **iterate_kwargs(corpus, teacher, tmp_path / "run", valid_ref=bad))
    # Through a tool's command line: exit 2 and one line, before anything is decoded.
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--data-bin", str(corpus.data_bin), str(teacher), "--ref", str(bad), "--subset", "valid",
                         "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tiekd-eval: error: {message}"
    protected.verify()


def test_mismatched_line_counts_are_refused_naming_both_files(case, tmp_path):
    protected = case("source and target texts with different line counts",
                     "the user's texts; pairs aligned across form feeds, vertical tabs and \\r\\n")
    src = write(tmp_path / "a.en", "one\ntwo\nthree\n")
    tgt = write(tmp_path / "a.de", "eins\nzwei\n")
    odd = write(tmp_path / "b.en", "one\r\ntw\fo \x0bthree\r\n")
    with lzma.open(tmp_path / "b.de.xz", "wb") as f:
        f.write("eins\nzwei drei\n".encode("utf-8"))
    protected.keep(tmp_path)
    refused(RawTextError, f"{src} has 3 lines but {tgt} has 2; they must align line by line", read_parallel, src, tgt)
    # Only \n ends a line: a form feed or vertical tab inside a segment (str.splitlines would split there)
    # does not shift one side; a Windows line end loses its \r; .xz files are read decompressed.
    assert read_lines(odd) == ["one", "tw\fo \x0bthree"]
    protected.same("pairs of b.en and b.de.xz", read_parallel(odd, tmp_path / "b.de.xz"),
                   [("one", "eins"), ("tw\fo \x0bthree", "zwei drei")])
    protected.verify()


def _long_line(corpus):
    tokens = " ".join((corpus.root / "sp.train.en").read_text().splitlines()[:200]).split()
    assert len(tokens) > LONG
    return " ".join(tokens[:LONG])


def test_over_long_source_only_lines_are_skipped_and_counted_in_the_log(case, corpus, teacher, tmp_path, caplog):
    protected = case("a source-only line longer than the max positions",
                     "the shard; every other source-only sentence, batched")
    lines = (corpus.root / "sp.train.en").read_text().splitlines()[:20]
    shard = source_only_shard([*lines[:5], _long_line(corpus), *lines[5:]], tmp_path / "shard",
                              corpus.data_bin / "dict.en.txt")
    protected.keep(shard)
    task, model, _ = build(corpus.data_bin, teacher, "--mono-data", str(shard))
    task.load_dataset("train")
    dataset = task.dataset("train")
    assert dataset.mono.sizes[5] == LONG + 1  # with EOS
    with caplog.at_level(logging.WARNING, logger="tiekd_fairseq.data.mono_shards"):
        batches = task.get_batch_iterator(
            dataset, max_tokens=4096, max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                                model.max_positions()),
            ignore_invalid_inputs=True,
        ).frozen_batches
    assert "source-only shard: skipped 1 sentences longer than the max positions" in caplog.messages
    mono_ids = sorted(int(i) - dataset.offset for batch in batches for i in batch if i >= dataset.offset)
    protected.same("source-only sentences batched", mono_ids, [i for i in range(21) if i != 5])
    protected.verify()


def test_over_long_parallel_sentences_are_skipped_in_train_and_named_in_valid(case, corpus, teacher, caplog):
    protected = case("a parallel sentence longer than the max positions",
                     "the data-bin; every other training pair, batched")
    protected.keep(corpus.data_bin)
    task, _, _ = build(corpus.data_bin, teacher)
    task.load_dataset("train")
    task.load_dataset("valid")
    limits = (64, 64)
    train, valid = task.dataset("train"), task.dataset("valid")
    too_long = np.flatnonzero((train.src_sizes > 64) | (train.tgt_sizes > 64))
    assert len(too_long) > 0
    with caplog.at_level(logging.WARNING):
        batches = task.get_batch_iterator(train, max_tokens=4096, max_positions=limits,
                                          ignore_invalid_inputs=True).frozen_batches
    protected.same("train pairs batched", sorted(int(i) for batch in batches for i in batch),
                   sorted(set(range(len(train))) - set(too_long.tolist())))
    skipped = f"skipped: {len(too_long)} sentences of train in {corpus.data_bin} are longer than the max positions"
    assert any(m.startswith(skipped) for m in caplog.messages)
    # fairseq validates only after the first epoch's training; its exception becomes one line naming the sentence.
    first = int(np.flatnonzero((valid.src_sizes > 64) | (valid.tgt_sizes > 64))[0])
    count = int(((valid.src_sizes > 64) | (valid.tgt_sizes > 64)).sum())
    refused(SystemExit, f"{count} sentences of valid in {corpus.data_bin} are longer than the max positions "
                        f"{limits} (the first: sentence {first}, line {first + 1} of the binarized text, "
                        f"{valid.src_sizes[first]} source and {valid.tgt_sizes[first]} target tokens): shorten or "
                        "drop them, or pass --skip-invalid-size-inputs-valid-test to skip them",
            task.get_batch_iterator, valid, max_tokens=4096, max_positions=limits, ignore_invalid_inputs=False)
    protected.verify()


def test_sentences_longer_than_the_teacher_positions_stop_its_tools_before_they_run_it(case, corpus, teacher,
                                                                                      tmp_path):
    protected = case("a sentence longer than the teacher's positions (tiekd-cache-teacher, tiekd-seqkd)",
                     "the data-bin; no cache or seqkd output")
    data = tmp_path / "bin"
    shutil.copytree(corpus.data_bin, data)
    source = MMapIndexedDataset(str(corpus.data_bin / "test.en-de.en"))
    long_ids = torch.from_numpy(np.resize(source[0].numpy()[:-1], LONG)).long()
    builder = MMapIndexedDatasetBuilder(str(data / "test.en-de.en.bin"), dtype=np.uint16)
    for i in range(len(source)):
        builder.add_item(torch.cat([long_ids, source[i][-1:]]) if i == 7 else source[i])
    builder.finalize(str(data / "test.en-de.en.idx"))
    protected.keep(data, tmp_path / "cache", tmp_path / "seqkd")
    message = "1 test sentences are longer than the teacher's 1024 source positions (ids 7)"
    refused(UsageError, message, build_teacher_cache, data, "test", teacher, 4, tmp_path / "cache", cpu=True)
    refused(UsageError, message, build_seqkd_data, data, "test", teacher, tmp_path / "seqkd", cpu=True)
    protected.verify()


def test_an_empty_mono_text_is_refused_in_one_line(case, corpus, teacher, tmp_path):
    protected = case("an empty --mono text", "the user's text; no run folder")
    empty = write(tmp_path / "mono.en", "\n \n")
    protected.keep(tmp_path)  # the run folder may not appear
    refused(UsageError, f"--mono {empty} has 0 non-blank lines, fewer than the 1 rounds",
            iterate, **iterate_kwargs(corpus, teacher, tmp_path / "run", mono=empty))
    protected.verify()


def test_an_empty_mono_shard_is_refused_before_training(case, corpus, teacher, tmp_path):
    protected = case("an empty source-only shard", "the shard and the data-bin")
    empty = source_only_shard([], tmp_path / "empty", corpus.data_bin / "dict.en.txt")
    protected.keep(tmp_path, corpus.data_bin)
    refused(SystemExit, f"source-only shard {empty} holds no sentences",
            build, corpus.data_bin, teacher, "--mono-data", str(empty))
    protected.verify()


def test_a_mono_shard_binarized_with_another_dictionary_is_refused_naming_the_symbol(case, corpus, teacher,
                                                                                   tmp_path):
    protected = case("a source-only shard binarized with another dictionary", "the shard and the data-bin")
    lines = (corpus.data_bin / "dict.en.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n")
    words = [line.split()[0] for line in lines[:2]]
    shard = source_only_shard((corpus.root / "sp.train.en").read_text().splitlines()[:20], tmp_path / "other",
                              tmp_path / "dict.txt")
    protected.keep(tmp_path, corpus.data_bin)
    refused(SystemExit, f"source-only shard {shard} was binarized with another dictionary ({shard}/dict.en.txt): "
                        f"first difference at index 4: shard has {words[0]!r}, task has {words[1]!r}",
            build, corpus.data_bin, teacher, "--mono-data", str(shard))
    protected.verify()


def test_a_data_bin_whose_dictionary_differs_from_the_teachers_is_refused_naming_the_symbol(case, corpus, teacher,
                                                                                           tmp_path):
    protected = case("a data-bin whose dictionary differs from the teacher's",
                     "the data-bin and the teacher; no cache output")
    task_symbol, teacher_symbol = data_bin_with_swapped_symbols(corpus.data_bin, tmp_path / "bin")
    protected.keep(tmp_path, teacher)  # the cache folder c may not appear
    # The teacher's dictionaries are those of the data it was trained on; the new data-bin swaps two symbols.
    message = (f"teacher source dictionary {corpus.data_bin}/dict.en.txt differs from the task's: first difference "
               f"at index 14: teacher has {teacher_symbol!r}, task has {task_symbol!r}")
    refused(SystemExit, message, build, tmp_path / "bin", teacher)
    refused(DictionaryError, message, build_teacher_cache, tmp_path / "bin", "valid", teacher, 4, tmp_path / "c",
            cpu=True)
    protected.verify()
