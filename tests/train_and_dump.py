"""Run fairseq-train in this process, then save this rank's parameters and the models' precision.

usage: train_and_dump.py DUMP_DIR FAIRSEQ_TRAIN_ARGS...
With VISIBLE_GPUS=n in the environment, torch reports n GPUs (device_count only), as on a GPU host.
"""

import os
import sys

import torch

if "VISIBLE_GPUS" in os.environ:
    # Before fairseq is imported: its default world size is read from the GPU count then.
    torch.cuda.device_count = lambda: int(os.environ["VISIBLE_GPUS"])

from fairseq.trainer import Trainer  # noqa: E402
from fairseq_cli.train import cli_main  # noqa: E402

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
        "wrapper": type(getattr(trainer.model, "module", None)).__name__,
        "num_updates": trainer.get_num_updates(),
        "initial": trainer.initial_params,
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "student_dtype": str(next(trainer.model.parameters()).dtype),
        "teacher_dtype": str(next(trainer.task.teacher.model.parameters()).dtype),
    },
    os.path.join(dump_dir, f"rank{os.environ.get('RANK', 0)}.pt"),
)
