"""The Python steps of the WMT recipes (examples/lib/wmt_recipe.sh): clean text, sentencepiece, checkpoints.

sentencepiece works on raw text, so there is no Moses tokenization and normalisation
stays minimal: control and format characters are removed and whitespace runs become
one space. Punctuation is left as it is: sentencepiece applies NFKC itself, and the
target side must stay comparable with the untouched references sacreBLEU scores.
Romanian text alone has its cedilla letters (ş ţ Ş Ţ, an old encoding) written as
the comma-below letters (ș ț Ș Ț) the language uses, so that one letter has one piece.
Length filtering (at most MAX_LEN pieces a side, ratio at most RATIO, as Moses'
clean-corpus-n.perl in fairseq's preparation scripts) happens on sentencepiece
pieces, for the training set only.

The large files are streamed in place: the recipe rebuilds a step's folder from
scratch unless the step's done-marker exists, so a half-written file is never used.
"""

import argparse
import itertools
import lzma
import os
import random
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import sentencepiece

from tiekd_cli.checkpoint_average import CHECKPOINT_PATTERNS, average_checkpoints, save_checkpoint
from tiekd_cli.files import write_lines
from tiekd_cli.raw_text import RawTextError, read_parallel
from tiekd_fairseq.checkpoints import CheckpointError, check_checkpoint
from tiekd_fairseq.errors import InputError

# Control and format characters (zero-width spaces, soft hyphens, byte order marks, C0/C1 controls)
# that are not whitespace; whitespace, including tabs and Unicode line separators, is collapsed by split().
_INVISIBLE = re.compile("[%s]" % "".join(
    re.escape(chr(c)) for c in range(sys.maxunicode + 1)
    if unicodedata.category(chr(c)) in ("Cc", "Cf") and not chr(c).isspace()
))
ENCODE_CHUNK = 100_000
ROMANIAN_COMMA_BELOW = str.maketrans("şţŞŢ", "șțȘȚ")


def normalise(line):
    return " ".join(_INVISIBLE.sub("", line).split())


def normaliser(lang):
    """The cleaning function for text in ``lang``: ``normalise``, and for Romanian the comma-below letters."""
    if lang == "ro":
        return lambda line: normalise(line).translate(ROMANIAN_COMMA_BELOW)
    return normalise


def crawled_lines(path, on_bad_utf8):
    """The lines of a crawled text file (``.xz`` decompressed), without line ends; a line of invalid UTF-8 as asked.

    Args: path: the file; on_bad_utf8: ``stop`` raises a RawTextError naming the file and line at invalid
    UTF-8, ``skip`` yields None for that line.
    """
    path = Path(path)
    with (lzma.open if path.suffix == ".xz" else open)(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                yield line.rstrip(b"\n").decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as err:
                if on_bad_utf8 == "stop":
                    raise RawTextError(f"{path}:{number}: invalid UTF-8 at byte {err.start} of the line "
                                       f"(--on-bad-utf8 skip drops such lines)") from None
                yield None


def clean_mono(mono, out, lang, on_bad_utf8="stop"):
    """Clean the source-only text ``mono`` (in ``lang``) into ``out``, dropping empty lines.

    A line of invalid UTF-8 stops, or with ``on_bad_utf8="skip"`` is dropped and counted.
    """
    clean, kept, bad = normaliser(lang), 0, 0
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for line in crawled_lines(mono, on_bad_utf8):
            if line is None:
                bad += 1
            elif line := clean(line):
                f.write(line + "\n")
                kept += 1
    print(f"{mono}: {kept} non-empty lines ({bad} with invalid UTF-8 skipped)")


def prepare(out, src, tgt, train, valid, test, mono=None, on_bad_utf8="stop"):
    """Clean the raw text into ``out``: ``train``/``valid``/``test``.{src,tgt}, and ``mono.<src>`` if ``mono``.

    ``train`` is a list of corpus prefixes (``<prefix>.<lang>`` files, ``.xz`` allowed), concatenated;
    pairs with a side empty after normalisation are dropped (WMT's Europarl has segments empty on
    one side). A training pair or source-only line of invalid UTF-8 stops the step naming the file
    and line, or with ``on_bad_utf8="skip"`` is dropped and counted. ``valid`` and ``test`` must align
    exactly, keep every line and be strict UTF-8, so they are read with ``read_parallel``.
    """
    out = Path(out)
    clean_src, clean_tgt = normaliser(src), normaliser(tgt)
    # Streamed: a WMT training corpus can hold tens of millions of lines.
    with open(out / f"train.{src}", "w", encoding="utf-8", newline="\n") as fs, \
            open(out / f"train.{tgt}", "w", encoding="utf-8", newline="\n") as ft:
        for prefix in train:
            total = kept = bad = 0
            sides = (crawled_lines(f"{prefix}.{src}", on_bad_utf8), crawled_lines(f"{prefix}.{tgt}", on_bad_utf8))
            for s, t in itertools.zip_longest(*sides, fillvalue=False):
                if s is False or t is False:
                    longer, shorter = (f"{prefix}.{src}", f"{prefix}.{tgt}") if t is False else \
                        (f"{prefix}.{tgt}", f"{prefix}.{src}")
                    raise RawTextError(f"{shorter} ends after {total} lines but {longer} goes on; "
                                       f"they must align line by line")
                total += 1
                if s is None or t is None:
                    bad += 1
                    continue
                s, t = clean_src(s), clean_tgt(t)
                if s and t:
                    fs.write(s + "\n")
                    ft.write(t + "\n")
                    kept += 1
            print(f"{prefix}: {kept} of {total} pairs kept ({bad} with invalid UTF-8 skipped, "
                  f"{total - kept - bad} with an empty side)")
    for split, prefix in (("valid", valid), ("test", test)):
        pairs = read_parallel(f"{prefix}.{src}", f"{prefix}.{tgt}")
        for side, (lang, clean) in enumerate(((src, clean_src), (tgt, clean_tgt))):
            write_lines(out / f"{split}.{lang}", (clean(pair[side]) for pair in pairs))
        print(f"{prefix}: {len(pairs)} pairs")
    if mono is not None:
        clean_mono(mono, out / f"mono.{src}", src, on_bad_utf8)


def demo(demo_dir, out, src, tgt, train, test, mono, max_words):
    """Smoke-mode raw text from the shipped English-German corpus, as ``out/{train,valid,test}.{src,tgt}``
    and ``out/mono.<src>``: the first ``train``/``test``/``mono`` segments with at most ``max_words`` words
    a side, short enough for the smoke models' few positions. German is written as ``tgt``.
    """
    def lines(name):
        with lzma.open(Path(demo_dir) / f"{name}.xz", "rt", encoding="utf-8", newline="\n") as f:
            return [line.rstrip("\n") for line in f]

    def short(segments):
        return all(len(segment.split()) <= max_words for segment in segments)

    for split, count in (("train", train), ("valid", test), ("test", test)):
        pairs = [pair for pair in zip(lines(f"lohelp.{split}.en"), lines(f"lohelp.{split}.de")) if short(pair)]
        for side, lang in enumerate((src, tgt)):
            write_lines(Path(out) / f"{split}.{lang}", (pair[side] for pair in pairs[:count]))
    write_lines(Path(out) / f"mono.{src}", [line for line in lines("ding.en") if short([line])][:mono])


def read_chunks(path):
    """Lists of at most ENCODE_CHUNK lines of a file written by ``prepare`` (split on newlines only)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = (line.rstrip("\n") for line in f)
        while chunk := list(itertools.islice(lines, ENCODE_CHUNK)):
            yield chunk


def sample_lines(paths, count, seed, out):
    """Write to ``out`` a uniform sample of ``count`` lines of the files ``paths`` (seeded reservoir sampling)."""
    rng, sample, seen = random.Random(seed), [], 0
    for path in paths:
        with open(path, encoding="utf-8", newline="\n") as f:
            for line in f:
                seen += 1
                if len(sample) < count:
                    sample.append(line)
                elif (slot := rng.randrange(seen)) < count:
                    sample[slot] = line
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(sample)
    print(f"sentencepiece sample: {len(sample)} of {seen} lines")


def train_sentencepiece(text, out, src, tgt, vocab_size, sentences, max_len, ratio, threads, seed):
    """A joint sentencepiece model ``out/spm.model`` and the encoded splits ``out/{train,valid,test}.{src,tgt}``.

    ``sentences`` lines of the training text (0: all of it), sampled with ``seed``, train the model: a
    rerun with the same seed and ``threads`` gives the same vocabulary.
    """
    text, out = Path(text), Path(out)
    inputs = [text / f"train.{src}", text / f"train.{tgt}"]
    if sentences:
        # Sampled here: sentencepiece's own sample (input_sentence_size) differs from run to run,
        # even with set_random_generator_seed.
        sample_lines(inputs, sentences, seed, out / "sample.txt")
        inputs = [out / "sample.txt"]
    sentencepiece.SentencePieceTrainer.train(
        input=",".join(map(str, inputs)), model_prefix=str(out / "spm"), vocab_size=vocab_size,
        character_coverage=1.0, num_threads=threads, minloglevel=1,
    )
    spm = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in ("train", "valid", "test"):
        total = kept = 0
        with open(out / f"{split}.{src}", "w", encoding="utf-8") as fs, \
                open(out / f"{split}.{tgt}", "w", encoding="utf-8") as ft:
            for source, target in zip(read_chunks(text / f"{split}.{src}"), read_chunks(text / f"{split}.{tgt}")):
                for s, t in zip(spm.encode(source, out_type=str, num_threads=threads),
                                spm.encode(target, out_type=str, num_threads=threads)):
                    total += 1
                    if split == "train" and not (0 < len(s) <= max_len and 0 < len(t) <= max_len
                                                 and len(s) <= ratio * len(t) and len(t) <= ratio * len(s)):
                        continue
                    fs.write(" ".join(s) + "\n")
                    ft.write(" ".join(t) + "\n")
                    kept += 1
        print(f"{split}: {kept} of {total} pairs encoded" + (" (length filter)" if split == "train" else ""))


def interval_checkpoints(folder):
    """The ``checkpoint_<epoch>_<update>.pt`` files of ``folder`` as (update, path), newest first."""
    pattern = CHECKPOINT_PATTERNS[True]
    found = ((pattern.fullmatch(path.name), path) for path in Path(folder).iterdir())
    return sorted(((int(match.group(1)), path) for match, path in found if match), reverse=True)


def average(folder, last, upper_bound, out):
    """Average the last ``last`` interval checkpoints of ``folder`` at or before update ``upper_bound`` into ``out``.

    The bound (fairseq's ``--checkpoint-upper-bound``) keeps a run continued past its schedule from
    moving the window.
    """
    paths = [path for update, path in interval_checkpoints(folder) if update <= upper_bound][:last]
    if len(paths) < last:
        raise ValueError(f"{folder} holds {len(paths)} checkpoint_<epoch>_<update>.pt files up to update "
                         f"{upper_bound}, fewer than the {last} to average")
    save_checkpoint(average_checkpoints(paths), out)
    print(f"{out}: average of {', '.join(path.name for path in paths)}")


def recover(folder):
    """Replace an unreadable ``folder/checkpoint_last.pt`` by a copy of the newest readable interval checkpoint.

    fairseq writes checkpoint_last.pt by copying, not renaming, so a run killed at that moment
    leaves a truncated file that the next fairseq-train would fail on.
    """
    last = Path(folder) / "checkpoint_last.pt"
    if not last.exists():
        return
    try:
        check_checkpoint(last, "last")
        return
    except CheckpointError as err:
        print(err)
    for _, path in interval_checkpoints(folder):
        try:
            check_checkpoint(path, "interval")
        except CheckpointError as err:
            print(err)
            continue
        tmp = last.with_name(".checkpoint_last.pt.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        print(f"{last}: replaced by {path.name}, the newest intact checkpoint")
        return
    raise ValueError(f"{last} is unreadable and {folder} holds no intact checkpoint_<epoch>_<update>.pt: "
                     f"remove {folder} to train from the start")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recipe_tools.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="clean raw text into train/valid/test/mono files")
    p.add_argument("--out", required=True)
    p.add_argument("--langs", nargs=2, required=True, metavar=("SRC", "TGT"))
    p.add_argument("--train", nargs="+", required=True, help="corpus prefixes")
    p.add_argument("--valid", required=True, help="prefix")
    p.add_argument("--test", required=True, help="prefix")
    p.add_argument("--mono", help="source-only text")
    p.add_argument("--on-bad-utf8", choices=("stop", "skip"), default="stop",
                   help="a training pair or source-only line of invalid UTF-8 stops the step, or is dropped and "
                        "counted (valid and test always stop)")
    p.set_defaults(run=lambda a: prepare(a.out, *a.langs, a.train, a.valid, a.test, a.mono, a.on_bad_utf8))
    p = commands.add_parser("mono", help="clean source-only text")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lang", required=True)
    p.add_argument("--on-bad-utf8", choices=("stop", "skip"), default="stop")
    p.set_defaults(run=lambda a: clean_mono(a.text, a.out, a.lang, a.on_bad_utf8))
    p = commands.add_parser("demo", help="smoke-mode raw text from the shipped demo corpus")
    p.add_argument("--demo-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--langs", nargs=2, required=True, metavar=("SRC", "TGT"))
    p.add_argument("--lines", nargs=3, type=int, required=True, metavar=("TRAIN", "TEST", "MONO"),
                   help="segments of train, of valid and test each, of source-only text")
    p.add_argument("--max-words", type=int, required=True)
    p.set_defaults(run=lambda a: demo(a.demo_dir, a.out, *a.langs, *a.lines, a.max_words))
    p = commands.add_parser("spm", help="train a joint sentencepiece model and encode the splits")
    p.add_argument("--text", required=True, help="folder written by prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--langs", nargs=2, required=True, metavar=("SRC", "TGT"))
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--sentences", type=int, default=0, help="sentences sampled for training (0: all)")
    p.add_argument("--max-len", type=int, default=250)
    p.add_argument("--ratio", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1, help="seed of the sentence sample")
    p.set_defaults(run=lambda a: train_sentencepiece(a.text, a.out, *a.langs, a.vocab_size, a.sentences,
                                                     a.max_len, a.ratio, a.threads, a.seed))
    p = commands.add_parser("average", help="average a training folder's last update checkpoints")
    p.add_argument("folder")
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--upper-bound", type=int, required=True, help="the last update to consider")
    p.add_argument("--out", required=True)
    p.set_defaults(run=lambda a: average(a.folder, a.last, a.upper_bound, a.out))
    p = commands.add_parser("recover", help="replace a truncated checkpoint_last.pt by the newest intact checkpoint")
    p.add_argument("folder")
    p.set_defaults(run=lambda a: recover(a.folder))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    # Bad input in one line: an InputError names the file and line; sentencepiece's trainer
    # raises RuntimeError (e.g. a vocabulary larger than the text allows).
    except (InputError, OSError, ValueError, RuntimeError) as err:
        print(f"recipe_tools.py {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
