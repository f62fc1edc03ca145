"""tiekd-iterate through its console script: rounds on source-only shards, resumption, checked input.

Killed runs and the lock are robustness cases (tests/robustness/test_processes.py)."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece
from fairseq.data import Dictionary, data_utils

from tiekd_cli.iterate import (
    RESET_FLAGS,
    Row,
    best_row,
    iterate,
    read_rows,
    round_train_args,
    rounds_without_gain,
    write_rows,
)
from tiekd_cli.shell import UsageError
from tiekd_fairseq.errors import InputError

from conftest import COMMON, STUDENT_ARCH, data_bin_with_swapped_symbols, run

TOOL = Path(sys.executable).parent / "tiekd-iterate"
TRAIN = [*STUDENT_ARCH, *(arg for arg in COMMON if arg != "--cpu"), "--optimizer", "adam", "--lr", "5e-3",
         "--max-tokens", "2048", "--max-update", "3", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def mono(corpus, tmp_path_factory):
    """60 English training sentences, with blank lines that the sharding must skip."""
    lines = (corpus.root / "raw.train.en").read_text(encoding="utf-8").splitlines()[2000:2060]
    path = tmp_path_factory.mktemp("mono") / "mono.en"
    path.write_text("\n".join(lines[:10]) + "\n\n  \n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")
    return SimpleNamespace(path=path, sentences=lines)


def options(corpus, teacher, mono, save_dir, rounds=2, patience=2):
    """The library's keyword arguments, and the same as a command line."""
    kwargs = dict(data_bin=corpus.data_bin, mono=mono.path, teacher=teacher, save_dir=save_dir,
                  valid_ref=corpus.root / "raw.valid.de", spm_model=corpus.root / "spm.model", rounds=rounds,
                  patience=patience, beam=1, cpu=True, train_args=TRAIN)
    argv = [TOOL]
    for key, value in kwargs.items():
        if key not in ("cpu", "train_args"):
            argv += [f"--{key.replace('_', '-')}", value]
    return kwargs, [*argv, "--cpu", "--", *TRAIN]


@pytest.fixture(scope="module")
def finished(corpus, teacher, mono, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("iterate") / "run"
    proc = run(options(corpus, teacher, mono, save_dir)[1])
    return SimpleNamespace(save_dir=save_dir, proc=proc, rows=read_rows(save_dir / "rounds.tsv"))


def test_two_rounds_write_two_rows_and_the_best_checkpoint(finished):
    save_dir = finished.save_dir
    lines = (save_dir / "rounds.tsv").read_text().splitlines()
    assert lines[0] == "round\tvalid_bleu\tvalid_chrf\tcheckpoint"
    assert [line.split("\t")[0] for line in lines[1:]] == ["1", "2"]
    for row in finished.rows:
        assert 0 <= row.bleu <= 100 and 0 < row.chrf <= 100
        assert row.checkpoint == f"round{row.round}/checkpoint_best.pt"
        results = json.loads((save_dir / f"round{row.round}" / "valid" / "results.json").read_text())
        assert results["sentences"] == 200 and row.bleu == round(results["systems"][0]["bleu"]["score"], 2)
    best = best_row(finished.rows)
    assert (save_dir / "checkpoint_best.pt").read_bytes() == (save_dir / best.checkpoint).read_bytes()
    assert "\n".join(lines) in finished.proc.stdout
    assert f"best round {best.round} (valid BLEU {best.bleu:.2f})" in finished.proc.stdout
    assert "valid BLEU" in finished.proc.stderr  # the progress bar
    assert sorted(p.name for p in save_dir.iterdir()) == [
        ".lock", "checkpoint_best.pt", "done", "mono", "round1", "round2", "rounds.tsv", "settings.json"]
    assert sorted(p.name for p in (save_dir / "done").iterdir()) == ["best-round", "round1-trained", "round2-trained"]
    assert (save_dir / "done" / "best-round").read_text() == f"{best.round}\n"
    assert json.loads((save_dir / "settings.json").read_text())["rounds"] == 2


def test_each_round_trains_on_its_own_shard_from_the_previous_best(finished):
    logs = [(finished.save_dir / f"round{r}" / "train.log").read_text() for r in (1, 2)]
    for r, log in enumerate(logs, 1):
        assert f"epoch 1: source-only shard {finished.save_dir / 'mono' / f'shard{r}'}," in log
        assert "source-only batches" in log and "num_updates 3" in log
    assert "Loaded checkpoint" not in logs[0]
    assert f"Loaded checkpoint {finished.save_dir / 'round1' / 'checkpoint_best.pt'}" in logs[1]


def test_shards_deal_the_non_blank_lines_round_robin(finished, mono, corpus):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(corpus.root / "spm.model"))
    dictionary = Dictionary.load(str(corpus.data_bin / "dict.en.txt"))
    for r in (1, 2):
        shard = data_utils.load_indexed_dataset(str(finished.save_dir / "mono" / f"shard{r}" / "train.en-None.en"),
                                                dictionary)
        assert [dictionary.string(tokens) for tokens in shard] == [
            " ".join(sp.encode(line.strip(), out_type=str)) for line in mono.sentences[r - 1::2]]


def test_a_round_killed_after_training_is_only_scored(finished, corpus, teacher, mono, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for fairseq-generate, as run() sets it for the console script
    save_dir = tmp_path / "run"
    shutil.copytree(finished.save_dir, save_dir)
    write_rows(save_dir / "rounds.tsv", finished.rows[:1])  # done/round2-trained says round 2 was trained
    trained = (save_dir / "round2" / "train.log").stat().st_mtime_ns
    assert iterate(**options(corpus, teacher, mono, save_dir)[0]) == finished.rows
    assert (save_dir / "round2" / "train.log").stat().st_mtime_ns == trained
    best = save_dir / best_row(finished.rows).checkpoint
    assert (save_dir / "checkpoint_best.pt").read_bytes() == best.read_bytes()


def test_a_finished_run_stops_early_and_keeps_the_best_round(finished, corpus, teacher, mono, tmp_path):
    save_dir = tmp_path / "run"
    shutil.copytree(finished.save_dir, save_dir)
    kwargs = options(corpus, teacher, mono, save_dir, rounds=3, patience=1)[0]
    # As if started with 3 rounds and patience 1, killed after writing round 2's row, which scores below round 1.
    settings = json.loads((save_dir / "settings.json").read_text())
    settings.update(rounds=3, patience=1)
    (save_dir / "settings.json").write_text(json.dumps(settings))
    (save_dir / "done" / "best-round").write_text("2\n")
    shutil.copy(save_dir / "round2" / "checkpoint_best.pt", save_dir / "checkpoint_best.pt")
    write_rows(save_dir / "rounds.tsv", [Row(1, 9.5, 30.0, "round1/checkpoint_best.pt"),
                                         Row(2, 9.0, 31.0, "round2/checkpoint_best.pt")])
    rows = iterate(**kwargs)
    assert [row.round for row in rows] == [1, 2] and not (save_dir / "round3").exists()
    assert (save_dir / "checkpoint_best.pt").read_bytes() == (save_dir / "round1" / "checkpoint_best.pt").read_bytes()
    assert (save_dir / "done" / "best-round").read_text() == "1\n"


def test_round_arguments_restore_weights_only():
    scratch = round_train_args("bin", "t.pt", "mono/shard1", "run/round1", None, ["--criterion", "word_kd"], "en", "de")
    assert "--restore-file" not in scratch and "--cpu" not in scratch
    assert scratch.index("tie_kd") < scratch.index("word_kd")  # a criterion after -- wins
    assert scratch[scratch.index("--mono-data") + 1] == "mono/shard1"
    later = round_train_args("bin", "t.pt", "mono/shard2", "run/round2", "run/round1/checkpoint_best.pt", [],
                             "en", "de", teacher_data="tdata", cpu=True)
    at = later.index("--restore-file")
    assert later[at + 1:at + 6] == ["run/round1/checkpoint_best.pt", *RESET_FLAGS]
    assert "--cpu" in later and later[later.index("--teacher-data") + 1] == "tdata"


def test_rows_round_trip_and_patience_counts_rounds_since_the_best(tmp_path):
    rows = [Row(1, 1.0, 20.0, "round1/checkpoint_best.pt"), Row(2, 3.25, 21.5, "round2/checkpoint_best.pt"),
            Row(3, 2.0, 22.0, "round3/checkpoint_best.pt"), Row(4, 3.25, 23.0, "round4/checkpoint_best.pt")]
    write_rows(tmp_path / "rounds.tsv", rows)
    assert read_rows(tmp_path / "rounds.tsv") == rows
    assert best_row(rows).round == 2  # a tie is no gain
    assert [rounds_without_gain(rows[:n]) for n in range(5)] == [0, 0, 0, 1, 2]


def test_bad_input_exits_2_with_one_line_through_the_console_script(corpus, teacher, mono, tmp_path):
    argv = options(corpus, teacher, mono, tmp_path / "run", rounds=0)[1]
    proc = run(argv, check=False)
    # The last stderr line; before it only fairseq's import notices, no traceback.
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "tiekd-iterate: error: --rounds must be at least 1, not 0"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _short_text(tmp):
    (tmp / "short.en").write_text("one\n\n two \nthree\n")
    return tmp / "short.en"


def _swapped_copy(corpus, tmp):
    data_bin_with_swapped_symbols(corpus.data_bin, tmp / "bin")
    return tmp / "bin"


# (arguments that replace the good ones, given corpus and tmp_path; the one error line)
BAD_INPUTS = {
    "patience": (lambda corpus, tmp: dict(patience=0), r"--patience must be at least 1, not 0"),
    "short mono": (lambda corpus, tmp: dict(mono=_short_text(tmp), rounds=4),
                   r"--mono \S+/short\.en has 3 non-blank lines, fewer than the 4 rounds"),
    "no mono": (lambda corpus, tmp: dict(mono=f"{tmp}/a:{tmp}/b"),
                r"--mono \S+/a is neither a text file nor a folder of binarized source sentences"),
    "empty shard": (lambda corpus, tmp: dict(mono=tmp),
                    r"source-only shard \S+ has no train\.en-None\.en\.idx .*"),
    "missing teacher": (lambda corpus, tmp: dict(teacher=tmp / "missing.pt"),
                        r"teacher checkpoint \S+/missing\.pt does not exist"),
    "missing student": (lambda corpus, tmp: dict(student_init=tmp / "missing.pt"),
                        r"student checkpoint \S+/missing\.pt does not exist"),
    "other dictionary": (lambda corpus, tmp: dict(data_bin=_swapped_copy(corpus, tmp)),
                         r"teacher source dictionary \S+/dict\.en\.txt differs from the task's: "
                         r"first difference at index 14: .*"),
    "reference lines": (lambda corpus, tmp: dict(valid_ref=corpus.root / "raw.test.de"),
                        r"valid reference file \S+ has 100 lines but subset 'valid' has 200 sentences"),
    "own flag": (lambda corpus, tmp: dict(train_args=[*TRAIN, "--save-dir=elsewhere"]),
                 r"--save-dir cannot be passed after --: tiekd-iterate sets it for every round "
                 r"\(use its --save-dir option\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_is_written(case, corpus, teacher, mono, tmp_path):
    overrides, pattern = BAD_INPUTS[case]
    kwargs = options(corpus, teacher, mono, tmp_path / "run")[0]
    kwargs.update(overrides(corpus, tmp_path))
    with pytest.raises(InputError, match=f"^{pattern}$"):
        iterate(**kwargs)
    assert not (tmp_path / "run").exists()


def test_a_save_dir_of_something_else_or_of_another_run_is_refused(finished, corpus, teacher, mono, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    with pytest.raises(UsageError, match=r"^--save-dir \S+/foreign holds files but no settings\.json: "
                                         r"use a new or empty folder$"):
        iterate(**options(corpus, teacher, mono, foreign)[0])
    before = (finished.save_dir / "settings.json").read_text()
    with pytest.raises(UsageError, match=r"^\S+/run holds a run with other settings \(rounds 2 there, 3 now\): "
                                         r"rerun with the same arguments or use another --save-dir$"):
        iterate(**options(corpus, teacher, mono, finished.save_dir, rounds=3)[0])
    assert (finished.save_dir / "settings.json").read_text() == before
