"""Run fairseq-train in this process, then save this rank's parameters (for the DDP test).

usage: train_and_dump.py DUMP_DIR FAIRSEQ_TRAIN_ARGS...
"""

import os
import sys

import torch
from fairseq.trainer import Trainer
from fairseq_cli.train import cli_main

dump_dir = sys.argv.pop(1)
trainers = []
_init = Trainer.__init__


def _keep(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.initial_params = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
    self.seen_world_size = self.data_parallel_world_size
    trainers.append(self)


Trainer.__init__ = _keep
cli_main()
trainer = trainers[0]
torch.save(
    {
        "data_parallel": trainer.seen_world_size,
        "wrapper": type(trainer.model.module).__name__,
        "num_updates": trainer.get_num_updates(),
        "initial": trainer.initial_params,
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    },
    os.path.join(dump_dir, f"rank{os.environ['RANK']}.pt"),
)
