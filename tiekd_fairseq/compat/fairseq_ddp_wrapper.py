"""``fairseq.models.distributed_fairseq_model.DistributedDataParallel``: no GPU device ids for a CPU module.

fairseq's c10d/pytorch_ddp wrapper passes ``device_ids=[0]``, which torch's DDP
rejects for a module on the CPU (``torchrun ... --cpu``).
"""

import torch
from fairseq.models import distributed_fairseq_model


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP, minus the device ids fairseq passes for a module that lives on the CPU."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


distributed_fairseq_model.DistributedDataParallel = DistributedDataParallel
