"""Files written whole (a temporary name, then a rename), checksums, and checks of the files a command is given."""

import hashlib
import os
import signal
import tempfile
from pathlib import Path

from .shell import UsageError


def kill_point(name):
    """Test-only: SIGKILL this process here if the environment variable TIEKD_TEST_KILL_AT equals ``name``."""
    if os.environ.get("TIEKD_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
    """Write ``text`` (UTF-8) to ``path`` whole."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_lines(path, lines):
    """Write ``lines`` (strings without line ends) to ``path`` whole, one a line."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def sha256_file(path):
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_file(path, what):
    """``Path(path)``, or a UsageError naming ``what`` if it is not a file."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist")
    return Path(path)


def file_fingerprint(path):
    """What tells a rerun's input file from the first run's: its absolute path, size and modification time."""
    if path is None:
        return None
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
