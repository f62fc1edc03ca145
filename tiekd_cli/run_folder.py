"""The folder of a resumable run: a lock, the settings it started with, done markers, outputs staged whole."""

import fcntl
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_write_text
from .shell import UsageError

LOCK, DONE = ".lock", "done"


class RunFolder:
    """A folder owned by one run at a time; a rerun with the same settings goes on where the last one stopped.

    Use it as a context manager: entering creates and locks the folder (the kernel drops
    the lock when the process dies, SIGKILL included), records the settings or refuses
    other ones, and removes the temporary files a killed run left.

    Args:
        path: the folder.
        settings: JSON-able settings of the run; a rerun must bring the same.
        command: the command's name, for messages.
        flag: the option that named the folder (``--out``, ``--save-dir``), for messages.
        settings_file: the file that keeps the settings.
    """

    def __init__(self, path, settings, command, flag="--out", settings_file="settings.json"):
        self.path, self.command, self.flag = Path(path), command, flag
        self.settings = json.loads(json.dumps(settings))
        self.settings_path = self.path / settings_file
        self._lock = None

    def __enter__(self):
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.flag} {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK, "a")
        except OSError as err:
            raise UsageError(f"cannot use {self.flag} {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._check_settings()
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"another {self.command} run is using {self.flag} {self.path} (it holds {LOCK})") from None
        except BaseException:
            self._lock.close()
            raise
        for stale in self.path.glob(".*.tmp"):  # written by a killed run, never renamed into place
            stale.unlink()
        return self

    def __exit__(self, *exc):
        self._lock.close()

    def _check_settings(self):
        if not self.settings_path.is_file():
            if any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise UsageError(f"{self.flag} {self.path} holds files but no {self.settings_path.name}: "
                                 "use a new or empty folder")
            atomic_write_text(self.settings_path, json.dumps(self.settings, indent=1) + "\n")
            return
        old = json.loads(self.settings_path.read_text(encoding="utf-8"))
        for key in dict.fromkeys([*self.settings, *old]):
            if old.get(key) != self.settings.get(key):
                raise UsageError(f"{self.path} holds a run with other settings ({key} {old.get(key)!r} there, "
                                 f"{self.settings.get(key)!r} now): rerun with the same arguments or use another "
                                 f"{self.flag}")

    def done(self, name) -> bool:
        """Whether step ``name`` has finished."""
        return (self.path / DONE / name).is_file()

    def note(self, name):
        """What step ``name`` recorded when it finished; None if it has not."""
        marker = self.path / DONE / name
        return marker.read_text(encoding="utf-8").rstrip("\n") if marker.is_file() else None

    def mark_done(self, name, note=""):
        """Record that step ``name`` has finished, with a one-line ``note``."""
        (self.path / DONE).mkdir(exist_ok=True)
        atomic_write_text(self.path / DONE / name, f"{note}\n")

    @contextmanager
    def staged(self, final):
        """Yield an empty ``.<name>.partial`` folder beside ``final``, renamed to ``final`` when the block ends well.

        A folder left by a killed run is emptied first, so ``final`` only ever appears whole.
        """
        final = Path(final)
        partial = final.with_name(f".{final.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        yield partial
        partial.rename(final)
