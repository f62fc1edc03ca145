"""What the robustness cases share: the one-line refusal check, small inputs, processes to kill."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder
from test_iterate import options


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
