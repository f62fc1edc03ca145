"""Killed processes: a rerun with the same arguments completes, equal to an uninterrupted run, redoing nothing finished.

Kills are SIGKILLs of the whole process group (the tool and the fairseq process it
runs), sent when a file shows the tool has reached a step, or sent by the tool to
itself at a named point (``TIEKD_TEST_KILL_AT``, see ``tiekd_cli.files.kill_point``).
Protected: what the runs write (round results, best checkpoints, caches, seqkd outputs), equal to
an uninterrupted run's with no file left over, and a running run's folder against a second run.
"""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from test_seqkd import SEQKD, seqkd_args, seqkd_output
from test_teacher_cache import CACHE_TOOL, cache_args, cache_output

from .helpers import Case, alongside, contents, digest, iterate_options, kill, start, wait_for
from conftest import run


def killed_at(point, argv):
    """Run ``argv`` with the tool set to SIGKILL itself at ``point``; check that it did."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIEKD_TEST_KILL_AT", point)
        proc = run(argv, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def mtime(path):
    return path.stat().st_mtime_ns


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def iterate_results(save_dir):
    """What a tiekd-iterate run folder is compared by: the name of everything in it; the bytes of rounds.tsv and
    the valid hypotheses; the weights of the best checkpoints (fairseq also stores wall-clock times in them)."""
    def read(path):
        name = path.relative_to(save_dir).as_posix()
        if name in ("checkpoint_best.pt", "round1/checkpoint_best.pt"):
            return torch.load(path, map_location="cpu")["model"]
        return digest(path) if name in ("rounds.tsv", "round1/valid/round1.hyp") else "a file"

    return contents(save_dir, read)


# tiekd-iterate: one round, killed at each step in turn, each time resumed by the same command.

@pytest.fixture(scope="module")
def iterate_runs(request, corpus, teacher, tmp_path_factory):
    kills = Case(request, "tiekd-iterate SIGKILLed in fairseq-train, in fairseq-generate, writing rounds.tsv and "
                          "writing checkpoint_best.pt, rerun after each",
                 "the run folder: round results, valid hypotheses and best checkpoints equal to an uninterrupted "
                 "run's, no other file; the --mono text")
    kills.keep(corpus.root / "raw.train.en")
    root = tmp_path_factory.mktemp("iterate")
    reference, save_dir = root / "uninterrupted", root / "killed"
    with alongside(iterate_options(corpus, teacher, reference)[1]):
        argv = iterate_options(corpus, teacher, save_dir)[1]
        round_dir, seen = save_dir / "round1", SimpleNamespace()
        shard = save_dir / "mono" / "shard1" / "train.en-None.en.bin"

        def state():
            """The run folder's done markers, with their notes."""
            done = save_dir / "done"
            return {p.name: p.read_text() for p in done.iterdir()} if done.is_dir() else {}

        # 1. During fairseq-train; stopped first, it holds the lock while a second run tries the same folder.
        proc = start(argv)
        log = round_dir / "train.log"
        wait_for(proc, lambda: log.is_file() and "begin training epoch 1" in log.read_text(), "training started")
        os.killpg(proc.pid, signal.SIGSTOP)
        seen.before_concurrent = contents(save_dir)
        seen.concurrent = run(argv, check=False)
        seen.after_concurrent = contents(save_dir)
        assert kill(proc) == -signal.SIGKILL
        seen.in_training = SimpleNamespace(state=state(), shard=mtime(shard))

        # 2. While fairseq-generate decodes the valid subset for BLEU.
        proc = start(argv)
        wait_for(proc, lambda: (round_dir / "valid").is_dir(), "decoding started")
        assert kill(proc) == -signal.SIGKILL
        seen.in_decoding = SimpleNamespace(state=state(), log=log.read_text(), trained=mtime(log), shard=mtime(shard))

        # 3. While writing rounds.tsv (its temporary file written, not yet renamed).
        killed_at("rounds.tsv", argv)
        seen.in_rows = SimpleNamespace(state=state(), trained=mtime(log), files=files(save_dir))

        # 4. While writing SAVE_DIR/checkpoint_best.pt (copied under a temporary name, not yet renamed).
        killed_at("checkpoint_best.pt", argv)
        seen.in_best = SimpleNamespace(state=state(), trained=mtime(log), files=files(save_dir),
                                       rows=(save_dir / "rounds.tsv").read_text(),
                                       scored=mtime(round_dir / "valid" / "round1.hyp"))

        seen.rerun = run(argv)
    # Nothing left over either: no temporary file, no partial folder.
    kills.same("--save-dir", iterate_results(save_dir), iterate_results(reference))
    kills.verify()
    return SimpleNamespace(reference=reference, save_dir=save_dir, seen=seen)


def test_iterate_killed_during_fairseq_train_trains_the_round_again(iterate_runs):
    seen = iterate_runs.seen
    assert "round1-trained" not in seen.in_training.state
    assert "round1-trained" in seen.in_decoding.state and "done training" in seen.in_decoding.log
    # The shards were binarized once, before the kill, and kept.
    assert seen.in_decoding.shard == seen.in_training.shard


def test_iterate_killed_while_decoding_for_bleu_scores_again_without_training(iterate_runs):
    seen = iterate_runs.seen
    assert seen.in_rows.trained == seen.in_decoding.trained
    assert "rounds.tsv" not in seen.in_rows.files  # the kill came while writing the first row


def test_iterate_killed_while_writing_rounds_tsv_leaves_no_partial_file(iterate_runs):
    seen = iterate_runs.seen
    assert [name for name in seen.in_rows.files if name.startswith(".rounds.tsv.")]  # the temporary file
    assert seen.in_best.trained == seen.in_rows.trained
    assert seen.in_best.rows.count("\n") == 2  # header and round 1, written whole by the rerun
    assert not [name for name in seen.in_best.files if name.startswith(".rounds.tsv.")]


def test_iterate_killed_while_writing_the_best_checkpoint_copies_it_again(iterate_runs):
    seen, save_dir = iterate_runs.seen, iterate_runs.save_dir
    assert [name for name in seen.in_best.files if name.startswith(".checkpoint_best.pt.")]  # the temporary file
    assert "checkpoint_best.pt" not in seen.in_best.files
    assert "best-round" not in seen.in_best.state and "round1-trained" in seen.in_best.state
    assert "1 of 1 rounds already finished" in seen.rerun.stderr
    # Neither trained nor scored again.
    assert mtime(save_dir / "round1" / "train.log") == seen.in_best.trained
    assert mtime(save_dir / "round1" / "valid" / "round1.hyp") == seen.in_best.scored
    assert (save_dir / "done" / "best-round").read_text() == "1\n"


def test_a_second_iterate_on_the_same_save_dir_is_refused_while_the_first_runs(case, iterate_runs):
    protected = case("a second tiekd-iterate on the --save-dir of a running one",
                     "the running one's --save-dir, unchanged by the second")
    # Snapshots taken while the first run was stopped (SIGSTOP), before and after the second ran.
    seen = iterate_runs.seen
    protected.same("--save-dir of the running tiekd-iterate", seen.after_concurrent, seen.before_concurrent)
    concurrent = seen.concurrent
    assert concurrent.returncode == 2 and "Traceback" not in concurrent.stderr
    assert concurrent.stderr.splitlines()[-1:] == [
        f"tiekd-iterate: error: another tiekd-iterate run is using --save-dir {iterate_runs.save_dir} (it holds .lock)"]
    protected.verify()


# tiekd-cache-teacher and tiekd-seqkd, killed in the middle of their second shard.

def test_cache_teacher_killed_mid_shard_resumes_at_that_shard(case, corpus, teacher, tmp_path, tmp_path_factory):
    protected = case("tiekd-cache-teacher SIGKILLed mid-shard, rerun",
                     "the cache: the finished shard untouched by the rerun, all equal to an uninterrupted run's")
    out = tmp_path / "killed"
    killed_at("shard-00001", [CACHE_TOOL, *cache_args(corpus, teacher, out)])
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".shard-00001.partial", "meta.json", "shard-00000"]
    done = {p: mtime(p) for p in (out / "shard-00000").iterdir()}
    protected.keep(out / "shard-00000")

    rerun = run([CACHE_TOOL, *cache_args(corpus, teacher, out)])
    assert "3 shards, 1 already cached" in rerun.stderr
    assert {p: mtime(p) for p in (out / "shard-00000").iterdir()} == done  # not even rewritten
    protected.same("the cache", contents(out), contents(cache_output(corpus, teacher, tmp_path_factory).out))
    protected.verify()


def test_seqkd_killed_mid_shard_resumes_at_that_shard(case, corpus, teacher, tmp_path, tmp_path_factory):
    protected = case("tiekd-seqkd SIGKILLed mid-shard, rerun",
                     "the outputs: the finished shard untouched by the rerun, all equal to an uninterrupted run's")
    out = tmp_path / "killed"
    proc = start([SEQKD, *seqkd_args(corpus, teacher, out)])
    # Shard 2's input folder exists while fairseq-generate decodes it.
    wait_for(proc, lambda: (out / "shards" / ".input-00001").is_dir(), "the second shard started")
    assert kill(proc) == -signal.SIGKILL
    first = out / "shards" / "00000.txt"
    assert first.is_file() and not (out / "shards" / "00001.txt").exists() and not (out / "data-bin").exists()
    written = mtime(first)
    protected.keep(first)

    rerun = run([SEQKD, *seqkd_args(corpus, teacher, out)])
    assert "2 shards, 1 already decoded" in rerun.stderr
    assert mtime(first) == written  # not even rewritten
    protected.same("the seqkd output", contents(out), contents(seqkd_output(corpus, teacher, tmp_path_factory)))
    protected.verify()
