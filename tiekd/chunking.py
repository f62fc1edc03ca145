"""Chunks of positions that keep the KD terms' dense temporaries within a memory budget."""

# A bound on the dense fp32 (chunk positions x vocabulary) blocks the KD terms hold at once, forward or
# backward (up to 6.5 measured, fp16 logits with a temperature): what a memory budget is divided by.
DENSE_BLOCKS = 8


def max_rows_for_budget(vocab: int, budget_bytes: int):
    """The most positions whose dense KD temporaries fit in ``budget_bytes`` (at least 1); None without a budget.

    Args:
        vocab: V, the vocabulary size.
        budget_bytes: the budget; 0 or less means no budget.
    """
    if budget_bytes <= 0:
        return None
    return max(1, budget_bytes // (DENSE_BLOCKS * vocab * 4))


def row_chunks(rows: int, max_rows=None):
    """Slices covering ``rows`` positions, ``max_rows`` at a time (one slice when None)."""
    step = max(1, min(rows, max_rows or rows))
    return [slice(i, i + step) for i in range(0, max(rows, 1), step)]
