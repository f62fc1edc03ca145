"""A teacher trained on one machine loads on another: dictionaries found beside it, no machine path shipped."""

import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from conftest import REPO, data_bin_with_swapped_symbols, fairseq, kd_train_args, run

EXPORT = Path(sys.executable).parent / "tiekd-export-teacher"
# An absolute path inside binary data: a slash not glued to a name, then at least one "folder/".
ABSOLUTE_PATH = re.compile(rb"(?<![A-Za-z0-9._+-])/(?:[A-Za-z0-9._+-]+/)+[A-Za-z0-9._+-]*")


def _absolute_paths(value, where="state"):
    """(where, string) for every string in a checkpoint's non-tensor data that names an absolute path."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _absolute_paths(item, f"{where}.{key}")]
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in _absolute_paths(item, f"{where}[{i}]")]
    if isinstance(value, str) and any(part.startswith("/") for part in value.split(":")):
        return [(where, value)]
    return []


def _load(path):
    import tiekd_fairseq  # noqa: F401  (allow-lists fairseq's checkpoint globals)

    return torch.load(path, map_location="cpu", weights_only=True)


def _committed(*suffixes):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in files if f.endswith(suffixes)]


def test_no_committed_checkpoint_or_model_file_holds_an_absolute_path():
    checkpoints, models = _committed(".pt"), _committed(".model")
    assert checkpoints and models, "the shipped teacher's files are committed"
    for path in checkpoints:
        state = _load(path)
        assert _absolute_paths({k: v for k, v in state.items() if k != "model"}) == [], path
    for path in models:
        assert ABSOLUTE_PATH.findall(path.read_bytes()) == [], path


def test_the_path_scan_finds_the_paths_of_a_fresh_checkpoint_and_sentencepiece_model(corpus, teacher):
    # The control of the test above: files made on this machine do hold its paths.
    found = dict(_absolute_paths(_load(teacher)["cfg"]))
    assert found["state.task.data"] == str(corpus.data_bin)
    assert str(corpus.root).encode() in b" ".join(ABSOLUTE_PATH.findall((corpus.root / "spm.model").read_bytes()))


@pytest.fixture(scope="module")
def exported(corpus, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    run([EXPORT, teacher, "--out", out, "--spm-model", corpus.root / "spm.model"])
    return out


def test_export_keeps_the_weights_bit_for_bit_and_clears_every_machine_path(exported, corpus, teacher):
    assert sorted(p.name for p in exported.iterdir()) == ["SHA256SUMS", "dict.de.txt", "dict.en.txt", "spm.model",
                                                           "teacher.pt"]
    original, shipped = _load(teacher), _load(exported / "teacher.pt")
    assert shipped["model"].keys() == original["model"].keys()
    for name, tensor in original["model"].items():
        assert shipped["model"][name].dtype == tensor.dtype and torch.equal(shipped["model"][name], tensor), name
    assert _absolute_paths({k: v for k, v in shipped.items() if k != "model"}) == []
    assert shipped["last_optimizer_state"] is None
    assert shipped["cfg"]["model"].encoder_layers == original["cfg"]["model"].encoder_layers
    for lang in ("en", "de"):
        assert (exported / f"dict.{lang}.txt").read_bytes() == (corpus.data_bin / f"dict.{lang}.txt").read_bytes()
    sums = dict(reversed(line.split()) for line in (exported / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == ["dict.de.txt", "dict.en.txt", "spm.model", "teacher.pt"]
    out = run(["sha256sum", "--check", "SHA256SUMS"], cwd=exported).stdout
    assert out.count(": OK") == 4


def test_the_exported_sentencepiece_model_encodes_alike_without_its_training_paths(exported, corpus):
    import sentencepiece as spm

    data = (exported / "spm.model").read_bytes()
    assert ABSOLUTE_PATH.findall(data) == []
    before = spm.SentencePieceProcessor(model_file=str(corpus.root / "spm.model"))
    after = spm.SentencePieceProcessor(model_file=str(exported / "spm.model"))
    text = [pair[i] for pair in corpus.raw["valid"] for i in (0, 1)]
    assert after.encode(text) == before.encode(text)
    assert [after.id_to_piece(i) for i in range(after.get_piece_size())] == \
        [before.id_to_piece(i) for i in range(before.get_piece_size())]


def test_fp16_export_halves_the_floating_point_weights(corpus, teacher, tmp_path):
    run([EXPORT, teacher, "--out", tmp_path, "--fp16"])
    original, shipped = _load(teacher)["model"], _load(tmp_path / "teacher.pt")["model"]
    for name, tensor in original.items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert shipped[name].dtype == expected.dtype and torch.equal(shipped[name], expected), name


def test_an_exported_teacher_alone_in_a_new_folder_trains_a_student(exported, corpus, tmp_path):
    moved = tmp_path / "elsewhere" / "teacher"
    shutil.copytree(exported, moved)
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, moved / "teacher.pt", tmp_path / "s",
                                                   "--max-update", "1", "--disable-validation"))
    assert f"teacher {moved / 'teacher.pt'}: transformer" in proc.stdout + proc.stderr


def _moved_teacher(teacher, folder, recorded):
    """The teacher checkpoint in ``folder``, alone, recording ``recorded`` as its data dir."""
    state = _load(teacher)
    state["cfg"]["task"]["data"] = str(recorded)
    folder.mkdir(parents=True)
    torch.save(state, folder / "teacher.pt")
    return folder / "teacher.pt"


def _train_one_update(corpus, checkpoint, save_dir, *extra):
    return fairseq("fairseq-train", *kd_train_args(corpus.data_bin, checkpoint, save_dir, "--max-update", "1",
                                                   "--disable-validation", *extra), check=False)


def test_without_dictionaries_anywhere_the_error_names_every_place_tried(corpus, teacher, tmp_path):
    gone, empty = tmp_path / "gone", tmp_path / "empty"
    empty.mkdir()
    checkpoint = _moved_teacher(teacher, tmp_path / "moved", gone)
    proc = _train_one_update(corpus, checkpoint, tmp_path / "s", "--teacher-data", empty)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"translation_kd: error: teacher dictionaries dict.en.txt and dict.de.txt not found (checkpoints do not "
        f"store them) in --teacher-data {empty}, the checkpoint's folder {tmp_path / 'moved'}, the data dir "
        f"recorded in the checkpoint {gone}; pass --teacher-data DIR holding them")


def test_a_teacher_data_path_that_is_not_a_folder_is_one_line(corpus, teacher, tmp_path):
    proc = _train_one_update(corpus, teacher, tmp_path / "s", "--teacher-data", tmp_path / "typo")
    typo = tmp_path / "typo"
    assert proc.stderr.strip().splitlines()[-1] == f"translation_kd: error: --teacher-data {typo} is not a folder"


@pytest.mark.parametrize("first, second", [("teacher_data", "beside"), ("beside", "recorded")])
def test_dictionaries_are_looked_for_in_order(first, second, corpus, teacher, tmp_path):
    """Swapped symbols in the place searched first are refused, though the next place holds the right ones."""
    from tiekd_fairseq.data.data_bin import translation_task
    from tiekd_fairseq.data.dictionaries import DictionaryError
    from tiekd_fairseq.frozen_model import load_frozen_model

    places = {name: tmp_path / name for name in ("teacher_data", "beside", "recorded")}
    swapped = data_bin_with_swapped_symbols(corpus.data_bin, places[first])
    shutil.copytree(corpus.data_bin, places[second], dirs_exist_ok=True)
    for name, folder in places.items():
        folder.mkdir(exist_ok=True)
    checkpoint = places["beside"] / "teacher.pt"
    state = _load(teacher)
    state["cfg"]["task"]["data"] = str(places["recorded"])
    torch.save(state, checkpoint)
    task = translation_task(corpus.data_bin, "valid")
    teacher_data = places["teacher_data"] if first == "teacher_data" else None
    with pytest.raises(DictionaryError, match=rf"dictionary {re.escape(str(places[first]))}/dict\.en\.txt differs "
                                            rf"from the task's: first difference at index 14: teacher has "
                                            rf"'{re.escape(swapped[0])}'"):
        load_frozen_model(str(checkpoint), task, teacher_data)
    # Without the swapped folder the next place serves.
    shutil.rmtree(places[first])
    places[first].mkdir()
    if first == "beside":
        torch.save(state, checkpoint)
    assert load_frozen_model(str(checkpoint), task, teacher_data).model is not None


def test_export_refuses_dictionaries_that_do_not_fit_the_embeddings(corpus, teacher, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for lang in ("en", "de"):
        lines = (corpus.data_bin / f"dict.{lang}.txt").read_text().splitlines()
        (other / f"dict.{lang}.txt").write_text("\n".join(lines[:-8]) + "\n")
    proc = run([EXPORT, teacher, "--out", tmp_path / "out", "--teacher-data", other], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.fullmatch(rf"tiekd-export-teacher: error: dictionary {re.escape(str(other))}/dict\.en\.txt has \d+ "
                        r"symbols but the checkpoint's encoder embedding has \d+ rows: not the dictionary it was "
                        r"trained with", proc.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_export_without_a_language_pair_asks_for_one(teacher, tmp_path):
    alone = _moved_teacher(teacher, tmp_path / "alone", tmp_path / "gone")
    proc = run([EXPORT, alone, "--out", tmp_path / "out"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("tiekd-export-teacher: error: the checkpoint records no language "
                                                    "pair and no data-bin names one: pass --source-lang and "
                                                    "--target-lang")
    assert os.listdir(tmp_path) == ["alone"]
