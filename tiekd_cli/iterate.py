"""``tiekd-iterate``: rounds of TIE-KD training, each with a new shard of source-only text, scored on valid.

Round r (1-based) runs ``fairseq-train`` with the ``translation_kd`` task, the
``tie_kd`` criterion and source-only shard r (``--mono-data``), then decodes the
valid subset with the round's best checkpoint and scores it with sacreBLEU, BLEU
and chrF on detokenized text, exactly as ``tiekd-eval`` does.

Starting points: round 1 starts from ``--student-init`` or from scratch; round
r > 1 from round r-1's best checkpoint. Only the weights are carried over: the
optimizer, learning-rate schedule, data iterator and meters are reset
(``--reset-optimizer --reset-lr-scheduler --reset-dataloader --reset-meters``),
so every round runs the schedule given after ``--`` from its start (warmup
included), and ``--max-update`` / ``--max-epoch`` count per round.

Shards: the non-blank lines of a raw text are dealt round-robin, shard r getting
lines r-1, r-1+R, r-1+2R, ... (R = ``--rounds``), so a text sorted by topic or
length gives every round the same mix. Given binarized shard folders instead,
round r uses folder (r-1) mod S.

``SAVE_DIR`` is a run folder (``RunFolder``): ``settings.json``, ``.lock`` and
``done/`` (``round<r>-trained`` once round r's training finished, ``best-round``
noting the round copied to ``checkpoint_best.pt``); and ``rounds.tsv`` (one row per
finished round), ``checkpoint_best.pt`` (a copy of the best round's best
checkpoint), ``mono/shard<r>/`` and ``round<r>/`` (``train.log``, fairseq's
checkpoints, ``valid/`` with tiekd-eval's files).

Resuming: a run killed at any moment and started again with the same arguments
goes on from the last finished step. Binarized shards are kept; a round with a
row in ``rounds.tsv`` is never trained or scored again; a round marked trained
is only scored; a round killed during training is trained again from its start,
its folder removed first. fairseq writes ``checkpoint_last.pt`` by a plain copy,
so after a kill it may be truncated; restarting also makes the round the same as
an uninterrupted one. Every file of ours is written whole (temporary name, then
rename); the rerun removes the temporary files and the partial scoring output a
kill left.
"""

import argparse
import logging
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import sentencepiece
from tqdm import tqdm

from tiekd_fairseq.checkpoints import check_checkpoint
from tiekd_fairseq.data.data_bin import subset_size, translation_task
from tiekd_fairseq.data.dictionaries import TEACHER_DATA_HELP
from tiekd_fairseq.data.mono_shards import check_shard
from tiekd_fairseq.frozen_model import load_frozen_model

from .eval import evaluate
from .fairseq_runner import PLUGIN_DIR, run_fairseq
from .files import atomic_write, atomic_write_text, file_fingerprint, require_file
from .raw_text import iter_lines, read_lines
from .run_folder import RunFolder
from .shell import UsageError, positive, run_tool

ROWS, BEST, BEST_ROUND = "rounds.tsv", "checkpoint_best.pt", "best-round"
HEADER = "round\tvalid_bleu\tvalid_chrf\tcheckpoint\n"
VALID_SUBSET = "valid"
RESET_FLAGS = ("--reset-optimizer", "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters")
# fairseq-train flags set for every round; given again after -- they would silently win over ours
# (argparse keeps the last). Each maps to the tiekd-iterate option to use instead, if any.
OWN_FLAGS = {
    "--save-dir": "--save-dir", "--restore-file": "--student-init", "--finetune-from-model": "--student-init",
    "--mono-data": "--mono", "--teacher": "--teacher", "--teacher-data": "--teacher-data",
    "--source-lang": "--source-lang", "-s": "--source-lang", "--target-lang": "--target-lang",
    "-t": "--target-lang", "--cpu": "--cpu", "--user-dir": None, "--task": None,
}
logger = logging.getLogger(__name__)


class Row(NamedTuple):
    """One finished round: valid BLEU and chrF (rounded as written) and its best checkpoint, relative to SAVE_DIR."""

    round: int
    bleu: float
    chrf: float
    checkpoint: str


def _trained(r):
    """The done marker of round ``r``'s training."""
    return f"round{r}-trained"


def iterate(data_bin, mono, teacher, save_dir, valid_ref, rounds, patience=2, train_args=(), student_init=None,
            spm_model=None, teacher_data=None, source_lang=None, target_lang=None, beam=4, lenpen=0.6, cpu=False):
    """Run (or resume) up to ``rounds`` rounds in the run folder ``save_dir``, every input checked before anything
    is written; return the rows of ``rounds.tsv``.

    Args:
        data_bin: the parallel data-bin, with a valid subset.
        mono: a raw text file of source sentences (encoded with ``spm_model`` if given, else taken as
            tokenized), or binarized shard folders joined by ':'.
        teacher, teacher_data: the teacher checkpoint and the folder of its dictionaries.
        valid_ref: the raw reference text of the valid subset.
        rounds: R; patience: stop after this many rounds without a valid BLEU gain.
        train_args: fairseq-train arguments for every round, passed unchanged.
        student_init: the checkpoint whose weights round 1 starts from (None: scratch).
        spm_model: sentencepiece model: encodes raw ``mono``, detokenizes the valid output.
        source_lang, target_lang: default: inferred from the data-bin.
        beam, lenpen: of the valid decoding; cpu: train and decode on the CPU.
    """
    data_bin, save_dir = Path(data_bin), Path(save_dir)
    train_args = [str(arg) for arg in train_args]
    _check_arguments(data_bin, rounds, patience, beam, train_args)
    src, tgt, mono_text, given_shards = _check_inputs(data_bin, source_lang, target_lang, mono, rounds, teacher,
                                                      teacher_data, valid_ref, student_init, spm_model)
    settings = {
        "data_bin": str(data_bin.resolve()), "source_lang": src, "target_lang": tgt,
        "mono": file_fingerprint(mono_text) if mono_text else [str(Path(s).resolve()) for s in given_shards],
        "teacher": file_fingerprint(teacher), "student_init": file_fingerprint(student_init),
        "spm_model": file_fingerprint(spm_model),
        "teacher_data": None if teacher_data is None else str(Path(teacher_data).resolve()),
        "valid_ref": file_fingerprint(valid_ref),
        "rounds": rounds, "patience": patience, "beam": beam, "lenpen": lenpen, "cpu": cpu, "train_args": train_args,
    }
    with RunFolder(save_dir, settings, "tiekd-iterate", flag="--save-dir") as folder:
        if mono_text:
            shards = _split_mono(folder, mono_text, rounds, spm_model, src, data_bin / f"dict.{src}.txt")
        else:
            shards = [given_shards[(r - 1) % len(given_shards)] for r in range(1, rounds + 1)]
        rows = read_rows(save_dir / ROWS)
        if rows:
            logger.info("%d of %d rounds already finished in %s", len(rows), rounds, save_dir)
        _keep_best(folder, rows)
        progress = tqdm(total=rounds, initial=len(rows), desc="tiekd-iterate", unit="round")
        for r in range(len(rows) + 1, rounds + 1):
            if rounds_without_gain(rows) >= patience:
                logger.info("stopped after round %d: no valid BLEU gain in %d rounds", len(rows), patience)
                break
            progress.set_postfix_str(f"round {r}" + (f", last valid BLEU {rows[-1].bleu:.2f}" if rows else ""))
            round_dir = save_dir / f"round{r}"
            if not folder.done(_trained(r)):
                restore = student_init if r == 1 else save_dir / rows[-1].checkpoint
                _train_round(round_dir, round_train_args(
                    data_bin, teacher, shards[r - 1], round_dir, restore, train_args,
                    src, tgt, teacher_data, cpu,
                ))
                folder.mark_done(_trained(r))
            else:
                logger.info("round %d: training had finished, scoring it", r)
            # Not staged: results.json names the files by the folder they are written in.
            shutil.rmtree(round_dir / "valid", ignore_errors=True)  # what a killed scoring left
            results = evaluate(
                data_bin, [round_dir / BEST], valid_ref, round_dir / "valid", names=[f"round{r}"],
                subset=VALID_SUBSET, beam=beam, lenpen=lenpen, spm_model=spm_model,
                source_lang=src, target_lang=tgt, cpu=cpu,
            )["systems"][0]
            rows.append(Row(r, round(results["bleu"]["score"], 2), round(results["chrf"]["score"], 2),
                            f"round{r}/{BEST}"))
            write_rows(save_dir / ROWS, rows)
            _keep_best(folder, rows)
            progress.update()
            progress.set_postfix_str(f"round {r}, valid BLEU {rows[-1].bleu:.2f}")
        progress.close()
    return rows


def round_train_args(data_bin, teacher, shard, round_dir, restore, train_args, source_lang, target_lang,
                     teacher_data=None, cpu=False):
    """fairseq-train arguments of one round, ``--criterion tie_kd`` before ``train_args`` so that one there wins.

    Args:
        restore: the checkpoint whose weights (only) the round starts from, or None for scratch.
    """
    args = [
        data_bin, "--user-dir", PLUGIN_DIR, "--task", "translation_kd", "--teacher", teacher,
        "--source-lang", source_lang, "--target-lang", target_lang, "--criterion", "tie_kd",
        "--mono-data", shard, "--save-dir", round_dir,
    ]
    if teacher_data is not None:
        args += ["--teacher-data", teacher_data]
    if restore is not None:
        args += ["--restore-file", restore, *RESET_FLAGS]
    if cpu:
        args.append("--cpu")
    return [str(arg) for arg in [*args, *train_args]]


def read_rows(path):
    """The rows of ``rounds.tsv``; none if it does not exist."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] + "\n" != HEADER:
        raise UsageError(f"{path} is not a tiekd-iterate rounds.tsv (its header is not {HEADER.strip()!r})")
    rows = []
    for line in lines[1:]:
        r, bleu, chrf, checkpoint = line.split("\t")
        rows.append(Row(int(r), float(bleu), float(chrf), checkpoint))
    return rows


def write_rows(path, rows):
    """Write ``rounds.tsv`` whole: the header, then one line per row."""
    atomic_write_text(path, HEADER + "".join(f"{r.round}\t{r.bleu:.2f}\t{r.chrf:.2f}\t{r.checkpoint}\n" for r in rows))


def best_row(rows):
    """The row with the highest valid BLEU, the earliest of ties; None before the first round."""
    return max(rows, key=lambda row: (row.bleu, -row.round), default=None)


def rounds_without_gain(rows):
    """How many rounds have finished since the best one."""
    return len(rows) - best_row(rows).round if rows else 0


def mono_sentences(path):
    """The non-blank lines of a UTF-8 text file, stripped: the sentences the shards are dealt from."""
    for line in iter_lines(path):
        line = line.strip()
        if line:
            yield line


def _check_arguments(data_bin, rounds, patience, beam, train_args):
    """Check the numbers, the flags after -- and that the data-bin is a folder."""
    positive(**{"--rounds": rounds, "--patience": patience, "--beam": beam})
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            instead = OWN_FLAGS[flag]
            raise UsageError(f"{flag} cannot be passed after --: tiekd-iterate sets it for every round"
                             + (f" (use its {instead} option)" if instead else ""))
    if not data_bin.is_dir():
        raise UsageError(f"data-bin {data_bin} is not a folder")


def _check_inputs(data_bin, source_lang, target_lang, mono, rounds, teacher, teacher_data, valid_ref, student_init,
                  spm_model):
    """Check every input file, the teacher against the data-bin included; return (src, tgt, *``_check_mono``)."""
    task = translation_task(data_bin, None, source_lang, target_lang)
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    valid_size = subset_size(data_bin, VALID_SUBSET, src, tgt)
    references = read_lines(require_file(valid_ref, "valid reference file"))
    if len(references) != valid_size:
        raise UsageError(f"valid reference file {valid_ref} has {len(references)} lines "
                         f"but subset {VALID_SUBSET!r} has {valid_size} sentences")
    if student_init is not None:
        check_checkpoint(student_init, "student")
    if spm_model is not None:
        require_file(spm_model, "sentencepiece model")
    checked_mono = _check_mono(mono, rounds, src, task.src_dict)
    load_frozen_model(str(teacher), task, teacher_data)
    return (src, tgt, *checked_mono)


def _check_mono(mono, rounds, src, src_dict):
    """(text file, None) for raw text with at least ``rounds`` sentences, else (None, checked shard folders)."""
    if Path(mono).is_file():
        count = sum(1 for _ in mono_sentences(mono))
        if count < rounds:
            raise UsageError(f"--mono {mono} has {count} non-blank lines, fewer than the {rounds} rounds")
        return Path(mono), None
    shards = str(mono).split(os.pathsep)
    for shard in shards:
        if not Path(shard).is_dir():
            raise UsageError(f"--mono {shard} is neither a text file nor a folder of binarized source sentences")
        check_shard(shard, src, src_dict)
    return None, shards


def _split_mono(folder, text, rounds, spm_model, src, srcdict):
    """Deal the sentences of ``text`` into ``rounds`` binarized shards in ``mono/``; shards already made are kept."""
    mono_dir = folder.path / "mono"
    shards = [mono_dir / f"shard{r}" for r in range(1, rounds + 1)]
    missing = [i for i, shard in enumerate(shards) if not shard.is_dir()]
    if not missing:
        return shards
    with ExitStack() as staged:
        partial = {i: staged.enter_context(folder.staged(shards[i])) for i in missing}
        outputs = {i: staged.enter_context(open(partial[i] / f"text.{src}", "w", encoding="utf-8")) for i in missing}
        spm = None if spm_model is None else sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
        for n, sentence in enumerate(mono_sentences(text)):
            if n % rounds in outputs:
                tokens = sentence.split() if spm is None else spm.encode(sentence, out_type=str)
                outputs[n % rounds].write(" ".join(tokens) + "\n")
        for i, part in partial.items():
            outputs[i].close()
            run_fairseq("preprocess", [
                "--only-source", "--source-lang", src, "--srcdict", srcdict, "--trainpref", part / "text",
                "--destdir", part, "--workers", 1,
            ])
            (part / f"text.{src}").unlink()
    logger.info("%s: %d shards binarized in %s", text, len(missing), mono_dir)
    return shards


def _train_round(round_dir, args):
    """fairseq-train from the round's start in a fresh folder, logged to ``round_dir/train.log``."""
    shutil.rmtree(round_dir, ignore_errors=True)  # a round killed during training starts again
    round_dir.mkdir()
    logger.info("%s: training, log in %s", round_dir.name, round_dir / "train.log")
    run_fairseq("train", args, log_path=round_dir / "train.log")
    if not (round_dir / BEST).is_file():
        raise RuntimeError(f"fairseq-train wrote no {round_dir / BEST}: each round must validate and save "
                           f"(no --no-save or --disable-validation after --)")


def _keep_best(folder, rows):
    """Make ``SAVE_DIR/checkpoint_best.pt`` a copy, written whole, of the best round's checkpoint; note the round."""
    best = best_row(rows)
    if best is None or (folder.note(BEST_ROUND) == str(best.round) and (folder.path / BEST).is_file()):
        return
    with open(folder.path / best.checkpoint, "rb") as source:
        atomic_write(folder.path / BEST, lambda f: shutil.copyfileobj(source, f, 1 << 20))
    folder.mark_done(BEST_ROUND, best.round)


def main(argv=None):
    return run_tool("tiekd-iterate", _main, argv)


def _main(argv):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    split = argv.index("--") if "--" in argv else len(argv)
    own, train_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="tiekd-iterate",
        usage="%(prog)s --data-bin DIR --mono TEXT_OR_SHARDS --teacher PT --save-dir DIR --valid-ref FILE "
              "--rounds R [options] [-- fairseq-train arguments]",
        description="Rounds of TIE-KD training, each with a new shard of source-only text, "
                    "scored with BLEU and chrF on the valid subset.",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq data-bin of the parallel data (with a valid subset)")
    parser.add_argument("--mono", required=True, help="raw text of source sentences, "
                        "or binarized source-only shard folders separated by ':'")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--save-dir", required=True, help="folder of the rounds, rounds.tsv and checkpoint_best.pt")
    parser.add_argument("--valid-ref", required=True, help="raw reference text of the valid subset")
    parser.add_argument("--rounds", type=int, required=True, help="number of rounds R")
    parser.add_argument("--patience", type=int, default=2,
                        help="stop after this many rounds without a valid BLEU gain (default: 2)")
    parser.add_argument("--student-init", help="checkpoint whose weights round 1 starts from (default: scratch)")
    parser.add_argument("--spm-model", help="sentencepiece model: encodes raw --mono text, detokenizes valid output")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    parser.add_argument("--source-lang", help="default: inferred from the data-bin")
    parser.add_argument("--target-lang", help="default: inferred from the data-bin")
    parser.add_argument("--beam", type=int, default=4, help="beam of the valid decoding (default: 4)")
    parser.add_argument("--lenpen", type=float, default=0.6, help="length penalty of the valid decoding (default: 0.6)")
    parser.add_argument("--cpu", action="store_true", help="train and decode on the CPU")
    args = parser.parse_args(own)
    rows = iterate(train_args=train_args, **vars(args))
    best = best_row(rows)
    print(Path(args.save_dir, ROWS).read_text(encoding="utf-8"), end="")
    print(f"tiekd-iterate: best round {best.round} (valid BLEU {best.bleu:.2f}), "
          f"copied to {Path(args.save_dir, BEST)}")


if __name__ == "__main__":
    main()
