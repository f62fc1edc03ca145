"""The shell of every command: ``main(argv)`` calls a library function, and bad input is one line and exit 2."""

import sys

from tiekd_fairseq.errors import InputError


class UsageError(InputError):
    """Bad command-line input: the message is one line naming what is wrong and where (file, flag, symbol)."""


def run_tool(prog, main, argv=None):
    """Call ``main(argv)``; any InputError (the plugin's too) becomes ``prog: error: message`` and exit status 2."""
    try:
        return main(argv)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def id_list(ids, shown=20):
    """Sentence ids for a message: the first ``shown``, then how many more."""
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return ", ".join(map(str, ids[:shown])) + more


def positive(**flags):
    """Refuse the first flag whose value is given and below 1: ``positive(**{"--beam": beam})``."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
