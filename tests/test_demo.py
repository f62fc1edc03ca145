"""`make demo`'s pipeline in the tiny profile: every stage with the shipped teacher, the report, resuming, skipping."""

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

from conftest import run
from tiekd_fairseq.cli import UsageError
from tiekd_fairseq.demo import DEMO_DIR, ITERATED, STUDENTS, Demo

TOOL = Path(sys.executable).parent / "tiekd-demo"
STAGES = ["data", *STUDENTS, "iterate", "evaluate", "analyze", "report"]


def _kill_when(proc, log, text, timeout=600):
    """SIGKILL the demo and its fairseq children once ``log`` holds ``text``."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert proc.poll() is None, f"the demo ended before {log} said {text!r}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{log} did not say {text!r} in {timeout}s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_tiny_demo_resumes_after_a_kill_reports_and_skips_finished_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [str(TOOL), "--profile", "tiny", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Killed (with its fairseq-train) once word_kd has saved a mid-run checkpoint, update 5 of 12.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    _kill_when(proc, out / "word_kd" / "train.log", "@ 5 updates")
    assert not (out / "stages" / "word_kd.done").exists()

    second = run(cmd)
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
    third = run(cmd)
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
    proc = run([TOOL, "--profile", "huge"], check=False)
    assert proc.returncode == 2
    assert "invalid choice: 'huge'" in proc.stderr
