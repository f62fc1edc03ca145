"""Errors that stop a run before it starts, in one line, and how to make any exception one line."""


class InputError(Exception):
    """Bad input: the message is one line naming what is wrong and where (file, flag, symbol)."""


def one_line(err: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
