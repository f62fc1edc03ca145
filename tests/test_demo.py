"""`make demo`'s pipeline in the tiny profile: every stage with the shipped teacher, the report, resuming, skipping."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiekd_cli.shell import UsageError

from conftest import REPO, run

DEMO_DIR = REPO / "examples" / "demo"
sys.path.insert(0, str(DEMO_DIR))
from run_demo import ITERATED, STUDENTS, Demo  # noqa: E402

SCRIPT = Path("examples") / "demo" / "run_demo.py"
STAGES = ["data", *STUDENTS, "iterate", "evaluate", "analyze", "report"]


def _kill_when(proc, log, pattern, timeout=600):
    """SIGKILL the demo and its fairseq children once ``log`` holds a match of ``pattern``."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and re.search(pattern, log.read_text())):
        assert proc.poll() is None, f"the demo ended before {log} said {pattern!r}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{log} did not say {pattern!r} in {timeout}s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _clone(folder):
    """The project's files (tracked, and new ones git does not ignore) copied into ``folder``, nothing else."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


def test_tiny_demo_from_a_clone_in_a_new_folder_resumes_after_a_kill_and_skips_finished_stages(tmp_path):
    clone = _clone(tmp_path / "new" / "tiekd-fairseq")
    out = tmp_path / "demo"
    # The clone's own recipe; the packages it imports are the installed ones.
    cmd = [sys.executable, SCRIPT, "--profile", "tiny", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Killed (with its fairseq-train) once word_kd has saved a mid-run checkpoint, update 5 of 12.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=clone)
    # "Saved" is logged once checkpoint_last.pt is written too ("Preparing to save ... @ 5 updates" comes before).
    _kill_when(proc, out / "word_kd" / "train.log", r"Saved checkpoint \S+ \(epoch \d+ @ 5 updates")
    assert not (out / "done" / "word_kd").exists()
    assert json.loads((out / "settings.json").read_text())["teacher"] == str(clone / "examples/demo/teacher/teacher.pt")

    second = run(cmd, cwd=clone)
    assert "[1/8] data: done before, skipped" in second.stdout
    assert "[2/8] ce: done before, skipped" in second.stdout
    for stage in STAGES[2:]:
        assert f"{stage}: finished" in second.stdout, second.stdout
    resumed = (out / "word_kd" / "train.log").read_text()
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 5 updates\)", resumed), resumed[-2000:]

    results = json.loads((out / "eval" / "results.json").read_text())
    bleu = {s["name"]: s["bleu"]["score"] for s in results["systems"]}
    assert list(bleu) == [*STUDENTS, ITERATED, "teacher"]
    # The shipped teacher is trained; students of a dozen updates are not.
    assert bleu["teacher"] > 10 + max(v for k, v in bleu.items() if k != "teacher")
    report = (out / "results.md").read_text()
    for name, score in bleu.items():
        assert f"| {name} | {score:.2f} |" in report
    assert "nrefs:1|" in report and "bs:100|" in report  # sacreBLEU's signatures, bootstrap of 100
    assert (out / "bleu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in (*STUDENTS, ITERATED):
        assert f"| {name} | [0, 0.4) |" in report

    report_time = (out / "results.md").stat().st_mtime_ns
    third = run(cmd, cwd=clone)
    for number, stage in enumerate(STAGES, 1):
        assert f"[{number}/8] {stage}: done before, skipped" in third.stdout
    assert (out / "results.md").stat().st_mtime_ns == report_time
    assert f"| teacher | {bleu['teacher']:.2f} |" in third.stdout


def test_a_damaged_teacher_is_refused_before_any_work(tmp_path):
    shipped = tmp_path / "teacher"
    shutil.copytree(DEMO_DIR / "teacher", shipped)
    data = bytearray((shipped / "teacher.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (shipped / "teacher.pt").write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"teacher\.pt does not match its checksum in .*SHA256SUMS"):
        Demo(tmp_path / "out", "tiny", shipped_teacher=shipped).run()
    assert not (tmp_path / "out").exists()


def test_an_unknown_profile_is_one_line():
    proc = run([sys.executable, REPO / SCRIPT, "--profile", "huge"], check=False)
    assert proc.returncode == 2
    assert "invalid choice: 'huge'" in proc.stderr


def _demo_with_changed_teacher(tmp_path, name, change):
    """Run the tiny demo from a clone whose shipped teacher file ``name`` became ``change(bytes)``, checksums
    renewed. Returns (process, the clone's teacher folder, the demo's output folder)."""
    shipped = _clone(tmp_path / "clone") / "examples" / "demo" / "teacher"
    (shipped / name).write_bytes(change((shipped / name).read_bytes()))
    lines = [f"{hashlib.sha256((shipped / n).read_bytes()).hexdigest()}  {n}\n"
             for n in ("teacher.pt", "dict.en.txt", "dict.de.txt", "spm.model")]
    (shipped / "SHA256SUMS").write_text("".join(lines))
    out = tmp_path / "out"
    proc = run([sys.executable, SCRIPT, "--profile", "tiny", "--out", out], check=False, cwd=tmp_path / "clone")
    return proc, shipped, out


def _swap_lines_10_and_11(data):
    lines = data.decode().splitlines(keepends=True)
    lines[10], lines[11] = lines[11], lines[10]
    return "".join(lines).encode()


def test_a_failing_fairseq_stage_is_one_line_naming_the_stage_its_error_and_its_log(tmp_path):
    proc, shipped, out = _demo_with_changed_teacher(tmp_path, "dict.de.txt", _swap_lines_10_and_11)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    first, second = (line.split()[0] for line in (shipped / "dict.de.txt").read_text().splitlines()[10:12])
    error = (f"translation_kd: error: teacher target dictionary {shipped}/dict.de.txt differs from the task's: "
             f"first difference at index 14: teacher has {first!r}, task has {second!r}")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"make demo: stage word_kd failed: {error} (log: {out}/word_kd/train.log)")
    assert (out / "word_kd" / "train.log").read_text().strip().splitlines()[-1] == error
    assert (out / "done" / "ce").is_file() and not (out / "done" / "word_kd").exists()


def test_a_failing_stage_inside_the_demo_is_one_line_with_the_traceback_in_its_log(tmp_path):
    proc, _, out = _demo_with_changed_teacher(tmp_path, "spm.model", lambda data: data[: len(data) // 2])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"make demo: stage data failed: \w+: .+ \(log: {re.escape(str(out))}/logs/data\.log\)",
                        last), last
    assert "Traceback" in (out / "logs" / "data.log").read_text()
    assert not (out / "done" / "data").exists()
