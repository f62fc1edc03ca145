"""What the command-line tools share: one-line errors, fairseq's CLIs as subprocesses, atomic files.

Each tool is a thin shell: ``main(argv)`` parses arguments and calls a library
function that tests call directly; bad input raises ``UsageError``, which the
shell prints as one line before any expensive work starts.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm


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


class ToolFailed(RuntimeError):
    """A command exited non-zero; ``line`` is its own last output line, ``log`` the file with all of it (or None)."""

    def __init__(self, command, code, line, log=None, output=""):
        self.line, self.log, self.output = line, log, output
        super().__init__(f"{command} exited with {code}: {line}" + (f" (log: {log})" if log else ""))


def last_line(text):
    """The last non-blank line of ``text``, stripped ('' if none)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


UPDATES = re.compile(r"num_updates[\"=:\s]+(\d+)")


def run_fairseq(tool, args, log_path=None, progress=None):
    """Run ``fairseq_cli.<tool>`` (train, generate, preprocess, ...) with this Python; failure raises ToolFailed.

    Args:
        tool: the module of ``fairseq_cli`` to run.
        args: its command-line arguments (converted with ``str``).
        log_path: where the command line and its output (stdout and stderr) are appended; None captures them
            and returns the stdout.
        progress: ``(description, total updates)`` for a progress bar that follows a training run's log.
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *[str(a) for a in args]]
    if log_path is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            raise ToolFailed(f"fairseq-{tool}", proc.returncode, last_line(proc.stderr) or last_line(proc.stdout),
                             output=output[-3000:])
        return proc.stdout
    desc, total = progress or (tool, None)
    bar = tqdm(total=total, desc=desc, unit="upd", leave=False, disable=total is None)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # Unbuffered: the progress bar moves as fairseq logs, not when a pipe buffer fills.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail = ""
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail = line if line.strip() else tail
            found = UPDATES.findall(line)
            if found:
                bar.update(int(found[-1]) - bar.n)
        code = proc.wait()
    bar.close()
    if code != 0:
        raise ToolFailed(f"fairseq-{tool}", code, tail.strip(), log=log_path)
    return None


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


def sha256_file(path):
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def id_list(ids, shown=20):
    """Sentence ids for a message: the first ``shown``, then how many more."""
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return ", ".join(map(str, ids[:shown])) + more
