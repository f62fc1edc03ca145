"""Two-process gloo DDP with source-only batches mixed in: the ranks stay in step.

Protected: the student, whose parameters must be the same on both ranks.
"""

import re

import torch
from test_cli import _free_port

from .helpers import source_only_shard
from conftest import BIN, REPO, kd_train_args, run


def test_two_process_ddp_with_source_only_batches_stays_in_step(case, corpus, teacher, tmp_path):
    protected = case("2-process gloo DDP with source-only batches mixed in",
                     "the student's parameters, identical on both ranks")
    shard = source_only_shard((corpus.root / "sp.train.en").read_text().splitlines()[:150], tmp_path / "shard",
                              corpus.data_bin / "dict.en.txt")
    dump = tmp_path / "params"
    dump.mkdir()
    train = kd_train_args(corpus.data_bin, teacher, tmp_path / "s", "--max-update", "8",
                          "--distributed-backend", "gloo", "--distributed-no-spawn", "--mono-data", shard)
    proc = run([BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", _free_port(), REPO / "tests" / "train_and_dump.py", dump, *train])
    log = proc.stdout + proc.stderr
    # Source-only batches were among the steps (their sentences are counted in the logged statistics).
    sentences = [int(n) for n in re.findall(r"\| mono_sents (\d+)", log)]
    assert sentences and all(n > 0 for n in sentences), log[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["data_parallel"] == ranks[1]["data_parallel"] == 2
    assert ranks[0]["num_updates"] == ranks[1]["num_updates"] == 8
    protected.same("rank 1's parameters", ranks[1]["params"], ranks[0]["params"])
    assert any(not torch.equal(ranks[0]["initial"][k], v) for k, v in ranks[0]["params"].items())
    protected.verify()
