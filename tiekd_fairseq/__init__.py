"""TIE-KD for fairseq: load with ``--user-dir`` (path of this folder)."""

from . import cpu_distributed  # noqa: F401  (torchrun on CPU gives a real multi-process DDP run)
from . import safe_checkpoints  # noqa: F401  (allow-lists fairseq's checkpoint globals)
from . import criterions, tasks  # noqa: F401  (register tie_kd and translation_kd)
