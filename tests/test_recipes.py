"""The WMT recipes (examples/wmt*.sh) in smoke mode: every step but the download runs on the demo corpus."""

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BIN, REPO

RECIPES = {"wmt14_en_de": "de", "wmt14_en_fr": "fr", "wmt16_en_ro": "ro"}
STEPS = ["data", "spm", "binarize", "teacher", "ce", "wordkd", "seqkd", "tiekd", "iterate", "eval"]
SYSTEMS = ["ce", "word_kd", "seq_kd", "tie_kd", "iterate", "teacher"]
ROW = re.compile(r"\| (\w+) \| (\d+\.\d\d) \| (\d+\.\d\d) \|.*")


def recipe(name, work, *steps, smoke="1"):
    env = {**os.environ, "SMOKE": smoke, "WORK": str(work), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return ["bash", REPO / "examples" / f"{name}.sh", *steps], env


def mtimes(folder):
    return {path: path.stat().st_mtime_ns for path in Path(folder).rglob("*")}


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


@pytest.mark.parametrize("name", RECIPES)
def test_smoke_run_scores_every_system(smoke, name):
    run, tgt = smoke[name], RECIPES[name]
    for step in STEPS:
        assert f"[{name}] {step}: done" in run.stdout
        assert (run.work / "done" / step).is_file()
    table = (run.work / "results" / "results.md").read_text(encoding="utf-8")
    rows = [ROW.fullmatch(line) for line in table.splitlines() if ROW.fullmatch(line)]
    assert [row.group(1) for row in rows] == SYSTEMS
    assert all(0 <= float(row.group(2)) <= 100 and 0 <= float(row.group(3)) <= 100 for row in rows)
    assert table in run.stdout
    results = json.loads((run.work / "results" / "results.json").read_text(encoding="utf-8"))
    assert results["sentences"] == 40 and results["decoding"]["beam"] == 4 and results["decoding"]["lenpen"] == 0.6
    assert results["ref"] == str(run.work / "raw" / f"test.{tgt}")
    # Students are averaged over their last two checkpoints; the teacher's average was made by the teacher step.
    systems = {system["name"]: system for system in results["systems"]}
    assert [Path(p).name for p in systems["tie_kd"]["averaged_from"]] == ["checkpoint_1_40.pt", "checkpoint_1_20.pt"]
    assert systems["teacher"]["checkpoint"] == str(run.work / "checkpoints" / "teacher" / "average.pt")
    # The pair's language codes all the way through, and the iterative stage ran its two rounds.
    assert (run.work / "data-bin" / f"dict.{tgt}.txt").is_file() and (run.work / "data-bin" / "dict.en.txt").is_file()
    assert len((run.work / "checkpoints" / "iterate" / "rounds.tsv").read_text().splitlines()) == 3
    # Each student trained with its own loss: KD terms are logged by word_kd and tie_kd only, ranking by tie_kd.
    logs = {step: (run.work / "logs" / f"{step}.log").read_text() for step in ("ce", "wordkd", "tiekd")}
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
        [f"[{name}] {step}" for step in STEPS]
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
