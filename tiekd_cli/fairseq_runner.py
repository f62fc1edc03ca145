"""fairseq's commands run as subprocesses of this Python, with the plugin, a log and a progress bar."""

import os
import re
import subprocess
import sys

from tqdm import tqdm

import tiekd_fairseq

# The folder fairseq imports as --user-dir.
PLUGIN_DIR = tiekd_fairseq.__path__[0]

# What every fairseq-generate run of ours passes: the plugin (torch >= 2.6 reads fairseq
# checkpoints only with its allow-list), the plain translation task, and a batch-size
# multiple of 1 (with fairseq's default of 8 its batching silently drops the last batch
# of a subset, the one with the longest sentences, when its size is not a multiple of 8).
GENERATE_FLAGS = ("--user-dir", PLUGIN_DIR, "--task", "translation", "--required-batch-size-multiple", 1)
UPDATES = re.compile(r"num_updates[\"=:\s]+(\d+)")


class ToolFailed(RuntimeError):
    """A command exited non-zero; ``line`` is its own last output line, ``log`` the file with all of it (or None)."""

    def __init__(self, command, code, line, log=None, output=""):
        self.line, self.log, self.output = line, log, output
        super().__init__(f"{command} exited with {code}: {line}" + (f" (log: {log})" if log else ""))


def last_line(text):
    """The last non-blank line of ``text``, stripped ('' if none)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def run_fairseq(tool, args, log_path=None, progress=None, env=None):
    """Run ``fairseq_cli.<tool>`` (train, generate, preprocess, ...); a non-zero exit raises ToolFailed.

    Args:
        tool: the module of ``fairseq_cli`` to run.
        args: its command-line arguments (converted with ``str``).
        log_path: where the command line and the output (stdout and stderr) are appended; None captures
            them and returns the stdout.
        progress: ``(description, total updates)`` for a progress bar that follows a training run's log.
        env: variables added to this process's environment for the command (a GPU to use, a thread count).
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *[str(a) for a in args]]
    env = {**os.environ, **(env or {})}
    if log_path is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise ToolFailed(f"fairseq-{tool}", proc.returncode, last_line(proc.stderr) or last_line(proc.stdout),
                             output=(proc.stdout + proc.stderr)[-3000:])
        return proc.stdout
    desc, total = progress or (tool, None)
    bar = tqdm(total=total, desc=desc, unit="upd", leave=False, disable=total is None)
    tail = ""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # Unbuffered: the progress bar moves as fairseq logs, not when a pipe buffer fills.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, "PYTHONUNBUFFERED": "1"})
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
