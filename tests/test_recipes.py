"""The WMT recipes (examples/wmt*.sh) in smoke mode: every step but the download runs on the demo corpus."""

import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sacrebleu.metrics import BLEU
from sacremoses import MosesTokenizer

from tiekd_cli.eval import moses_tokenized
from tiekd_fairseq.errors import InputError

from conftest import BIN, REPO

RECIPES = {"wmt14_en_de": "de", "wmt14_en_fr": "fr", "wmt16_en_ro": "ro"}
STEPS = ["data", "spm", "binarize", "teacher", "ce", "wordkd", "seqkd", "tiekd", "iterate", "eval"]
DEFAULT_STEPS = [step for step in STEPS if step != "iterate"]
SYSTEMS = ["ce", "word_kd", "seq_kd", "tie_kd", "teacher"]
ROW = re.compile(r"\| (\w+) \| (\d+\.\d\d) \| (\d+\.\d\d) \|.*")
# The authors' training flags (songmzhang/NMT-KD, train_ende_*.sh), as fairseq logs its parsed arguments.
AUTHORS_FLAGS = ["clip_norm=5.0", "attention_dropout=0.1", "activation_dropout=0.1", "eval_bleu=True",
                 "eval_bleu_args='{\"beam\": 4, \"lenpen\": 0.6}'", "label_smoothing=0.1", "weight_decay=0.0",
                 "warmup_init_lr=1e-07"]


def recipe(name, work, *steps, smoke="1"):
    env = {**os.environ, "SMOKE": smoke, "WORK": str(work), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return ["bash", REPO / "examples" / f"{name}.sh", *steps], env


def run_recipe(name, work, *steps, smoke="1", **env_extra):
    cmd, env = recipe(name, work, *steps, smoke=smoke)
    return subprocess.run([str(c) for c in cmd], env={**env, **env_extra}, capture_output=True, text=True)


def mtimes(folder):
    return {path: path.stat().st_mtime_ns for path in Path(folder).rglob("*")}


def multi_bleu(hypotheses, references, lang, romanian):
    """BLEU as multi-bleu.perl on text tokenized by Moses' tokenizer -a, the reference's ’ written '."""
    tokenizer = MosesTokenizer(lang=lang)

    def tokenized(line):
        line = line.replace("’", "'")
        if romanian:
            for letters, plain in (("şș", "s"), ("ţț", "t"), ("ŞȘ", "S"), ("ŢȚ", "T"), ("ăâ", "a"), ("ĂÂ", "A"),
                                   ("î", "i"), ("Î", "I")):
                line = re.sub(f"[{letters}]", plain, line)
        return tokenizer.tokenize(line, aggressive_dash_splits=True, return_str=True)

    metric = BLEU(tokenize="none", smooth_method="none", force=True)
    return metric.corpus_score([tokenized(h) for h in hypotheses], [[tokenized(r) for r in references]]).score


def tools():
    """examples/lib/recipe_tools.py, imported from its file (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("recipe_tools", REPO / "examples" / "lib" / "recipe_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Each recipe run once with SMOKE=1, the three side by side (they mostly wait for Python to start)."""
    root = tmp_path_factory.mktemp("recipes")
    runs = {}
    for name in RECIPES:
        cmd, env = recipe(name, root / name)
        out, err = open(root / f"{name}.out", "w"), open(root / f"{name}.err", "w")
        runs[name] = (subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=err), out, err)
    results = {}
    for name, (proc, out, err) in runs.items():
        proc.wait(timeout=1800)
        out.close()
        err.close()
        stdout, stderr = (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()
        assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
        results[name] = SimpleNamespace(work=root / name, stdout=stdout, stderr=stderr)
    return results


@pytest.fixture
def en_de_copy(smoke, tmp_path):
    """A copy of the finished En-De smoke run, for tests that change it."""
    work = tmp_path / "work"
    shutil.copytree(smoke["wmt14_en_de"].work, work)
    return work


@pytest.mark.parametrize("name", RECIPES)
def test_smoke_run_scores_every_system(smoke, name):
    run, tgt = smoke[name], RECIPES[name]
    for step in DEFAULT_STEPS:
        assert f"[{name}] {step}: done" in run.stdout
        assert (run.work / "done" / step).is_file()
    # The iterate step is an extension, off by default.
    assert "iterate" not in run.stdout and not (run.work / "checkpoints" / "iterate").exists()
    table = (run.work / "results" / "results.md").read_text(encoding="utf-8")
    rows = [ROW.fullmatch(line) for line in table.splitlines() if ROW.fullmatch(line)]
    assert [row.group(1) for row in rows] == SYSTEMS
    assert all(0 <= float(row.group(2)) <= 100 and 0 <= float(row.group(3)) <= 100 for row in rows)
    assert table in run.stdout and "extension" not in table
    results = json.loads((run.work / "results" / "results.json").read_text(encoding="utf-8"))
    assert results["sentences"] == 40 and results["decoding"]["beam"] == 4 and results["decoding"]["lenpen"] == 0.6
    assert results["ref"] == str(run.work / "raw" / f"test.{tgt}")
    systems = {system["name"]: system for system in results["systems"]}
    ckpt = run.work / "checkpoints"
    # The students learn from, and the table reports, the teacher's checkpoint_best.pt.
    assert systems["teacher"]["checkpoint"] == str(ckpt / "teacher" / "checkpoint_best.pt")
    teacher_flag = f"'teacher': '{ckpt / 'teacher' / 'checkpoint_best.pt'}'"
    logs = {step: (run.work / "logs" / f"{step}.log").read_text() for step in DEFAULT_STEPS[3:-1]}
    assert teacher_flag in logs["wordkd"] and teacher_flag in logs["tiekd"]
    if name == "wmt16_en_ro":
        # En-Ro scores the students' best checkpoints.
        assert systems["tie_kd"]["checkpoint"] == str(ckpt / "tie_kd" / "checkpoint_best.pt")
    else:
        # The others their last two checkpoints, averaged up to the last update (40).
        assert systems["tie_kd"]["checkpoint"] == str(ckpt / "tie_kd" / "average.pt")
        assert f"{ckpt / 'tie_kd' / 'average.pt'}: average of checkpoint_1_40.pt, checkpoint_1_20.pt" in logs["tiekd"]
    # Beside sacreBLEU, the paper's tokenized BLEU, and for En-Ro the one without diacritics too.
    references = [line.rstrip() for line in (run.work / "raw" / f"test.{tgt}").read_text(encoding="utf-8").splitlines()]
    for system in results["systems"]:
        hypotheses = Path(system["hypotheses"]).read_text(encoding="utf-8").splitlines()
        assert system["tokenized_bleu"]["score"] == pytest.approx(multi_bleu(hypotheses, references, tgt, False))
        if tgt == "ro":
            assert system["romanian_tokenized_bleu"]["score"] == pytest.approx(
                multi_bleu(hypotheses, references, tgt, True))
        else:
            assert "romanian_tokenized_bleu" not in system
    assert "| p-value | tok. BLEU |" in table and "the convention of the paper's tables" in table
    assert ("| ro norm. tok. BLEU |" in table) == (tgt == "ro")
    # The authors' flags for the teacher and every student; En-Fr's teacher dropout is 0.1.
    for step in ("teacher", "ce", "wordkd", "seqkd", "tiekd"):
        assert all(f", {flag}," in logs[step] for flag in AUTHORS_FLAGS), step
    teacher_dropout = "0.1" if name == "wmt14_en_fr" else "0.3"
    assert f", dropout={teacher_dropout}, attention_dropout" in logs["teacher"]
    assert ", dropout=0.1, attention_dropout" in logs["tiekd"]
    # Every model records the hash of the dictionaries it was trained with.
    dictionaries = hashlib.sha256(b"".join((run.work / "data-bin" / f"dict.{lang}.txt").read_bytes()
                                           for lang in ("en", tgt))).hexdigest()
    for folder in ("teacher", "ce", "word_kd", "seq_kd", "tie_kd"):
        assert (ckpt / folder / "dictionaries.sha256").read_text().strip() == dictionaries
    # The pair's language codes all the way through.
    assert (run.work / "data-bin" / f"dict.{tgt}.txt").is_file() and (run.work / "data-bin" / "dict.en.txt").is_file()
    # Each student trained with its own loss: KD terms are logged by word_kd and tie_kd only, ranking by tie_kd.
    assert "| kd " not in logs["ce"] and "| kd " in logs["wordkd"] and "| rank " not in logs["wordkd"]
    assert "| rank " in logs["tiekd"]


@pytest.mark.parametrize("name", RECIPES)
def test_second_run_skips_every_step(smoke, name):
    work = smoke[name].work
    before = mtimes(work)
    cmd, env = recipe(name, work)
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if "skip (done" in line] == \
        [f"[{name}] {step}" for step in DEFAULT_STEPS]
    assert "running" not in proc.stdout
    assert mtimes(work) == before


@pytest.mark.parametrize("name", RECIPES)
def test_bad_step_name_is_one_line_and_runs_nothing(tmp_path, name):
    cmd, env = recipe(name, tmp_path / "work", "data", "teachr")
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"{name}.sh: error: unknown step 'teachr' (steps: {' '.join(STEPS)})"]
    assert not (tmp_path / "work").exists()


def test_step_before_its_inputs_stops_with_one_line(tmp_path):
    cmd, env = recipe("wmt14_en_de", tmp_path / "work", "teacher")
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"wmt14_en_de.sh: error: step teacher needs step binarize first (no {tmp_path / 'work' / 'done' / 'binarize'})"]
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_failing_step_shows_its_log_and_is_not_marked_done(tmp_path):
    """A recipe stops at the first failing step, shows the end of its log and writes no done-marker for it."""
    work = tmp_path / "work"
    cmd, env = recipe("wmt14_en_de", work, "data", "spm")
    proc = subprocess.run([str(c) for c in cmd], env={**env, "VOCAB_SIZE": "100000"}, capture_output=True, text=True)
    assert proc.returncode == 1
    errors = proc.stderr.splitlines()
    assert errors[-1] == f"wmt14_en_de.sh: error: step spm failed (exit 2); log: {work}/logs/spm.log"
    assert errors[-2].startswith("recipe_tools.py spm: error: ") and "Vocabulary size" in errors[-2]
    assert (work / "done" / "data").is_file() and not (work / "done" / "spm").exists()


def test_no_gpu_stops_in_one_line_unless_allowed(tmp_path):
    """SMOKE=0 without a GPU refuses a training step before anything runs; ALLOW_CPU=1 lets it through."""
    work = tmp_path / "work"
    cmd, env = recipe("wmt14_en_de", work, "teacher", smoke="0")
    proc = subprocess.run([str(c) for c in cmd], env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["wmt14_en_de.sh: error: no GPU visible for step teacher (SMOKE=0 trains "
                                        "Transformer-big); set ALLOW_CPU=1 to use the CPU"]
    assert not work.exists()
    proc = subprocess.run([str(c) for c in cmd], env={**env, "CUDA_VISIBLE_DEVICES": "", "ALLOW_CPU": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"wmt14_en_de.sh: error: step teacher needs step binarize first (no {work / 'done' / 'binarize'})"]


def test_sentencepiece_sample_is_seeded(smoke, tmp_path):
    """Two runs with one seed give one vocabulary; another seed samples other lines, hence another vocabulary."""
    text = smoke["wmt14_en_de"].work / "text"
    vocabularies = []
    for run, seed in enumerate((7, 7, 8)):
        out = tmp_path / str(run)
        out.mkdir()
        tools().train_sentencepiece(text, out, "en", "de", vocab_size=300, sentences=200, max_len=250, ratio=1.5,
                                    threads=1, seed=seed)
        assert len((out / "sample.txt").read_text(encoding="utf-8").splitlines()) == 200
        vocabularies.append((out / "spm.vocab").read_text(encoding="utf-8"))
    assert vocabularies[0] == vocabularies[1] != vocabularies[2]


def test_romanian_cedillas_become_commas_below(tmp_path):
    """The Romanian side of every split gets ș ț Ș Ț for ş ţ Ş Ţ; the English side keeps its letters."""
    raw, out = tmp_path / "raw", tmp_path / "text"
    raw.mkdir()
    out.mkdir()
    en, ro = "Şa ţe ş", "Şi ţara, Ţepeş îşi"
    for split in ("train", "valid", "test"):
        (raw / f"{split}.en").write_text(en + "\n", encoding="utf-8")
        (raw / f"{split}.ro").write_text(ro + "\n", encoding="utf-8")
    (raw / "mono.en").write_text(en + "\n", encoding="utf-8")
    tools().prepare(out, "en", "ro", [raw / "train"], raw / "valid", raw / "test", raw / "mono.en")
    for split in ("train", "valid", "test"):
        assert (out / f"{split}.ro").read_text(encoding="utf-8") == "\u0218i \u021bara, \u021aepe\u0219 \u00ee\u0219i\n"
        assert (out / f"{split}.en").read_text(encoding="utf-8") == en + "\n"


def test_invalid_utf8_in_crawled_text_stops_or_is_skipped_and_counted(tmp_path, capsys):
    """Training pairs and source-only lines of invalid UTF-8 stop the step or are dropped and counted;
    in valid or test they always stop it."""
    raw, out = tmp_path / "raw", tmp_path / "text"
    raw.mkdir()
    out.mkdir()
    (raw / "train.en").write_bytes(b"one\ntwo\nthree\n")
    (raw / "train.de").write_bytes(b"eins\nzw\xc3\n drei\n")
    (raw / "mono.en").write_bytes(b"\xffbad\ngood\n")
    for split in ("valid", "test"):
        (raw / f"{split}.en").write_bytes(b"a\n")
        (raw / f"{split}.de").write_bytes(b"b\n")
    prepare = tools().prepare
    with pytest.raises(InputError, match=r"train\.de:2: invalid UTF-8 at byte 2 of the line"):
        prepare(out, "en", "de", [raw / "train"], raw / "valid", raw / "test", raw / "mono.en")
    prepare(out, "en", "de", [raw / "train"], raw / "valid", raw / "test", raw / "mono.en", on_bad_utf8="skip")
    assert (out / "train.en").read_text() == "one\nthree\n" and (out / "train.de").read_text() == "eins\ndrei\n"
    assert (out / "mono.en").read_text() == "good\n"
    printed = capsys.readouterr().out
    assert "2 of 3 pairs kept (1 with invalid UTF-8 skipped, 0 with an empty side)" in printed
    assert "1 non-empty lines (1 with invalid UTF-8 skipped)" in printed
    (raw / "test.de").write_bytes(b"\xc3\n")
    with pytest.raises(InputError, match=r"test\.de:1: invalid UTF-8"):
        prepare(out, "en", "de", [raw / "train"], raw / "valid", raw / "test", raw / "mono.en", on_bad_utf8="skip")


def test_moses_tokenized_splits_hyphens_and_removes_romanian_diacritics():
    assert moses_tokenized(["Ein Test-Fall, it’s 3.5%."], "de") == ["Ein Test @-@ Fall , it &apos; s 3.5 % ."]
    assert moses_tokenized(["Ţara şi îşi, Ştefan-Ăla"], "ro", romanian=True) == ["Tara si isi , Stefan @-@ Ala"]
    assert moses_tokenized(["Ţara şi"], "ro") == ["Ţara şi"]


def fake_checkpoint(path, value):
    """A checkpoint in fairseq's layout whose one parameter holds ``value``."""
    torch.save({"model": OrderedDict(weight=torch.full((2,), float(value))), "cfg": {"model": None}}, path)


def test_average_stops_at_the_upper_bound(tmp_path):
    """The window is the last N checkpoints at or before the bound, whatever came after it."""
    for update in (10, 20, 30, 40, 50):
        fake_checkpoint(tmp_path / f"checkpoint_1_{update}.pt", update)
    tools().average(tmp_path, 2, 40, tmp_path / "average.pt")
    averaged = torch.load(tmp_path / "average.pt", weights_only=True)["model"]["weight"]
    assert averaged.tolist() == [35.0, 35.0]
    with pytest.raises(ValueError, match="holds 1 checkpoint_<epoch>_<update>.pt files up to update 10"):
        tools().average(tmp_path, 2, 10, tmp_path / "average.pt")


def test_truncated_checkpoint_last_is_replaced_before_training(en_de_copy):
    """A teacher killed while writing checkpoint_last.pt (and its newest interval checkpoint) resumes from the
    newest intact one, update 40, and trains on to its 60 updates."""
    teacher = en_de_copy / "checkpoints" / "teacher"
    for name in ("checkpoint_last.pt", "checkpoint_1_60.pt"):
        data = (teacher / name).read_bytes()
        (teacher / name).write_bytes(data[:len(data) // 2])
    (en_de_copy / "done" / "teacher").unlink()
    (en_de_copy / "started" / "teacher").touch()
    proc = run_recipe("wmt14_en_de", en_de_copy, "teacher")
    assert proc.returncode == 0, proc.stderr
    assert "[wmt14_en_de] teacher: resuming" in proc.stdout
    log = (en_de_copy / "logs" / "teacher.log").read_text()
    assert f"{teacher / 'checkpoint_last.pt'}: replaced by checkpoint_1_40.pt, the newest intact checkpoint" in log
    assert "(epoch 1 @ 40 updates)" in log and "num_updates 60" in log
    assert torch.load(teacher / "checkpoint_1_60.pt", weights_only=True)["optimizer_history"][-1]["num_updates"] == 60


def test_redoing_a_step_redoes_what_depends_on_it(en_de_copy):
    """Removing done/tiekd retrains TIE-KD from scratch (not from its old checkpoint_last.pt) and undoes eval,
    which read it; the other students stay done."""
    before = mtimes(en_de_copy / "done")
    (en_de_copy / "done" / "tiekd").unlink()
    proc = run_recipe("wmt14_en_de", en_de_copy, "tiekd")
    assert proc.returncode == 0, proc.stderr
    assert "[wmt14_en_de] tiekd: redoing it redoes eval" in proc.stdout
    assert not (en_de_copy / "done" / "eval").exists()
    assert all(mtimes(en_de_copy / "done")[en_de_copy / "done" / step] == before[en_de_copy / "done" / step]
               for step in ("teacher", "ce", "wordkd", "seqkd"))
    log = (en_de_copy / "logs" / "tiekd.log").read_text()
    assert "No existing checkpoint found" in log and "Loaded checkpoint" not in log


def test_stale_dictionaries_are_refused(en_de_copy):
    """After the data-bin's dictionaries change, neither a resumed student nor a new one trains on."""
    for lang in ("en", "de"):
        with open(en_de_copy / "data-bin" / f"dict.{lang}.txt", "a", encoding="utf-8") as f:
            f.write("zzz 1\n")
    (en_de_copy / "done" / "ce").unlink()
    (en_de_copy / "started" / "ce").touch()
    proc = run_recipe("wmt14_en_de", en_de_copy, "ce")
    assert proc.returncode == 1
    assert (f"wmt14_en_de.sh: error: {en_de_copy / 'checkpoints' / 'ce'} was trained with other dictionaries than "
            f"{en_de_copy / 'data-bin'} has now") in proc.stderr
    (en_de_copy / "done" / "wordkd").unlink()
    proc = run_recipe("wmt14_en_de", en_de_copy, "wordkd")
    assert proc.returncode == 1
    assert f"{en_de_copy / 'checkpoints' / 'teacher'} was trained with other dictionaries" in proc.stderr
    assert not (en_de_copy / "checkpoints" / "word_kd" / "checkpoint_last.pt").exists()


def test_iterate_runs_when_asked_and_is_labelled_an_extension(en_de_copy):
    """ITERATE=1 adds the iterate step; it undoes eval, which then scores it as an extension."""
    proc = run_recipe("wmt14_en_de", en_de_copy, ITERATE="1")
    assert proc.returncode == 0, proc.stderr
    assert "[wmt14_en_de] iterate: redoing it redoes eval" in proc.stdout
    assert "[wmt14_en_de] eval: done" in proc.stdout
    assert len((en_de_copy / "checkpoints" / "iterate" / "rounds" / "rounds.tsv").read_text().splitlines()) == 3
    table = (en_de_copy / "results" / "results.md").read_text(encoding="utf-8")
    assert [row.group(1) for row in map(ROW.fullmatch, table.splitlines()) if row] == \
        ["ce", "word_kd", "seq_kd", "tie_kd", "iterate_ext", "teacher"]
    assert "iterate_ext: our extension, not in the paper: up to 2 rounds of 20 more updates" in table


# The authors' flags (songmzhang/NMT-KD: train_ende_big_teacher.sh, train_ende_student_baseline.sh,
# train_ende_vanilla_word_kd.sh, train_ende_tie_kd.sh, average_ckpts.sh, interactive_ende.sh), in our names:
# their --teacher-checkpoint, --kd-rate, --topk, --iter-times, --num-update-checkpoints and
# --checkpoint-upper-bound are --teacher, --kd-alpha, --kd-topk, --kd-iterations, --last and --upper-bound.
AUTHORS_TRAIN = {
    "--share-all-embeddings": True, "--weight-decay": "0.0", "--attention-dropout": "0.1",
    "--activation-dropout": "0.1", "--label-smoothing": "0.1", "--optimizer": "adam", "--adam-betas": "(0.9, 0.98)",
    "--clip-norm": "5.0", "--lr-scheduler": "inverse_sqrt", "--eval-bleu": True,
    "--eval-bleu-args": '{"beam": 4, "lenpen": 0.6}', "--best-checkpoint-metric": "bleu",
    "--maximize-best-checkpoint-metric": True, "--warmup-updates": "4000", "--warmup-init-lr": "1e-07",
    "--max-tokens": "4096", "--update-freq": "2", "--save-interval-updates": "5000", "--fp16": True,
    "--distributed-world-size": "4",
}
AUTHORS_TEACHER = {"--arch": "transformer_vaswani_wmt_en_de_big", "--dropout": "0.3", "--lr": "5e-4",
                   "--max-update": "300000", "--criterion": "label_smoothed_cross_entropy"}
AUTHORS_STUDENT = {"--arch": "transformer", "--dropout": "0.1", "--lr": "7e-4", "--max-update": "200000"}
AUTHORS_KD = {"word_kd": {"--criterion": "word_kd", "--kd-alpha": "0.5"},
              "tie_kd": {"--criterion": "tie_kd", "--kd-alpha": "0.5", "--kd-topk": "5", "--kd-iterations": "3"}}


def flags(words):
    """{--flag: value, or True for a flag without one} of a command line's words."""
    found = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            found[word] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
    return found


def dry_run(name, **env_extra):
    """The command lines of a recipe's dry run for 4 GPUs, by their first words' step: {step: [words, ...]}."""
    proc = run_recipe(name, Path("/nonexistent/work"), smoke="0", DRY_RUN="1", GPUS="4", **env_extra)
    assert proc.returncode == 0, proc.stderr
    commands, step = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("# step "):
            step = line.split()[2]
        elif not line.startswith("#"):
            commands.setdefault(step, []).append(shlex.split(line))
    return commands


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_commands_carry_the_authors_flags(name):
    """Every training command of the dry run has the authors' flags, the pair's own schedule aside."""
    commands = dry_run(name)
    assert list(commands) == DEFAULT_STEPS and not Path("/nonexistent/work").exists()
    teacher = dict(AUTHORS_TEACHER)
    student = dict(AUTHORS_STUDENT)
    upper_bound = "200000"
    if name == "wmt14_en_fr":
        teacher.update({"--arch": "transformer_vaswani_wmt_en_fr_big", "--dropout": "0.1"})
    if name == "wmt16_en_ro":
        teacher.update({"--max-update": "50000", "--save-interval-updates": "1000"})
        student.update({"--max-update": "40000", "--save-interval-updates": "1000"})
    train = {words[words.index("--save-dir") + 1].rsplit("/", 1)[1]: flags(words)
             for step in ("teacher", "ce", "wordkd", "seqkd", "tiekd") for words in commands[step]
             if words[0] == "fairseq-train"}
    assert sorted(train) == ["ce", "seq_kd", "teacher", "tie_kd", "word_kd"]
    for model, found in train.items():
        expected = {**AUTHORS_TRAIN, **(teacher if model == "teacher" else student), **AUTHORS_KD.get(model, {})}
        assert {flag: found.get(flag) for flag in expected} == expected, model
        assert found["--ddp-backend"] == "pytorch_ddp"
        if model in AUTHORS_KD:
            assert found["--teacher"] == "/nonexistent/work/checkpoints/teacher/checkpoint_best.pt"
    # Seq-KD: one decoding process per GPU, in half precision, as the students train.
    seqkd = flags(next(words for words in commands["seqkd"] if words[0] == "tiekd-seqkd"))
    assert (seqkd["--workers"], seqkd["--precision"], seqkd["--beam"]) == ("4", "fp16", "5")
    evaluation = flags(commands["eval"][0])
    assert evaluation["--beam"] == "4" and evaluation["--lenpen"] == "0.6" and evaluation["--tokenized-bleu"]
    if name == "wmt16_en_ro":
        assert commands["eval"][0][3:7] == [f"/nonexistent/work/checkpoints/{model}/checkpoint_best.pt"
                                            for model in ("ce", "word_kd", "seq_kd", "tie_kd")]
    else:
        averages = [flags(words) for step in ("ce", "wordkd", "seqkd", "tiekd") for words in commands[step]
                    if words[1].endswith("recipe_tools.py")]
        assert [(found["--last"], found["--upper-bound"]) for found in averages] == [("5", upper_bound)] * 4
    # The authors' DDP is one variable away.
    legacy = dry_run(name, DDP_BACKEND="legacy_ddp")
    assert {flags(words)["--ddp-backend"] for words in legacy["teacher"] if words[0] == "fairseq-train"} == \
        {"legacy_ddp"}


def test_gpu_count_not_dividing_the_batch_warns():
    """On 3 GPUs an update cannot hold the paper's 8 x 4096 tokens: the recipe says what it does instead."""
    proc = run_recipe("wmt14_en_de", Path("/nonexistent/work"), "teacher", smoke="0", DRY_RUN="1", GPUS="3")
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == ["[wmt14_en_de] warning: 3 GPUs do not divide the paper's 8 x 4096 tokens per "
                                        "update; with UPDATE_FREQ=3 an update has 9 x 4096"]
    assert flags(shlex.split(proc.stdout.splitlines()[1]))["--update-freq"] == "3"


def test_news_crawl_is_fetched_only_by_iterate():
    """The source-only text is downloaded by the iterate step, which runs only when asked, not by the data step."""
    default = run_recipe("wmt14_en_de", Path("/nonexistent/work"), smoke="0", DRY_RUN="1", GPUS="4")
    assert default.returncode == 0 and "news-crawl" not in default.stdout and "--mono" not in default.stdout
    iterate = run_recipe("wmt14_en_de", Path("/nonexistent/work"), smoke="0", DRY_RUN="1", GPUS="4", ITERATE="1")
    assert iterate.returncode == 0
    lines = iterate.stdout.split("# step iterate\n")[1].splitlines()
    assert lines[0] == ("# the first 4000000 lines of http://data.statmt.org/news-crawl/en/news.2017.en.shuffled."
                        "deduped.gz into /nonexistent/work/orig/mono.en.4000000")
    assert shlex.split(lines[1])[2:] == ["mono", "--text", "/nonexistent/work/orig/mono.en.4000000", "--out",
                                         "/nonexistent/work/text/mono.en", "--lang", "en", "--on-bad-utf8", "stop"]


# Each corpus archive's real internal layout (files <member>.<lang>, or .<lang>.gz where the archive has them
# compressed), and each pair's sacreBLEU valid and test set names.
LAYOUTS = {
    "wmt14_en_de": {
        "training-parallel-europarl-v7.tgz": ["training/europarl-v7.de-en"],
        "training-parallel-commoncrawl.tgz": ["commoncrawl.de-en"],
        "training-parallel-nc-v9.tgz": ["training/news-commentary-v9.de-en"],
    },
    "wmt14_en_fr": {
        "training-parallel-europarl-v7.tgz": ["training/europarl-v7.fr-en"],
        "training-parallel-commoncrawl.tgz": ["commoncrawl.fr-en"],
        "training-parallel-un.tgz": ["un/undoc.2000.fr-en"],
        "training-parallel-nc-v9.tgz": ["training/news-commentary-v9.fr-en"],
        "training-giga-fren.tar": ["giga-fren.release2.fixed.gz"],
    },
    "wmt16_en_ro": {
        "training-parallel-ep-v8.tgz": ["training-parallel-ep-v8/europarl-v8.ro-en"],
        "en-ro.txt.zip": ["SETIMES.en-ro"],
    },
}
TEST_SETS = {"wmt14_en_de": ("wmt13", "wmt14/full"), "wmt14_en_fr": ("wmt13", "wmt14/full"),
             "wmt16_en_ro": ("wmt16/dev", "wmt16")}


def demo_pairs(split, count):
    sides = [lzma.open(REPO / "examples" / "demo" / "data" / f"lohelp.{split}.{lang}.xz", "rt",
                       encoding="utf-8").read().splitlines()[:count] for lang in ("en", "de")]
    return list(zip(*sides))


def offline_corpora(name, orig, pairs_per_corpus):
    """Tiny archives laid out as the real ones, and a sacreBLEU cache, where the recipe looks before downloading;
    returns the pairs each training file holds, in order."""
    tgt = RECIPES[name]
    orig.mkdir(parents=True)
    pairs = demo_pairs("train", 2000)
    written = []
    for archive, members in LAYOUTS[name].items():
        staging = orig.parent / "staging" / archive
        for member in members:
            chunk, pairs = pairs[:pairs_per_corpus], pairs[pairs_per_corpus:]
            written += chunk
            for side, lang in enumerate(("en", tgt)):
                text = "".join(pair[side] + "\n" for pair in chunk).encode("utf-8")
                if member.endswith(".gz"):
                    path = staging / f"{member[:-3]}.{lang}.gz"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(gzip.compress(text))
                else:
                    path = staging / f"{member}.{lang}"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(text)
        files = sorted(path for path in staging.rglob("*") if path.is_file())
        if archive.endswith(".zip"):
            with zipfile.ZipFile(orig / archive, "w") as z:
                for path in files:
                    z.write(path, path.relative_to(staging).as_posix())
        else:
            with tarfile.open(orig / archive, "w:gz" if archive.endswith(".tgz") else "w") as t:
                for path in files:
                    t.add(path, path.relative_to(staging).as_posix())
    for testset, split in zip(TEST_SETS[name], ("valid", "test")):
        cache = orig / "sacrebleu" / testset
        cache.mkdir(parents=True, exist_ok=True)
        chunk = demo_pairs(split, 20)
        fields = {"src": [en for en, _ in chunk], "ref": [other for _, other in chunk], "docid": ["d"] * 20,
                  "genre": ["news"] * 20, "origlang": ["en"] * 20}
        for field, lines in fields.items():
            (cache / f"{testset.replace('/', '_')}.en-{tgt}.{field}").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8")
    return written


@pytest.mark.parametrize("name", RECIPES)
def test_full_data_path_runs_offline(tmp_path, name):
    """SMOKE=0 data, spm and binarize on tiny archives with the corpora's real layout: every corpus is read,
    the test sets come from sacreBLEU; redoing data extracts nothing again and redoes spm and binarize."""
    tgt, work = RECIPES[name], tmp_path / "work"
    written = offline_corpora(name, work / "orig", 150)
    env = {"VOCAB_SIZE": "200", "SPM_SENTENCES": "0", "WORKERS": "1"}
    proc = run_recipe(name, work, "data", "spm", "binarize", smoke="0", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [(work / "text" / f"train.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("en", tgt)]
    assert list(zip(*train)) == [(" ".join(en.split()), " ".join(other.split())) for en, other in written]
    assert (work / "raw" / f"test.{tgt}").read_text(encoding="utf-8").splitlines() == \
        [other for _, other in demo_pairs("test", 20)]
    assert (work / "data-bin" / f"train.en-{tgt}.{tgt}.bin").is_file()
    extracted = {path: path.stat().st_mtime_ns for path in (work / "orig").rglob("*") if path.is_file()}
    (work / "done" / "data").unlink()
    proc = run_recipe(name, work, "data", smoke="0", **env)
    assert proc.returncode == 0, proc.stderr
    assert "extracting" not in (work / "logs" / "data.log").read_text()
    assert {path: path.stat().st_mtime_ns for path in extracted} == extracted
    assert f"[{name}] data: redoing it redoes spm" in proc.stdout and not (work / "done" / "binarize").exists()
