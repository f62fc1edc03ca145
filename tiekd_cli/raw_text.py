"""Reading raw text: strict UTF-8, one segment a line, errors that name the file and line."""

import lzma
from pathlib import Path

from .shell import UsageError


class RawTextError(UsageError, ValueError):
    """A raw text file that cannot be used as it is; the message names the file and line.

    A UsageError, so the command-line tools print it as their one error line.
    """


def iter_lines(path):
    """The lines of a UTF-8 text file (``.xz`` decompressed), without line ends, one at a time.

    Splits on ``\\n`` only, so a stray carriage return or form feed inside a
    segment does not shift the lines of one side of a parallel corpus.
    """
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                yield line.rstrip(b"\n").decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as e:
                raise RawTextError(f"{path}:{number}: invalid UTF-8 at byte {e.start} of the line") from None


def read_lines(path):
    """All the lines of ``iter_lines(path)`` as a list."""
    return list(iter_lines(path))


def read_parallel(source, target):
    """The line pairs of two aligned files; refuses different line counts and a segment empty on one side only."""
    src, tgt = read_lines(source), read_lines(target)
    if len(src) != len(tgt):
        raise RawTextError(f"{source} has {len(src)} lines but {target} has {len(tgt)}; they must align line by line")
    for number, (s, t) in enumerate(zip(src, tgt), 1):
        if bool(s.strip()) != bool(t.strip()):
            empty, other = (source, target) if not s.strip() else (target, source)
            raise RawTextError(f"{empty}:{number}: empty line, but line {number} of {other} is not")
    return list(zip(src, tgt))
