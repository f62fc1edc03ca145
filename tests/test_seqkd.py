"""tiekd-seqkd through its console script: the teacher's beam output as a new data-bin, resumable by shard."""

import filecmp
import json
import shutil
import sys
from pathlib import Path

import pytest

from tiekd_cli.seqkd import build_seqkd_data
from tiekd_cli.shell import UsageError
from tiekd_fairseq.errors import InputError

from conftest import COMMON, STUDENT_ARCH, USER_DIR, fairseq, run

SEQKD = Path(sys.executable).parent / "tiekd-seqkd"


def seqkd_args(corpus, teacher, out):
    # The 100 test sentences in two shards of 50: not a multiple of fairseq's batch size multiple (8).
    return ["--data-bin", corpus.data_bin, "--subset", "test", "--teacher", teacher, "--out", out,
            "--beam", "2", "--shards", "2", "--cpu"]


@pytest.fixture(scope="module")
def seqkd(corpus, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("seqkd")
    run([SEQKD, *seqkd_args(corpus, teacher, out)])
    return out


def test_one_hypothesis_per_source_line_in_corpus_order(seqkd, corpus, teacher):
    lines = (seqkd / "test.de").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(corpus.raw["test"]) == 100
    proc = fairseq(
        "fairseq-generate", corpus.data_bin, "--user-dir", USER_DIR, "--path", teacher, "--task", "translation",
        "--gen-subset", "test", "--beam", "2", "--max-tokens", "4096", "--required-batch-size-multiple", "1", "--cpu",
    )
    reference = {int(line.split("\t")[0][2:]): line.split("\t", 2)[2]
                 for line in proc.stdout.splitlines() if line.startswith("H-")}
    assert len(reference) == 100
    # Other batches may, rarely, flip a near-tie in the beam; a misordered output would match almost nothing.
    assert sum(reference[i] == line for i, line in enumerate(lines)) >= 95


def test_new_data_bin_holds_original_source_and_teacher_output(seqkd, corpus):
    from fairseq.data import Dictionary, data_utils

    new, old = seqkd / "data-bin", corpus.data_bin
    for name in ("dict.en.txt", "dict.de.txt", "test.en-de.en.bin", "test.en-de.en.idx",
                 "valid.en-de.en.bin", "valid.en-de.de.bin", "train.en-de.de.bin"):
        assert filecmp.cmp(new / name, old / name, shallow=False), name
    dictionary = Dictionary.load(str(new / "dict.de.txt"))
    target = data_utils.load_indexed_dataset(str(new / "test.en-de.de"), dictionary)
    assert [dictionary.string(t) for t in target] == (seqkd / "test.de").read_text(encoding="utf-8").splitlines()
    assert not filecmp.cmp(new / "test.en-de.de.bin", old / "test.en-de.de.bin", shallow=False)
    assert sorted(p.name for p in seqkd.iterdir()) == [".lock", "data-bin", "settings.json", "shards", "test.de"]
    assert sorted(p.name for p in (seqkd / "shards").iterdir()) == ["00000.txt", "00001.txt"]
    settings = json.loads((seqkd / "settings.json").read_text())
    assert settings["beam"] == 2 and settings["shards"] == 2 and settings["sentences"] == 100


def test_new_data_bin_trains_with_cross_entropy(seqkd, tmp_path):
    proc = fairseq(
        "fairseq-train", seqkd / "data-bin", "--train-subset", "test", "--valid-subset", "valid",
        *STUDENT_ARCH, *COMMON, "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "5e-3",
        "--max-tokens", "2048", "--max-update", "2", "--save-dir", tmp_path, "--no-save",
    )
    log = proc.stdout + proc.stderr
    assert "loaded 100 examples from: " + str(seqkd / "data-bin" / "test.en-de.de") in log
    assert "num_updates 2" in log and "valid on 'valid' subset" in log


def test_a_lost_hypothesis_fails_in_one_line_naming_its_id(seqkd, corpus, teacher, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(seqkd / "shards", out / "shards")
    shutil.copy(seqkd / "settings.json", out)
    shard = out / "shards" / "00001.txt"
    shard.write_text("".join(line for line in shard.open() if not line.startswith("70\t")))
    with pytest.raises(UsageError, match=r"shards in \S+: 1 of 100 sentences got no hypothesis \(ids 70\)$"):
        build_seqkd_data(corpus.data_bin, "test", teacher, out, beam=2, shards=2)
    assert not (out / "test.de").exists() and not (out / "data-bin").exists()


def _copy_with(corpus, root, change):
    data = root / "bin"
    shutil.copytree(corpus.data_bin, data)
    change(data)
    return data


def _swap_dictionary_lines(data):
    for lang in ("en", "de"):
        lines = (data / f"dict.{lang}.txt").read_text().splitlines()
        lines[10], lines[11] = lines[11], lines[10]
        (data / f"dict.{lang}.txt").write_text("\n".join(lines) + "\n")


# (arguments that replace the good ones, given corpus, module output and tmp_path; the one error line)
BAD_INPUTS = {
    "no such subset": (lambda corpus, seqkd, tmp: dict(subset="nosuch"),
                       r"data-bin \S+ has no binarized nosuch source files nosuch\.SRC-TGT\.SRC\.idx"),
    "missing source": (lambda corpus, seqkd, tmp: dict(data_bin=_copy_with(
                           corpus, tmp, lambda data: (data / "test.en-de.en.bin").unlink())),
                       r"binarized test source \S+/test\.en-de\.en\.bin does not exist"),
    "missing teacher": (lambda corpus, seqkd, tmp: dict(teacher=tmp / "missing.pt"),
                        r"teacher checkpoint \S+/missing\.pt does not exist"),
    "out not writable": (lambda corpus, seqkd, tmp: dict(out=tmp / "file" / "out"),
                         r"cannot use --out \S+/file/out: Not a directory"),
    "other dictionary": (lambda corpus, seqkd, tmp: dict(data_bin=_copy_with(corpus, tmp, _swap_dictionary_lines)),
                         r"teacher source dictionary \S+/dict\.en\.txt differs from the task's: "
                         r"first difference at index 14: .*"),
    "other settings": (lambda corpus, seqkd, tmp: dict(out=seqkd, beam=3),
                       r"\S+ holds a run with other settings \(beam 2 there, 3 now\): "
                       r"rerun with the same arguments or use another --out"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_decoding(case, seqkd, corpus, teacher, tmp_path):
    (tmp_path / "file").write_text("")
    overrides, pattern = BAD_INPUTS[case]
    args = dict(data_bin=corpus.data_bin, subset="test", teacher=teacher, out=tmp_path / "out", beam=2, shards=2)
    args.update(overrides(corpus, seqkd, tmp_path))
    before = {p: p.stat().st_mtime_ns for p in seqkd.rglob("*")}
    with pytest.raises(InputError, match=f"^{pattern}$"):
        build_seqkd_data(**args)
    assert not (tmp_path / "out").exists()
    assert {p: p.stat().st_mtime_ns for p in seqkd.rglob("*")} == before


def test_console_script_refuses_bad_input_with_exit_2_and_one_line(corpus, tmp_path):
    proc = run([SEQKD, "--data-bin", corpus.data_bin, "--subset", "test", "--teacher", tmp_path / "missing.pt",
                "--out", tmp_path / "out", "--cpu"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tiekd-seqkd: error: teacher checkpoint {tmp_path / 'missing.pt'} does not exist")
    assert not (tmp_path / "out").exists()
