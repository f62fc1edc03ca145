"""Reading checkpoints: refuse a missing, truncated, crafted or foreign file in one line, before any work."""

import os
import re
import zipfile

import torch

from .errors import InputError, one_line

ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(InputError):
    """A checkpoint that cannot be read; the message names the file and why."""


def load_error(path, role, err) -> str:
    """One line saying why torch could not load the checkpoint ``path`` (``role``: teacher, student, ...)."""
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(err), re.IGNORECASE)
    if refused:
        return (f"{role} checkpoint {path} refused: it asks to load {refused.group(1)}, "
                "which is not a fairseq checkpoint global (a checkpoint may not run code)")
    with open(path, "rb") as f:
        zipped = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if zipped and not zipfile.is_zipfile(path):
        return f"{role} checkpoint {path} is truncated: its zip archive has no end (a partial write?)"
    return f"cannot read {role} checkpoint {path}: {one_line(err)}"


def check_checkpoint(path, role):
    """Refuse with a CheckpointError a checkpoint that is missing, truncated, crafted or not fairseq's.

    Its tensors are memory-mapped, not read, so this costs little even for a large file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{role} checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as err:
        raise CheckpointError(load_error(path, role, err)) from None
    if not isinstance(state, dict) or state.get("model") is None or not (state.get("args") or state.get("cfg")):
        raise CheckpointError(f"{role} checkpoint {path} is not a fairseq checkpoint (no model and args/cfg)")
