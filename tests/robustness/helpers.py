"""What the robustness cases share: the case ledger, the one-line refusal check, small inputs, processes to kill."""

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder
from test_iterate import options

LEDGER = pytest.StashKey["Ledger"]()


class _Absent:
    def __repr__(self):
        return "ABSENT"


ABSENT = _Absent()  # what a path that does not exist holds
FOLDER = "folder"  # what a folder inside a snapshot holds (its files are listed beside it)


def digest(path):
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def contents(path, read=digest):
    """What ``path`` holds: ``read(path)`` of a file; of a folder, {relative path: read(file) or FOLDER} for
    everything under it; ABSENT if nothing is there."""
    path = Path(path)
    if not path.exists():
        return ABSENT
    if not path.is_dir():
        return read(path)
    return {p.relative_to(path).as_posix(): FOLDER if p.is_dir() else read(p) for p in sorted(path.rglob("*"))}


def differences(what, got, want, rtol=0.0, atol=0.0):
    """How ``got`` differs from ``want``, one line each; none when they are the same.

    Args:
        what: the name of the data, at the start of each line.
        got, want: ABSENT, dicts (compared key by key: a key of ``want`` not in ``got`` is missing,
            one only in ``got`` is extra), tensors (equal, or within ``rtol``/``atol`` when either is
            given; NaN is never equal), or values compared with ``==``.
    """
    if got is ABSENT or want is ABSENT:
        return [] if got is want else [f"{what}: missing" if got is ABSENT else f"{what}: appeared"]
    if isinstance(got, dict) and isinstance(want, dict):
        found = [f"{what}/{key}: missing" for key in want if key not in got]
        found += [f"{what}/{key}: extra" for key in got if key not in want]
        for key in want:
            if key in got:
                found += differences(f"{what}/{key}", got[key], want[key], rtol, atol)
        return found
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
        if got.shape != want.shape:
            return [f"{what}: shape {tuple(got.shape)}, not {tuple(want.shape)}"]
        if rtol or atol:
            same = torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)
        else:
            same = got.dtype == want.dtype and torch.equal(got, want)
        return [] if same else [f"{what}: changed"]
    if got == want:
        return []
    shown = f" ({got!r}, not {want!r})"
    return [f"{what}: changed" + (shown if len(shown) <= 80 else "")]  # not a file's digest


def _not_finite(what, tensors):
    tensors = tensors if isinstance(tensors, dict) else {"": tensors}
    return [f"{what}{'/' if key else ''}{key}: not finite" for key, value in tensors.items()
            if value.is_floating_point() and not torch.isfinite(value).all()]


class Case:
    """One robustness case: a fault provoked on purpose and the data it must not lose (see the conftest).

    Args:
        request: the pytest request of the test, or of the fixture that runs a scenario shared by
            several tests (the case then belongs to the tests that use that fixture).
        fault: what is provoked, in a few words; unique among the cases.
        protects: the data at stake, in a few words.
    """

    def __init__(self, request, fault, protects):
        self.fault, self.protects = fault, protects
        self.node = request.node
        self.fixture = None if request.scope == "function" else request.fixturename
        self.outcome = None  # "intact" or "lost" once verified
        self.found = []
        self._checks = []
        request.config.stash[LEDGER].declare(self)

    def keep(self, *paths):
        """Snapshot ``paths`` now, before the fault: at verify each must hold what it held (every file the
        same bytes, nothing added to or missing from a folder, an absent path still absent)."""
        for path in paths:
            before = contents(path)
            self._checks.append(lambda path=path, before=before: differences(str(path), contents(path), before))

    def same(self, what, got, want, rtol=0.0, atol=0.0):
        """``got``, the data after the fault, must equal ``want``, a reference made without it
        (compared as ``differences`` does)."""
        self._checks.append(lambda: differences(what, got, want, rtol, atol))

    def finite(self, what, tensors):
        """Every floating-point tensor of ``tensors`` (a tensor, or a dict of them) must be finite."""
        self._checks.append(lambda: _not_finite(what, tensors))

    def verify(self):
        """Measure the protected data: record the case intact or lost, and fail naming what was lost."""
        assert self._checks, f"case {self.fault!r} protects nothing: keep, same or finite must come first"
        self.found = [line for check in self._checks for line in check()]
        self.outcome = "lost" if self.found else "intact"
        assert not self.found, f"{self.fault}: protected data lost:\n" + "\n".join(self.found)


def _first(found, shown=3):
    """The first differences of a lost case, for its line under the summary (the test lists them all)."""
    more = f"; and {len(found) - shown} more" if len(found) > shown else ""
    return "".join(f"; {line}" for line in found[:shown]) + more


class Ledger:
    """The cases of one pytest run and the outcomes of its tests: what the summary line counts."""

    def __init__(self, folder):
        self.folder = folder  # node ids under it are robustness tests (for modules that fail to collect)
        self.cases = {}
        self.fixtures = {}  # node id -> the fixtures the test uses
        self.tests = {}  # node id -> "passed", "failed" or "skipped": the worst of setup, call and teardown
        self.uncollected = []
        self.merged = False  # True in a pytest-xdist controller, which holds its workers' cases

    def declare(self, case):
        assert case.fault not in self.cases, f"two robustness cases are named {case.fault!r}"
        self.cases[case.fault] = case

    def record(self, report):
        previous = self.tests.get(report.nodeid, "passed")
        if report.failed or previous == "failed":
            self.tests[report.nodeid] = "failed"
        elif report.skipped or previous == "skipped":
            self.tests[report.nodeid] = "skipped"
        else:
            self.tests[report.nodeid] = "passed"

    def tests_of(self, case):
        """The node ids of the tests a case belongs to: the test that declared it, or the tests that use the
        fixture that declared it, except those that declare a case of their own."""
        if case.fixture is None:
            return [case.node.nodeid]
        own = {c.node.nodeid for c in self.cases.values() if c.fixture is None}
        scope = case.node.nodeid
        return [nodeid for nodeid, fixtures in self.fixtures.items()
                if case.fixture in fixtures and nodeid not in own
                and (not scope or nodeid.startswith(scope + "::"))]

    def outcome(self, case):
        """lost (data measured missing or changed), unchecked (never measured), skipped, failed (intact,
        but a test of the case failed) or handled (intact and its tests passed)."""
        tests = [self.tests[nodeid] for nodeid in self.tests_of(case) if nodeid in self.tests]
        if case.outcome == "lost":
            return "lost"
        if tests and all(t == "skipped" for t in tests):
            return "skipped"
        if case.outcome is None:
            return "unchecked"
        return "failed" if "failed" in tests else "handled"

    def to_wire(self):
        """What a pytest-xdist worker sends its controller: plain data, merged there by ``merge``."""
        cases = [{"fault": c.fault, "nodeid": c.node.nodeid, "fixture": c.fixture, "outcome": c.outcome,
                  "found": list(c.found)} for c in self.cases.values()]
        return {"folder": self.folder, "cases": cases, "fixtures": {k: sorted(v) for k, v in self.fixtures.items()},
                "tests": dict(self.tests), "uncollected": list(self.uncollected)}

    def merge(self, wire):
        """Add a worker's cases and test outcomes (``to_wire``) to this ledger."""
        for case in wire["cases"]:
            self.declare(SimpleNamespace(**{**case, "node": SimpleNamespace(nodeid=case["nodeid"])}))
        self.fixtures.update((k, set(v)) for k, v in wire["fixtures"].items())
        self.tests.update(wire["tests"])
        self.uncollected += wire["uncollected"]
        self.merged = True

    def summary(self):
        """``robustness: N cases, H handled, L lost`` (then the other outcomes and modules not collected,
        when there are any), and a line for each case not handled."""
        if not self.cases and not self.uncollected:
            return []
        outcomes = {fault: self.outcome(case) for fault, case in self.cases.items()}
        count = {kind: sum(o == kind for o in outcomes.values())
                 for kind in ("handled", "lost", "unchecked", "failed", "skipped")}
        line = f"robustness: {len(self.cases)} cases, {count['handled']} handled, {count['lost']} lost"
        line += "".join(f", {count[kind]} {kind}" for kind in ("unchecked", "failed", "skipped") if count[kind])
        if self.uncollected:
            line += f", {len(self.uncollected)} modules not collected ({', '.join(self.uncollected)})"
        details = [f"  {outcome}: {fault}" + _first(self.cases[fault].found)
                   for fault, outcome in outcomes.items() if outcome != "handled"]
        return [line, *details]


def refused(exception, message, call, *args, **kwargs):
    """Assert that ``call`` raises ``exception`` whose message is exactly the one line ``message``.

    A SystemExit of translation_kd carries the prefix fairseq-train prints; it is left out here.
    """
    with pytest.raises(exception) as err:
        call(*args, **kwargs)
    seen = str(err.value).removeprefix("translation_kd: error: ")
    assert seen == message and "\n" not in seen, seen


def write(path, content):
    """``path`` holding ``content`` (text as UTF-8, or bytes as given)."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def source_only_shard(lines, dest, dictionary_file):
    """What ``fairseq-preprocess --only-source --source-lang en --srcdict DICT`` writes for ``lines``.

    Made in this process with fairseq's own encoder and writer: the shard is the input of
    these cases, not what they test, and a preprocess run would cost seconds each.
    """
    dictionary = Dictionary.load(str(dictionary_file))
    dest.mkdir(parents=True)
    shutil.copy(dictionary_file, dest / "dict.en.txt")
    builder = MMapIndexedDatasetBuilder(str(dest / "train.en-None.en.bin"), dtype=np.uint16)
    for line in lines:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False))
    builder.finalize(str(dest / "train.en-None.en.idx"))
    return dest


def iterate_options(corpus, teacher, save_dir, mono=None):
    """tiekd-iterate's keyword arguments and command line for one round (mono: the raw training source by default)."""
    return options(corpus, teacher, SimpleNamespace(path=mono or corpus.root / "raw.train.en"), save_dir, rounds=1)


def iterate_kwargs(corpus, teacher, save_dir, mono=None, **overrides):
    return {**iterate_options(corpus, teacher, save_dir, mono)[0], **overrides}


def start(argv):
    """A command started in its own process group, so that a kill reaches the fairseq processes it runs too."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    output = tempfile.TemporaryFile()  # not a pipe: unread, a full pipe would block the command
    proc = subprocess.Popen([str(arg) for arg in argv], env=env, stdout=output, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.output = output
    return proc


def wait_for(proc, condition, what, timeout=300):
    """Poll until ``condition()`` holds; fail (killing ``proc``) if the command ends or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"{proc.args[0]} ended or timed out before {what}:\n{_tail(proc)}")
        time.sleep(0.02)


@contextmanager
def alongside(argv):
    """Run ``argv`` in the background (on the other core) while the block runs; it must succeed."""
    proc = start(argv)
    try:
        yield
    except BaseException:
        kill(proc)
        raise
    if proc.wait() != 0:
        pytest.fail(f"{proc.args[0]} exited {proc.returncode}:\n{_tail(proc)}")


def _tail(proc):
    proc.output.seek(0)
    return proc.output.read()[-3000:].decode(errors="replace")


def kill(proc):
    """SIGKILL the command and every process it started; return its exit status."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # all of them already gone
        pass
    return proc.wait()
