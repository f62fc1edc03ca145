"""``fairseq.distributed.utils.call_main``: CPU processes under torchrun join its group; ``--bf16`` without a TPU.

fairseq's default world size is the GPU count (at least 1), and it reads torchrun's
variables only when that is above 1: on a machine with no GPU or one GPU, every
process of ``torchrun ... fairseq-train --cpu`` would silently train alone.
fairseq's option parser also turns ``--bf16`` into ``--tpu``, so that ``--bf16``
fails on a CPU or GPU (fairseq issue 4696); where torch_xla is not installed there is
no TPU to mean, and the run trains in bf16 on its own device.
"""

import importlib.util
import os

import torch
from fairseq.distributed import utils as distributed_utils
from omegaconf import open_dict

_TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
_fairseq_call_main = distributed_utils.call_main


def call_main(cfg, main, **kwargs):
    """fairseq's, with a CPU torchrun process's rank and world size from torchrun, and ``--bf16`` off the TPU."""
    common, distributed = cfg.common, cfg.distributed_training
    if common.bf16 and common.tpu and importlib.util.find_spec("torch_xla") is None:
        with open_dict(common):
            common.tpu = False
    on_cpu = common.cpu or not torch.cuda.is_available()
    if on_cpu and distributed.distributed_init_method is None and all(var in os.environ for var in _TORCHRUN_VARS):
        with open_dict(distributed):
            distributed.distributed_init_method = "env://"
            distributed.distributed_world_size = int(os.environ["WORLD_SIZE"])
            distributed.distributed_rank = int(os.environ["RANK"])
            distributed.device_id = 0
            distributed.distributed_no_spawn = True
    _fairseq_call_main(cfg, main, **kwargs)


distributed_utils.call_main = call_main
