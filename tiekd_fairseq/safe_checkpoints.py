"""Allow-list exactly the pickle globals that fairseq checkpoints carry, and say in one line why one cannot be read.

torch >= 2.6 loads with ``weights_only=True``: a checkpoint is a pickle, and
only allow-listed globals may be rebuilt, so a crafted file cannot run code.
fairseq's loader relies on that default; it then refuses every checkpoint for
the few harmless globals below. Importing this module lets those through and
nothing else. ``weights_only=False`` is never used anywhere in this package.
"""

import argparse
import os
import re
import zipfile

import numpy as np
import torch
from fairseq.distributed.utils import _TensorPlaceholder

from .cli import UsageError, one_line

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
ZIP_MAGIC = b"PK\x03\x04"


def _numpy_globals():
    """numpy scalars and arrays (metrics that --eval-bleu stores), under numpy 1 and 2 names."""
    found = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(_multiarray, name)
        found += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Float64DType, ...);
    # object arrays stay refused: they exist to hold arbitrary Python objects.
    dtypes = {np.dtype(c) for c in np.sctypeDict.values()}
    found += sorted({type(d) for d in dtypes if d.kind != "O"} - {np.dtype}, key=str)
    return found


FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, _TensorPlaceholder, *_numpy_globals()]

torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


def load_error(path, role, err):
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
    """Refuse, with a one-line UsageError, a checkpoint that is missing, truncated, crafted or not fairseq's.

    Its tensors are memory-mapped, not read, so this costs little even for a large file.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{role} checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as err:
        raise UsageError(load_error(path, role, err)) from None
    if not isinstance(state, dict) or state.get("model") is None or not (state.get("args") or state.get("cfg")):
        raise UsageError(f"{role} checkpoint {path} is not a fairseq checkpoint (no model and args/cfg)")
