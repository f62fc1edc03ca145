"""The Python steps of the WMT recipes (examples/lib/wmt_recipe.sh): clean text, sentencepiece, checkpoint averaging.

sentencepiece works on raw text, so there is no Moses tokenization and normalisation
stays minimal: control and format characters are removed and whitespace runs become
one space. Punctuation is left as it is: sentencepiece applies NFKC itself, and the
target side must stay comparable with the untouched references sacreBLEU scores.
Length filtering (at most MAX_LEN pieces a side, ratio at most RATIO, as Moses'
clean-corpus-n.perl in fairseq's preparation scripts) happens on sentencepiece
pieces, for the training set only.

The large files are streamed in place: the recipe rebuilds a step's folder from
scratch unless the step's done-marker exists, so a half-written file is never used.
"""

import argparse
import itertools
import lzma
import re
import sys
import unicodedata
from pathlib import Path

import sentencepiece

from tiekd_cli.checkpoint_average import average_checkpoints, last_checkpoints, save_checkpoint
from tiekd_cli.files import write_lines
from tiekd_cli.raw_text import RawTextError, iter_lines, read_parallel
from tiekd_fairseq.errors import InputError

# Control and format characters (zero-width spaces, soft hyphens, byte order marks, C0/C1 controls)
# that are not whitespace; whitespace, including tabs and Unicode line separators, is collapsed by split().
_INVISIBLE = re.compile("[%s]" % "".join(
    re.escape(chr(c)) for c in range(sys.maxunicode + 1)
    if unicodedata.category(chr(c)) in ("Cc", "Cf") and not chr(c).isspace()
))
ENCODE_CHUNK = 100_000


def normalise(line):
    return " ".join(_INVISIBLE.sub("", line).split())


def prepare(out, src, tgt, train, valid, test, mono):
    """Clean the raw text into ``out``: ``train``/``valid``/``test``.{src,tgt} and ``mono.<src>``.

    ``train`` is a list of corpus prefixes (``<prefix>.<lang>`` files, ``.xz`` allowed), concatenated;
    pairs with a side empty after normalisation are dropped (WMT's Europarl has segments empty on
    one side). ``valid`` and ``test`` must align exactly and keep every line, so they are read with
    ``read_parallel``. Every file is strict UTF-8 or the step stops naming the file and line.
    """
    out = Path(out)
    # Streamed: a WMT training corpus can hold tens of millions of lines.
    with open(out / f"train.{src}", "w", encoding="utf-8", newline="\n") as fs, \
            open(out / f"train.{tgt}", "w", encoding="utf-8", newline="\n") as ft:
        for prefix in train:
            total = kept = 0
            for s, t in itertools.zip_longest(iter_lines(f"{prefix}.{src}"), iter_lines(f"{prefix}.{tgt}")):
                if s is None or t is None:
                    longer, shorter = (f"{prefix}.{src}", f"{prefix}.{tgt}") if t is None else \
                        (f"{prefix}.{tgt}", f"{prefix}.{src}")
                    raise RawTextError(f"{shorter} ends after {total} lines but {longer} goes on; "
                                       f"they must align line by line")
                total += 1
                s, t = normalise(s), normalise(t)
                if s and t:
                    fs.write(s + "\n")
                    ft.write(t + "\n")
                    kept += 1
            print(f"{prefix}: {kept} of {total} pairs kept (the others have an empty side)")
    for split, prefix in (("valid", valid), ("test", test)):
        pairs = read_parallel(f"{prefix}.{src}", f"{prefix}.{tgt}")
        for side, lang in enumerate((src, tgt)):
            write_lines(out / f"{split}.{lang}", (normalise(pair[side]) for pair in pairs))
        print(f"{prefix}: {len(pairs)} pairs")
    kept = 0
    with open(out / f"mono.{src}", "w", encoding="utf-8", newline="\n") as f:
        for line in map(normalise, iter_lines(mono)):
            if line:
                f.write(line + "\n")
                kept += 1
    print(f"{mono}: {kept} non-empty lines")


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


def train_sentencepiece(text, out, src, tgt, vocab_size, sentences, max_len, ratio, threads):
    """A joint sentencepiece model ``out/spm.model`` and the encoded splits ``out/{train,valid,test}.{src,tgt}``."""
    text, out = Path(text), Path(out)
    sentencepiece.SentencePieceTrainer.train(
        input=f"{text}/train.{src},{text}/train.{tgt}", model_prefix=str(out / "spm"), vocab_size=vocab_size,
        character_coverage=1.0, input_sentence_size=sentences, shuffle_input_sentence=True,
        num_threads=threads, minloglevel=1,
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


def average(folder, last, out):
    """fairseq's averaging of the last ``last`` ``checkpoint_<epoch>_<update>.pt`` of ``folder``, saved to ``out``."""
    paths = last_checkpoints(folder, last, update_based=True)
    save_checkpoint(average_checkpoints(paths), out)
    print(f"{out}: average of {', '.join(path.name for path in paths)}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="recipe_tools.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="clean raw text into train/valid/test/mono files")
    p.add_argument("--out", required=True)
    p.add_argument("--langs", nargs=2, required=True, metavar=("SRC", "TGT"))
    p.add_argument("--train", nargs="+", required=True, help="corpus prefixes")
    p.add_argument("--valid", required=True, help="prefix")
    p.add_argument("--test", required=True, help="prefix")
    p.add_argument("--mono", required=True, help="source-only text")
    p.set_defaults(run=lambda a: prepare(a.out, *a.langs, a.train, a.valid, a.test, a.mono))
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
    p.set_defaults(run=lambda a: train_sentencepiece(a.text, a.out, *a.langs, a.vocab_size, a.sentences,
                                                     a.max_len, a.ratio, a.threads))
    p = commands.add_parser("average", help="average a training folder's last update checkpoints")
    p.add_argument("folder")
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=lambda a: average(a.folder, a.last, a.out))
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
