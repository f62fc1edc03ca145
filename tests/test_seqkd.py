"""tiekd-seqkd through its console script: the teacher's beam output as a new data-bin, resumable by shard."""

import filecmp
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from tiekd_cli.seqkd import build_seqkd_data
from tiekd_cli.shell import UsageError
from tiekd_fairseq.errors import InputError

from conftest import COMMON, STUDENT_ARCH, USER_DIR, built_once, fairseq, run

SEQKD = Path(sys.executable).parent / "tiekd-seqkd"


def seqkd_args(corpus, teacher, out):
    # The 100 test sentences in two shards of 50: not a multiple of fairseq's batch size multiple (8).
    return ["--data-bin", corpus.data_bin, "--subset", "test", "--teacher", teacher, "--out", out,
            "--beam", "2", "--shards", "2", "--cpu"]


def seqkd_output(corpus, teacher, tmp_path_factory):
    """tiekd-seqkd's output with ``seqkd_args``, made once per test run (robustness/test_processes.py compares
    a killed and resumed run with it)."""
    return built_once(tmp_path_factory, "seqkd", lambda out: run([SEQKD, *seqkd_args(corpus, teacher, out)]))


@pytest.fixture(scope="module")
def seqkd(corpus, teacher, tmp_path_factory):
    return seqkd_output(corpus, teacher, tmp_path_factory)


@pytest.fixture(scope="module")
def length_pairs(corpus):
    """(source, target) lengths of each test pair as fairseq-generate counts them, EOS included."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(corpus.data_bin / "dict.en.txt"))
    sides = [data_utils.load_indexed_dataset(str(corpus.data_bin / f"test.en-de.{lang}"), dictionary)
             for lang in ("en", "de")]
    return [(len(src), len(tgt)) for src, tgt in zip(*sides)]


@pytest.fixture(scope="module")
def reference(corpus, teacher, length_pairs):
    """fairseq-generate's own beam-2 output of the whole test subset in one process, by sentence id, with
    the output length bound tiekd-seqkd should choose (the largest target/source ratio to 0.01 up, plus 10)."""
    ratio = max(math.ceil(t / s * 100) for s, t in length_pairs) / 100
    proc = fairseq(
        "fairseq-generate", corpus.data_bin, "--user-dir", USER_DIR, "--path", teacher, "--task", "translation",
        "--gen-subset", "test", "--beam", "2", "--max-tokens", "4096", "--required-batch-size-multiple", "1", "--cpu",
        "--max-len-a", str(ratio), "--max-len-b", "10",
    )
    hypotheses = {int(line.split("\t")[0][2:]): line.split("\t", 2)[2]
                  for line in proc.stdout.splitlines() if line.startswith("H-")}
    assert len(hypotheses) == 100
    # fairseq bounds a batch by its longest source, so a hypothesis cut at the bound depends on the
    # batching; those that ended below the smallest bound any batch gives are compared.
    ended = {i: h for i, h in hypotheses.items() if len(h.split()) + 1 < int(ratio * length_pairs[i][0] + 10)}
    assert len(ended) >= 50
    return ended


def matching(reference, lines):
    """The share of the reference's sentences whose hypothesis is the same line."""
    return sum(reference[i] == lines[i] for i in reference) / len(reference)


def test_one_hypothesis_per_source_line_in_corpus_order(seqkd, corpus, reference):
    lines = (seqkd / "test.de").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(corpus.raw["test"]) == 100
    # Other batches may, rarely, flip a near-tie in the beam; a misordered output would match almost nothing.
    assert matching(reference, lines) >= 0.95


def test_two_processes_in_half_precision_give_the_output_in_corpus_order(corpus, teacher, reference, tmp_path):
    out = build_seqkd_data(corpus.data_bin, "test", teacher, tmp_path, beam=2, shards=3, cpu=True,
                           precision="fp16", workers=2).parent
    lines = (out / "test.de").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 100
    # Half precision flips more near-ties than other batches do; a misordered shard would match almost nothing.
    assert matching(reference, lines) >= 0.85
    assert json.loads((out / "settings.json").read_text())["precision"] == "fp16"


def test_one_process_per_gpu_each_on_its_own_shards(corpus, teacher, tmp_path, monkeypatch):
    """No GPU here: fairseq-generate is replaced by a stand-in that echoes each source and records its process."""
    import threading
    import time

    import torch
    from fairseq.data import Dictionary, data_utils

    import tiekd_cli.seqkd as seqkd_module

    real_run, lock, running, calls = seqkd_module.run_fairseq, threading.Lock(), [], []
    dictionary = Dictionary.load(str(corpus.data_bin / "dict.en.txt"))

    def stand_in(tool, args, env=None, **kwargs):
        if tool != "generate":
            return real_run(tool, args, env=env, **kwargs)
        with lock:
            running.append(env["CUDA_VISIBLE_DEVICES"])
            calls.append((Path(args[0]).name, env["CUDA_VISIBLE_DEVICES"], sorted(running), [str(a) for a in args]))
        time.sleep(0.3)  # long enough for the other process to start
        sources = data_utils.load_indexed_dataset(str(Path(args[0]) / "test.en-de.en"), dictionary)
        with lock:
            running.remove(env["CUDA_VISIBLE_DEVICES"])
        return "".join(f"H-{j}\t-0.5\t{dictionary.string(sentence)}\n" for j, sentence in enumerate(sources))

    monkeypatch.setattr(seqkd_module, "run_fairseq", stand_in)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    build_seqkd_data(corpus.data_bin, "test", teacher, tmp_path, beam=2, shards=5)

    assert sorted(shard for shard, *_ in calls) == [f".input-0000{i}" for i in range(5)]
    assert {device for _, device, _, _ in calls} == {"3", "5"}
    assert max(len(at_start) for *_, at_start, _ in calls) == 2
    assert all(len(set(at_start)) == len(at_start) for *_, at_start, _ in calls)  # never two on one GPU
    assert all("--fp16" in args and "--cpu" not in args for *_, args in calls)
    sources = [dictionary.string(s) for s in
               data_utils.load_indexed_dataset(str(corpus.data_bin / "test.en-de.en"), dictionary)]
    assert (tmp_path / "test.de").read_text(encoding="utf-8").splitlines() == sources


def test_explicit_length_bound_reaches_fairseq_generate(seqkd, corpus, teacher, tmp_path):
    build_seqkd_data(corpus.data_bin, "test", teacher, tmp_path, beam=2, shards=1, cpu=True,
                     max_len_a=0, max_len_b=3)
    assert max(len(line.split()) for line in (tmp_path / "test.de").read_text(encoding="utf-8").splitlines()) <= 3
    assert max(len(line.split()) for line in (seqkd / "test.de").read_text(encoding="utf-8").splitlines()) > 3


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
    assert settings["precision"] == "fp32" and settings["max_len_b"] == 10


def test_default_length_bound_clears_every_target_of_the_subset(seqkd, length_pairs):
    # A bound from a constant (fairseq's 200) or from the source alone would not be the tightest one.
    a = json.loads((seqkd / "settings.json").read_text())["max_len_a"]
    assert all(a * s + 10 >= t for s, t in length_pairs)
    assert any((a - 0.01) * s < t for s, t in length_pairs)


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
    with pytest.raises(UsageError, match=r"shard \S+/00001\.txt: 1 of 50 sentences got no hypothesis \(ids 70\)$"):
        build_seqkd_data(corpus.data_bin, "test", teacher, out, beam=2, shards=2, cpu=True)
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
    "no GPU without --cpu": (lambda corpus, seqkd, tmp: dict(cpu=False),
                             r"no GPU is visible: pass --cpu to decode on the CPU"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_decoding(case, seqkd, corpus, teacher, tmp_path):
    import torch

    if case == "no GPU without --cpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    (tmp_path / "file").write_text("")
    overrides, pattern = BAD_INPUTS[case]
    args = dict(data_bin=corpus.data_bin, subset="test", teacher=teacher, out=tmp_path / "out", beam=2, shards=2,
                cpu=True)
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
