"""The robustness summary counts cases by their protected data, measured: controls, not cases, about the counting.

A pytest run of made-up cases (pytester, in this process) whose data is kept, changed, deleted or
joined by a half-written file, a case never verified, one intact whose test fails, a scenario two
tests share, and a control.
"""

import math

import torch

from .helpers import ABSENT, differences

pytest_plugins = ["pytester"]

CASES = '''
import pytest

from robustness.helpers import Case


@pytest.fixture(scope="module")
def scenario(request, tmp_path_factory):
    shared = Case(request, "a scenario two tests share", "its file")
    path = tmp_path_factory.mktemp("shared") / "data.txt"
    path.write_text("kept")
    shared.keep(path)
    shared.verify()
    return path


def test_shared_first(scenario):
    assert scenario.read_text() == "kept"


def test_shared_second(scenario):
    assert scenario.exists()


def protected_file(case, tmp_path, fault):
    protected = case(fault, "data.txt, and nothing in out")
    (tmp_path / "data.txt").write_text("kept")
    protected.keep(tmp_path / "data.txt", tmp_path / "out")
    return protected, tmp_path / "data.txt"


def test_intact(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault that loses nothing")
    protected.verify()


def test_changed(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault that changes the file")
    path.write_text("kepT")
    protected.verify()


def test_deleted(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault that deletes the file")
    path.unlink()
    protected.verify()


def test_half_written(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault that leaves a half-written output")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part").write_text("")
    protected.verify()


def test_never_verified(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault whose check never runs")
    raise RuntimeError("stopped before the check")


def test_intact_but_failing(case, tmp_path):
    protected, path = protected_file(case, tmp_path, "a fault handled with the wrong message")
    protected.verify()
    assert "the message" == "another message"


def test_control():
    assert 1 + 1 == 2
'''


def test_the_summary_counts_cases_by_their_measured_data(pytester):
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest("-p", "robustness.conftest")
    # Controls and the shared scenario's tests pass, as does the intact case; the other five fail.
    result.assert_outcomes(passed=4, failed=5)
    summary = [line for line in result.outlines if line.startswith("robustness:")]
    # 7 cases: the scenario once for its two tests, the control not at all.
    assert summary == ["robustness: 7 cases, 2 handled, 3 lost, 1 unchecked, 1 failed"]
    details = result.outlines[result.outlines.index(summary[0]) + 1:][:5]
    assert sorted(line.split(";")[0] for line in details) == [
        "  failed: a fault handled with the wrong message",
        "  lost: a fault that changes the file",
        "  lost: a fault that deletes the file",
        "  lost: a fault that leaves a half-written output",
        "  unchecked: a fault whose check never runs",
    ]
    changed, deleted, half_written = (next(line for line in details if fault in line)
                                      for fault in ("changes", "deletes", "half-written"))
    assert changed.endswith("/test_changed0/data.txt: changed")
    assert deleted.endswith("/test_deleted0/data.txt: missing")
    assert half_written.endswith("/test_half_written0/out: appeared")


def test_in_memory_data_differs_by_key_value_and_nan():
    want = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    assert differences("params", {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}, want) == []
    assert differences("params", {"w": torch.tensor([1.0, 2.0 + 1e-6])}, want) == [
        "params/b: missing", "params/w: changed"]
    assert differences("params", {**want, "w": torch.tensor([1.0, 2.0 + 1e-6])}, want, rtol=1e-5) == []
    # A NaN is never equal to the reference, not even to a NaN.
    nan = {"w": torch.tensor([1.0, math.nan]), "b": torch.tensor([0.5])}
    assert differences("params", nan, nan) == ["params/w: changed"]
    assert differences("params", nan, nan, rtol=1e-5) == ["params/w: changed"]
    assert differences("params", {**want, "extra": torch.zeros(1)}, want) == ["params/extra: extra"]
    assert differences("out", ABSENT, ABSENT) == [] and differences("out", {}, ABSENT) == ["out: appeared"]
