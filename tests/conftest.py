"""Shared fixtures: a tiny real corpus, binarized with fairseq, and a teacher trained through the CLI."""

import fcntl
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "tiekd_fairseq")
CORPUS = REPO / "examples" / "demo" / "data"
BIN = Path(sys.executable).parent

# 1+1 layers, small widths: enough to learn something from 3k pairs in seconds on a CPU.
TEACHER_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
COMMON = ["--cpu", "--seed", "1", "--no-progress-bar", "--log-interval", "5", "--num-workers", "0"]


def run(cmd, check=True, env_extra=None, **kwargs):
    """Run a command (``env_extra`` added to its environment); on an unexpected exit code fail with its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd[0]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def fairseq(tool, *args, **kwargs):
    return run([BIN / tool, *args], **kwargs)


def pytest_configure(config):
    # pytest-xdist's workers already keep every core busy: a second thread in a worker (torch's, or that of a
    # command it starts) only waits for the other worker, spinning, which on small tensors costs more than the work.
    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def _pairs(split, count, max_words=25):
    """The first `count` pairs of a split with at most `max_words` words a side."""
    sides = [lzma.open(CORPUS / f"lohelp.{split}.{lang}.xz", "rt", encoding="utf-8").read().splitlines()
             for lang in ("en", "de")]
    pairs = [(en, de) for en, de in zip(*sides) if len(en.split()) <= max_words and len(de.split()) <= max_words]
    return pairs[:count]


def built_once(tmp_path_factory, name, build):
    """A folder filled by ``build(folder)`` once per test run, shared by the pytest-xdist workers.

    Each worker's temporary folder lies in the run's own: the first worker to ask builds ``name`` there
    under a file lock, the others wait for it and reuse the folder. Without workers, a folder of this run.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent
    folder, built = shared / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            # A worker whose build failed left a partial folder: start afresh.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def _build_corpus(root, raw):
    """Write ``raw`` ({split: pairs}), a sentencepiece model trained on it, its encoding and ``root/bin``."""
    import sentencepiece as spm

    for split, pairs in raw.items():
        for i, lang in enumerate(("en", "de")):
            (root / f"raw.{split}.{lang}").write_text("".join(p[i] + "\n" for p in pairs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=f"{root}/raw.train.en,{root}/raw.train.de", model_prefix=str(root / "spm"),
        vocab_size=1000, character_coverage=1.0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    for split in raw:
        for lang in ("en", "de"):
            lines = (root / f"raw.{split}.{lang}").read_text(encoding="utf-8").splitlines()
            encoded = (" ".join(sp.encode(line, out_type=str)) + "\n" for line in lines)
            (root / f"sp.{split}.{lang}").write_text("".join(encoded))
    fairseq(
        "fairseq-preprocess", "--source-lang", "en", "--target-lang", "de",
        "--trainpref", root / "sp.train", "--validpref", root / "sp.valid", "--testpref", root / "sp.test",
        "--destdir", root / "bin", "--joined-dictionary", "--workers", "1",
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """LibreOffice help pairs (3000 train / 200 valid / 100 test), a joint 1k sentencepiece model, a data-bin."""
    raw = {"train": _pairs("train", 3000), "valid": _pairs("valid", 200), "test": _pairs("test", 100)}
    root = built_once(tmp_path_factory, "corpus", lambda root: _build_corpus(root, raw))
    return SimpleNamespace(root=root, data_bin=root / "bin", raw=raw)


def _train_teacher(data_bin, save_dir):
    """Train the teacher on ``data_bin`` into ``save_dir``."""
    fairseq(
        "fairseq-train", data_bin, *TEACHER_ARCH, *COMMON,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
        "--dropout", "0.1", "--max-tokens", "4096", "--max-epoch", "6", "--validate-interval", "3",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 30}', "--eval-bleu-remove-bpe", "sentencepiece",
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric", "--no-epoch-checkpoints",
        "--save-dir", save_dir,
    )


@pytest.fixture(scope="session")
def teacher(corpus, tmp_path_factory):
    """A teacher trained with label_smoothed_cross_entropy and --eval-bleu (its checkpoint holds numpy metrics)."""
    save_dir = built_once(tmp_path_factory, "teacher", lambda save_dir: _train_teacher(corpus.data_bin, save_dir))
    return save_dir / "checkpoint_best.pt"


def kd_train_args(data_bin, teacher, save_dir, *extra):
    """fairseq-train arguments for a tiny tie_kd student."""
    return [
        data_bin, "--user-dir", USER_DIR, "--task", "translation_kd", "--teacher", teacher,
        "--criterion", "tie_kd", "--label-smoothing", "0.1", *STUDENT_ARCH, *COMMON,
        "--optimizer", "adam", "--lr", "5e-3", "--max-tokens", "2048", "--save-dir", save_dir,
        "--no-epoch-checkpoints", *extra,
    ]


def data_bin_with_swapped_symbols(data_bin, dest):
    """A copy of ``data_bin`` whose dictionaries swap lines 10 and 11 (indices 14 and 15).

    Returns the two swapped symbols as (now at index 14, now at index 15).
    """
    shutil.copytree(data_bin, dest)
    for lang in ("en", "de"):
        lines = (dest / f"dict.{lang}.txt").read_text().splitlines()
        lines[10], lines[11] = lines[11], lines[10]
        (dest / f"dict.{lang}.txt").write_text("\n".join(lines) + "\n")
    return tuple(line.split()[0] for line in lines[10:12])


# The modules that run longest, longest first; the others follow in collection order. `make test` hands whole
# modules to its processes in this order (--no-loadscope-reorder): a long module handed out last would keep one
# process busy while the other has nothing left to do.
LONGEST_FIRST = ["test_recipes.py", "test_demo.py", "robustness/test_processes.py", "test_seqkd.py", "test_cli.py",
                 "test_training_configs.py", "robustness/test_numerics.py", "test_iterate.py"]


def pytest_collection_modifyitems(items):
    tests, rank = Path(__file__).parent, {name: i for i, name in enumerate(LONGEST_FIRST)}

    def module_rank(item):
        path = Path(item.path)
        return rank.get(path.relative_to(tests).as_posix(), len(rank)) if path.is_relative_to(tests) else len(rank)

    items.sort(key=module_rank)


# The robustness ledger (tests/robustness) across pytest-xdist workers: each worker sends its own, and the
# controller, which loads no conftest below this folder, merges them and prints the summary line.
def pytest_sessionfinish(session):
    output = getattr(session.config, "workeroutput", None)
    if output is not None and "robustness.helpers" in sys.modules:
        from robustness.helpers import LEDGER

        if LEDGER in session.config.stash:
            output["robustness"] = session.config.stash[LEDGER].to_wire()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    wire = getattr(node, "workeroutput", {}).get("robustness")
    if wire:
        from robustness.helpers import LEDGER, Ledger

        node.config.stash.setdefault(LEDGER, Ledger(wire["folder"])).merge(wire)


def pytest_terminal_summary(terminalreporter, config):
    # Only a controller's merged ledger: without workers, tests/robustness/conftest.py prints its own.
    if "robustness.helpers" in sys.modules:
        from robustness.helpers import LEDGER

        if LEDGER in config.stash and config.stash[LEDGER].merged:
            for line in config.stash[LEDGER].summary():
                terminalreporter.write_line(line)
