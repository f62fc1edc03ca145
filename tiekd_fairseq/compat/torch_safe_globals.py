"""Allow-list exactly the pickle globals fairseq checkpoints carry, for torch's ``weights_only`` loading.

torch >= 2.6 loads with ``weights_only=True``: only allow-listed globals may be
rebuilt, so a crafted file cannot run code. fairseq's loader relies on that
default and then refuses every checkpoint for the few harmless globals below;
this lets those through and nothing else. ``weights_only=False`` is never used.
"""

from argparse import Namespace  # the type of a checkpoint's args; nothing here parses

import numpy as np
import torch
from fairseq.distributed.utils import _TensorPlaceholder

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


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


FAIRSEQ_CHECKPOINT_GLOBALS = [Namespace, _TensorPlaceholder, *_numpy_globals()]

torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
