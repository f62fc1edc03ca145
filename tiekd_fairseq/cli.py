"""What the command-line tools share: one-line errors, fairseq's CLIs as subprocesses, atomic files.

Each tool is a thin shell: ``main(argv)`` parses arguments and calls a library
function that tests call directly; bad input raises ``UsageError``, which the
shell prints as one line before any expensive work starts.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


PLUGIN_DIR = Path(__file__).resolve().parent

# What every fairseq-generate run of ours passes: the plugin (torch >= 2.6 reads fairseq
# checkpoints only with its allow-list), the plain translation task, and a batch-size
# multiple of 1 (with fairseq's default of 8 its batching silently drops the last batch
# of a subset, the one with the longest sentences, when its size is not a multiple of 8).
GENERATE_FLAGS = ("--user-dir", PLUGIN_DIR, "--task", "translation", "--required-batch-size-multiple", 1)


class UsageError(Exception):
    """Bad input: the message is one line naming what is wrong and where (file, flag, symbol)."""


def run_tool(prog, main, argv=None):
    """Call ``main(argv)``; a UsageError becomes ``prog: error: message`` on stderr and exit status 2."""
    try:
        return main(argv)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(err):
    """An exception as ``Type: first line of its message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def kill_point(name):
    """Test-only: SIGKILL this process here if the environment variable TIEKD_TEST_KILL_AT equals ``name``."""
    if os.environ.get("TIEKD_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def require_file(path, what):
    if not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist")
    return Path(path)


def run_fairseq(tool, args, log_path=None):
    """Run ``fairseq_cli.<tool>`` (train, generate, preprocess, ...) with this Python.

    Output goes to ``log_path`` when given (else it is captured); a failure raises
    RuntimeError with the last lines of that output. Returns the captured stdout.
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *[str(a) for a in args]]
    if log_path is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        output, tail = proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    else:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        output = tail = Path(log_path).read_text()[-3000:]
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-{tool} exited with {proc.returncode}:\n{tail}")
    return output


def atomic_write(path, write):
    """Call ``write(f)`` on a binary file in ``path``'s folder, then rename it to ``path``: never half a file there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        kill_point(path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` whole, via a temporary file and a rename."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def make_output_dir(out):
    """Create ``--out`` (a Path) or stop with one line saying why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable")


def record_run_settings(plan_path, plan):
    """Record the settings of a new run; a rerun must have the same, or its shards would mix two runs."""
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        for key, value in plan.items():
            if old.get(key) != value:
                raise UsageError(f"{plan_path.parent} holds shards of another run ({key} {old.get(key)!r} "
                                 f"there, {value!r} now): use another --out or delete that folder")
    else:
        plan_path.parent.mkdir(exist_ok=True)
        atomic_write_text(plan_path, json.dumps(plan, indent=1) + "\n")


def id_list(ids, shown=20):
    """Sentence ids for a message: the first ``shown``, then how many more."""
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return ", ".join(map(str, ids[:shown])) + more
