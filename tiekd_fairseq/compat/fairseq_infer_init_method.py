"""``fairseq.distributed.utils.infer_init_method``: read torchrun's environment when no GPU is visible.

Without CUDA, fairseq's default world size is the GPU count (0, so 1) and it
returns before reading torchrun's variables, so every process of ``torchrun
... fairseq-train --cpu`` would silently train alone. GPU runs are left to fairseq.
"""

import os

import torch
from fairseq.distributed import utils as distributed_utils
from omegaconf import open_dict

_TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
_fairseq_infer_init_method = distributed_utils.infer_init_method


def infer_init_method(cfg, force_distributed=False):
    """fairseq's, except that a torchrun process with no GPU takes its rank and world size from torchrun."""
    if (
        cfg.distributed_init_method is None
        and torch.cuda.device_count() == 0
        and all(var in os.environ for var in _TORCHRUN_VARS)
    ):
        with open_dict(cfg):
            cfg.distributed_init_method = "env://"
            cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
            cfg.distributed_rank = int(os.environ["RANK"])
            cfg.device_id = 0
            cfg.distributed_no_spawn = True
        return
    _fairseq_infer_init_method(cfg, force_distributed)


distributed_utils.infer_init_method = infer_init_method
