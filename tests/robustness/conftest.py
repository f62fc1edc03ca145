"""Counts the robustness cases: each test under this folder is one case, handled if it passed.

At the end of any run that included them, ``pytest`` prints one line:
``robustness: N cases, H handled, L lost`` (plus ``, S skipped`` if any were skipped).
A module that cannot even be collected counts as one lost case.
"""

import os
from pathlib import Path

_outcomes = {}
_prefix = None  # this folder in node ids, which are relative to the rootdir


def pytest_configure(config):
    global _prefix
    _prefix = Path(os.path.relpath(Path(__file__).parent, config.rootpath)).as_posix() + "/"


def _ours(report):
    return report.nodeid.startswith(_prefix)


def pytest_runtest_logreport(report):
    if not _ours(report):
        return
    # setup, call and teardown each report; the worst of them is the case's outcome.
    outcome = "lost" if report.failed else "skipped" if report.skipped else "handled"
    previous = _outcomes.get(report.nodeid)
    if previous is None or previous == "handled" or outcome == "lost":
        _outcomes[report.nodeid] = outcome


def pytest_collectreport(report):
    if report.failed and _ours(report):
        _outcomes[report.nodeid] = "lost"


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    counts = {kind: sum(1 for o in _outcomes.values() if o == kind) for kind in ("handled", "lost", "skipped")}
    line = f"robustness: {len(_outcomes)} cases, {counts['handled']} handled, {counts['lost']} lost"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    terminalreporter.write_line(line)
