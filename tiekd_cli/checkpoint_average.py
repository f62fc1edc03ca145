"""Averaging the last N checkpoints of a training folder, as fairseq's ``scripts/average_checkpoints.py`` does.

That script is not part of fairseq's installed package, so ``tiekd-eval`` and the recipes use this one.
"""

import re
from collections import OrderedDict
from pathlib import Path

import torch

import tiekd_fairseq  # noqa: F401  (its allow-list lets torch.load read fairseq checkpoints)

from .files import atomic_write
from .shell import UsageError

# As in fairseq's script: the number is the epoch, or the update with --average-updates.
CHECKPOINT_PATTERNS = {False: re.compile(r"checkpoint(\d+)\.pt"), True: re.compile(r"checkpoint_\d+_(\d+)\.pt")}


def last_checkpoints(folder, n, update_based=False):
    """The last ``n`` ``checkpoint<epoch>.pt`` (``checkpoint_<epoch>_<update>.pt``) of ``folder``, newest first."""
    pattern = CHECKPOINT_PATTERNS[update_based]
    found = sorted(
        ((int(m.group(1)), path) for path in Path(folder).iterdir() if (m := pattern.fullmatch(path.name))),
        reverse=True,
    )
    if len(found) < n:
        kind = "checkpoint_<epoch>_<update>.pt" if update_based else "checkpoint<epoch>.pt"
        raise UsageError(f"--average-last {n}: {folder} holds {len(found)} {kind} files")
    return [path for _, path in found[:n]]


def average_checkpoints(paths):
    """The first checkpoint's state with each parameter replaced by its mean over ``paths``.

    fp16 parameters are summed (and kept) in fp32; integer buffers are floor-divided, as fairseq does.
    """
    state, sums = None, OrderedDict()
    for path in paths:
        loaded = torch.load(path, map_location="cpu")
        if state is None:
            state = loaded
        params = loaded["model"]
        if list(params) != list(state["model"]):
            raise UsageError(f"checkpoint {path} has other parameters than {paths[0]}: they cannot be averaged")
        for key, param in params.items():
            param = param.float() if param.dtype == torch.half else param
            # clone(): a shared (tied) parameter must not be summed into twice.
            sums[key] = param.clone() if key not in sums else sums[key] + param
    for key, total in sums.items():
        sums[key] = total.div_(len(paths)) if total.is_floating_point() else total // len(paths)
    state["model"] = sums
    return state


def save_checkpoint(state, path):
    """``torch.save`` to ``path`` whole."""
    atomic_write(path, lambda f: torch.save(state, f))
