"""Counts the robustness cases: each provokes one fault and checks, after it, the data that fault must not lose.

Declaring a case in a test::

    def test_a_truncated_teacher_is_refused(case, tmp_path):
        protected = case("a truncated teacher checkpoint", "the checkpoint; no cache output")
        protected.keep(tmp_path)  # before the fault: every file's bytes, and what is absent
        ...                       # the fault, and the test's own assertions
        protected.verify()        # intact, or lost: the test fails naming each difference

- ``case(fault, protects)``: the fixture; ``fault`` names the case (unique), ``protects`` the data at stake.
  A fixture that runs a scenario several tests share calls ``helpers.Case(request, fault, protects)``
  instead: the case counts once, for the tests using that fixture (but those declaring their own).
- ``keep(*paths)``: files or folders as they are now; at verify nothing in them may be changed, missing
  or added, and a path absent now must still be absent (no half-written output).
- ``same(what, got, want, rtol=0, atol=0)``: the data after the fault against a reference made without
  it: values, dicts, tensors, or ``helpers.contents(path)`` of files and folders.
- ``finite(what, tensors)``: a tensor, or a dict of them, with no NaN or inf.
- ``verify()``: once, after the fault; a case never verified is unchecked, not handled.

At the end of any run that included cases, ``pytest`` prints one line,
``robustness: N cases, H handled, L lost``: handled, the case's data was verified intact and its tests
passed; lost, the data was measured missing or changed. When there are any, it adds the cases never
verified (unchecked), those intact whose tests failed (failed), skipped ones, and modules here that did
not collect, then names each case not handled. Tests that provoke no fault are controls: they declare
no case and are not counted.
"""

import functools
import os
from pathlib import Path

import pytest

from .helpers import LEDGER, Case, Ledger


def pytest_configure(config):
    folder = Path(os.path.relpath(Path(__file__).parent, config.rootpath)).as_posix() + "/"
    config.stash[LEDGER] = Ledger(folder)


@pytest.fixture
def case(request):
    """``case(fault, protects)``: declare this test's robustness case (a ``helpers.Case``)."""
    return functools.partial(Case, request)


def pytest_collection_modifyitems(config, items):
    config.stash[LEDGER].fixtures.update((item.nodeid, set(item.fixturenames)) for item in items)


# The ledger lives on the config, not in this module: a pytest run inside a test (pytester) has its own.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.config.stash[LEDGER].record(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    ledger = collector.config.stash[LEDGER]
    if report.failed and report.nodeid.startswith(ledger.folder):
        ledger.uncollected.append(report.nodeid)
    return report


def pytest_terminal_summary(terminalreporter, config):
    # A pytest-xdist controller's ledger holds its workers' cases: tests/conftest.py prints that one.
    if not config.stash[LEDGER].merged:
        for line in config.stash[LEDGER].summary():
            terminalreporter.write_line(line)
