"""How flat the student is: its entropy, summed over positions."""

import torch

from .chunking import row_chunks
from .precision import compute_dtype


@torch.no_grad()
def entropy_sum(logits: torch.Tensor, mask: torch.Tensor, max_rows=None) -> torch.Tensor:
    """The sum over the positions in ``mask`` of the entropy of softmax(logits), in nats; no gradient.

    Args:
        logits: (..., V) student logits (or log-probabilities).
        mask: (...) the positions counted.
        max_rows: positions whose (positions x V) temporaries exist at once (None: all).

    Returns:
        0-dim tensor in the compute dtype.
    """
    dtype = compute_dtype(logits)
    s, m = logits.reshape(-1, logits.size(-1)), mask.reshape(-1)
    total = torch.zeros((), dtype=dtype, device=logits.device)
    for r in row_chunks(s.size(0), max_rows):
        x = s[r].to(dtype)
        lse = torch.logsumexp(x, dim=-1)
        # H = logsumexp(s) - sum_v p_v s_v
        total += ((lse - torch.linalg.vecdot(torch.softmax(x, dim=-1), x)) * m[r]).sum()
    return total
