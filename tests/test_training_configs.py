"""The training configurations users run: gradient accumulation, --sentence-avg, resuming, half precision."""

import re
import sys

import pytest
import torch
from fairseq import checkpoint_utils, tasks
from fairseq.trainer import Trainer
from test_criterion import training_config
from test_mono import binarize_mono, first_batch

from conftest import BIN, REPO, kd_train_args, run

# alpha, lambda, k, tau, N away from their defaults and from each other's symmetric values.
KNOBS = ["--kd-alpha", "0.3", "--rank-weight", "2.5", "--kd-topk", "3", "--kd-temperature", "2",
         "--kd-iterations", "2"]


@pytest.fixture(scope="module")
def shard(corpus, tmp_path_factory):
    lines = (corpus.root / "sp.train.en").read_text().splitlines()[:60]
    return binarize_mono(corpus, lines, tmp_path_factory.mktemp("configs") / "mono")


def trainer_and_parts(corpus, teacher, shard, *extra):
    """A fairseq Trainer on a fresh student (the same initial weights every call), its task and criterion."""
    cfg = training_config(corpus.data_bin, teacher, *KNOBS, "--mono-data", str(shard), "--optimizer", "sgd",
                          "--lr", "0.1", *extra)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(3)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task, model, criterion


def gradients_of_a_train_step(trainer, samples):
    """The gradients fairseq's train_step leaves on the student after accumulating ``samples``."""
    trainer.train_step(samples)
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def assert_same_gradients(got, want, tolerance=1e-6):
    """Equal to ``tolerance`` times each tensor's largest gradient (absolute where that is below 1)."""
    assert got.keys() == want.keys()
    for name in want:
        scale = max(1.0, want[name].abs().max().item())
        difference = (got[name] - want[name]).abs().max().item()
        assert difference <= tolerance * scale, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"
    assert any(g.abs().max() > 1e-3 for g in want.values())


def valid_items(task, count=12):
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return dataset, [dataset[i] for i in range(count)]


def test_update_freq_two_over_two_half_batches_equals_one_full_batch(corpus, teacher, shard):
    whole, task, _, _ = trainer_and_parts(corpus, teacher, shard)
    dataset, items = valid_items(task)
    full = gradients_of_a_train_step(whole, [dataset.collater(items)])
    accumulated, _, _, _ = trainer_and_parts(corpus, teacher, shard, "--update-freq", "2")
    halves = [dataset.collater(items[:6]), dataset.collater(items[6:])]
    assert sum(h["ntokens"] for h in halves) == dataset.collater(items)["ntokens"]
    assert_same_gradients(gradients_of_a_train_step(accumulated, halves), full)


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_a_source_only_and_a_parallel_micro_batch_accumulate_to_their_summed_loss(corpus, teacher, shard,
                                                                                   sentence_avg):
    extra = ["--update-freq", "2"] + ["--sentence-avg"] * sentence_avg
    trainer, task, _, _ = trainer_and_parts(corpus, teacher, shard, *extra)
    mono = first_batch(task, "mono")
    dataset, items = valid_items(task)
    parallel = dataset.collater(items)
    got = gradients_of_a_train_step(trainer, [mono, parallel])

    # The same two batches through the criterion alone, on the same initial student.
    _, _, model, criterion = trainer_and_parts(corpus, teacher, shard, *extra)
    model.train()
    mono_loss, mono_size, mono_log = criterion(model, mono)
    parallel_loss, parallel_size, _ = criterion(model, parallel)
    sentences = (mono["net_input"]["src_tokens"].size(0), parallel["target"].size(0))
    if sentence_avg:
        assert (mono_size, parallel_size) == sentences
    else:
        assert (mono_size, parallel_size) == (mono_log["mono_tokens"], parallel["ntokens"])
    (mono_loss + parallel_loss).backward()
    assert_same_gradients(got, {name: p.grad / (mono_size + parallel_size) for name, p in model.named_parameters()})


# Kill the process the moment the checkpoint after update 4 is on disk, mid-epoch.
KILLED_AFTER_A_SAVE = '''
import os, signal, sys
from fairseq import checkpoint_utils
from fairseq_cli.train import cli_main

kill_at = int(sys.argv.pop(1))
save = checkpoint_utils.save_checkpoint


def save_then_die(cfg, trainer, epoch_itr, val_loss):
    saved = save(cfg, trainer, epoch_itr, val_loss)
    if trainer.get_num_updates() == kill_at:
        assert epoch_itr.iterations_in_epoch < len(epoch_itr)  # mid-epoch
        os.kill(os.getpid(), signal.SIGKILL)
    return saved


checkpoint_utils.save_checkpoint = save_then_die
cli_main()
'''


def last_checkpoint(save_dir):
    return checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))


def test_tie_kd_with_source_only_shards_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(
        corpus, teacher, shard, tmp_path):
    def args(save_dir):
        return kd_train_args(corpus.data_bin, teacher, save_dir, *KNOBS, "--mono-data", shard, "--mono-ratio", "0.5",
                             "--max-update", "8", "--save-interval-updates", "4", "--dropout", "0.1",
                             "--disable-validation")

    run([BIN / "fairseq-train", *args(tmp_path / "whole")])
    script = tmp_path / "killed_train.py"
    script.write_text(KILLED_AFTER_A_SAVE)
    killed = run([sys.executable, script, "4", *args(tmp_path / "resumed")], check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert last_checkpoint(tmp_path / "resumed")["optimizer_history"][-1]["num_updates"] == 4
    resumed = run([BIN / "fairseq-train", *args(tmp_path / "resumed")])
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ 4 updates\)", log), log[-3000:]
    assert re.search(r"mono_sents [1-9]", log), "no source-only batch after the resume"

    want, got = last_checkpoint(tmp_path / "whole"), last_checkpoint(tmp_path / "resumed")
    assert got["optimizer_history"][-1]["num_updates"] == want["optimizer_history"][-1]["num_updates"] == 8
    for name, value in want["model"].items():
        assert torch.allclose(got["model"][name], value, rtol=0, atol=1e-6), name
    want_state, got_state = want["last_optimizer_state"]["state"], got["last_optimizer_state"]["state"]
    assert want_state.keys() == got_state.keys() and want_state
    for param, moments in want_state.items():
        for key, value in moments.items():
            assert torch.allclose(torch.as_tensor(got_state[param][key]), torch.as_tensor(value), rtol=0,
                                  atol=1e-6), (param, key)


def logged_updates(log):
    """(loss, kd, rank) of each update, from --log-interval 1."""
    return [tuple(float(re.search(rf"\b{key}=([\d.]+)", line).group(1)) for key in ("loss", "kd", "rank"))
            for line in log.splitlines() if "train_inner" in line and "num_updates=" in line]


# bf16 keeps 8 significant bits (relative spacing 2^-8 = 0.4%), fp16 11 (2^-11 = 0.05%); the KD terms are
# summed in fp32 either way, so per-update losses stay within a few spacings of the fp32 run's (plus 1e-3
# for the log's rounding). On CPU, fairseq's flat fp32 master copy is made on a CUDA device: fp16 there
# needs --fp16-no-flatten-grads.
PRECISIONS = {"bf16": (["--bf16"], torch.bfloat16, 0.01),
              "fp16": (["--fp16", "--fp16-no-flatten-grads"], torch.float16, 0.005)}


def four_updates(corpus, teacher, folder, name, *extra):
    """(loss, kd, rank) of each of 4 updates of a tie_kd student, and what train_and_dump.py dumped of it."""
    dump = folder / name
    dump.mkdir()
    proc = run([sys.executable, REPO / "tests" / "train_and_dump.py", dump,
                *kd_train_args(corpus.data_bin, teacher, folder / f"{name}-save", *KNOBS, "--max-update", "4",
                               "--log-interval", "1", "--no-save", "--disable-validation", *extra)])
    return logged_updates(proc.stdout + proc.stderr), torch.load(dump / "rank0.pt")


@pytest.fixture(scope="module")
def fp32_run(corpus, teacher, tmp_path_factory):
    """The fp32 run each half precision run is compared with."""
    return four_updates(corpus, teacher, tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_half_precision_training_follows_the_fp32_run(corpus, teacher, fp32_run, tmp_path, precision):
    flags, dtype, tolerance = PRECISIONS[precision]
    (fp32, fp32_dump), (half, half_dump) = fp32_run, four_updates(corpus, teacher, tmp_path, precision, *flags)
    assert half_dump["student_dtype"] == half_dump["teacher_dtype"] == str(dtype)
    assert fp32_dump["teacher_dtype"] == str(torch.float32)
    assert len(half) == len(fp32) == 4
    for update, (want, got) in enumerate(zip(fp32, half), 1):
        for value_want, value_got in zip(want, got):
            assert value_got == pytest.approx(value_want, rel=tolerance, abs=1e-3), f"update {update}: {got} vs {want}"
