"""Make ``torchrun ... fairseq-train --cpu`` a real multi-process DDP run.

Without CUDA, fairseq's torchrun support misfires in two places, both fixed
here only for runs where no GPU is visible (GPU runs are left untouched):
- its default world size is the GPU count (0, so 1) and it returns before
  reading torchrun's environment, so every process silently trains alone
  (given the world size, it divides the rank by the GPU count and crashes):
  the init method, world size and rank are taken from torchrun instead;
- its c10d/pytorch_ddp wrapper passes ``device_ids=[0]``, which torch's DDP
  rejects for a CPU module: they are dropped for CPU modules.
Imported for its effect.
"""

import os

import torch
from fairseq.distributed import utils as distributed_utils
from fairseq.models import distributed_fairseq_model
from omegaconf import open_dict

_TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
_fairseq_infer_init_method = distributed_utils.infer_init_method


def infer_init_method(cfg, force_distributed=False):
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


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP, minus the GPU device ids fairseq passes for a module that lives on the CPU."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


distributed_utils.infer_init_method = infer_init_method
distributed_fairseq_model.DistributedDataParallel = DistributedDataParallel
