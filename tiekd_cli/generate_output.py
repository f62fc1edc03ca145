"""Hypotheses read back from fairseq-generate, one per sentence, in corpus order."""

import re

from .shell import UsageError, id_list

HYPOTHESIS_LINE = re.compile(r"H-(\d+)\t[^\t]*\t(.*)")


def generated_hypotheses(output, first_id=0):
    """(sentence id, hypothesis) for each ``H-`` line of fairseq-generate's output; ids offset by ``first_id``."""
    return [(first_id + int(m.group(1)), m.group(2)) for m in map(HYPOTHESIS_LINE.fullmatch, output.split("\n")) if m]


def in_corpus_order(pairs, ids, where):
    """The hypothesis of each id of ``ids``, in that order: exactly one each, else one line naming which ids.

    Args:
        pairs: (sentence id, hypothesis) in any order.
        ids: the sentence ids expected (a range).
        where: what produced them, for the message.
    """
    by_id, unexpected = {}, []
    for sid, tokens in pairs:
        if sid in by_id or sid not in ids:
            unexpected.append(sid)
        by_id[sid] = tokens
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UsageError(f"{where}: {len(missing)} of {len(ids)} sentences got no hypothesis "
                         f"(ids {id_list(missing)})")
    if unexpected:
        raise UsageError(f"{where}: repeated or foreign hypotheses for ids {id_list(unexpected)}")
    return [by_id[i] for i in ids]
