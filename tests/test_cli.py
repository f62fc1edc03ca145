"""End to end through the real fairseq CLIs: preprocess, teacher, tie_kd student, generate, and the failures."""

import re
import socket
import sys

import pytest
import torch

from conftest import BIN, COMMON, REPO, STUDENT_ARCH, USER_DIR, fairseq, kd_train_args, run


@pytest.fixture(scope="module")
def student(corpus, teacher, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("student")
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, teacher, save_dir, "--max-update", "30"))
    return save_dir / "checkpoint_last.pt", proc.stdout + proc.stderr


def test_tie_kd_student_trains_and_logs_its_terms(student):
    _, log = student
    last = [line for line in log.splitlines() if "| train |" in line][-1]
    values = dict(re.findall(r"\| (\w+) ([-\d.]+)", last))
    for key in ("loss", "nll_loss", "kd", "rank", "top1_agree", "teacher_gold"):
        assert key in values, key
    assert float(values["kd"]) > 0 and float(values["rank"]) > 0
    assert 0 <= float(values["top1_agree"]) <= 100 and 0 < float(values["teacher_gold"]) <= 100
    assert "frozen" in log and "num_updates 30" in last


def test_student_checkpoint_holds_only_the_student(student, corpus, tmp_path):
    import tiekd_fairseq  # noqa: F401  (allow-lists the checkpoint globals)

    checkpoint, _ = student
    plain = tmp_path / "plain"
    fairseq("fairseq-train", corpus.data_bin, *STUDENT_ARCH, *COMMON, "--optimizer", "adam", "--lr", "5e-3",
            "--max-tokens", "2048", "--max-update", "1", "--save-dir", plain, "--no-epoch-checkpoints",
            "--criterion", "label_smoothed_cross_entropy", "--disable-validation")
    states = [torch.load(path, map_location="cpu") for path in (checkpoint, plain / "checkpoint_last.pt")]
    assert states[0]["model"].keys() == states[1]["model"].keys()
    assert not states[0]["criterion"]

    def optimizer_numel(state):
        return sum(v.numel() for s in state["last_optimizer_state"]["state"].values() for v in s.values()
                   if torch.is_tensor(v))

    assert optimizer_numel(states[0]) == optimizer_numel(states[1]) > 0
    assert checkpoint.stat().st_size < 1.05 * (plain / "checkpoint_last.pt").stat().st_size


def test_student_decodes_with_plain_fairseq_generate_and_sacrebleu(student, corpus):
    checkpoint, _ = student
    proc = fairseq(
        "fairseq-generate", corpus.data_bin, "--user-dir", USER_DIR, "--path", checkpoint, "--task", "translation",
        "--gen-subset", "valid", "--beam", "2", "--max-tokens", "4096", "--scoring", "sacrebleu",
        "--post-process", "sentencepiece", "--cpu", "--required-batch-size-multiple", "1",
    )
    hypotheses = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == len(corpus.raw["valid"])
    assert re.search(r"Generate valid with beam=2: BLEU = \d+\.\d+", proc.stdout)


def test_missing_teacher_file_is_one_line(corpus, tmp_path):
    missing = tmp_path / "nowhere.pt"
    proc = fairseq("fairseq-train", *kd_train_args(corpus.data_bin, missing, tmp_path / "s", "--max-update", "1"),
                   check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"translation_kd: error: teacher checkpoint {missing} does not exist"


def test_teacher_checkpoint_with_numpy_metrics_loads(teacher):
    """Trained with --eval-bleu, the teacher checkpoint holds numpy arrays: refused by fairseq alone, loads with us."""
    load = (
        "from fairseq import checkpoint_utils\n"
        "import torch\n"
        f"print(sorted(torch.serialization.get_unsafe_globals_in_checkpoint({str(teacher)!r})))\n"
        f"s = checkpoint_utils.load_checkpoint_to_cpu({str(teacher)!r})\n"
        "print(type(s['extra_state']['metrics']).__name__)\n"
    )
    alone = run([sys.executable, "-c", load], check=False)
    assert alone.returncode != 0 and "numpy" in alone.stdout and "argparse.Namespace" in alone.stdout
    ours = run([sys.executable, "-c", "import tiekd_fairseq\n" + load])
    assert ours.stdout.splitlines() == ["[]", "OrderedDict"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One GPU visible: fairseq's default world size is then 1, and without the plugin each process trains alone.
@pytest.mark.parametrize("backend,visible_gpus", [("pytorch_ddp", 0), ("legacy_ddp", 0), ("pytorch_ddp", 1)])
def test_two_process_gloo_ddp_ends_with_identical_parameters(corpus, teacher, tmp_path, backend, visible_gpus):
    dump = tmp_path / "params"
    dump.mkdir()
    train = kd_train_args(corpus.data_bin, teacher, tmp_path / "s", "--max-update", "6",
                          "--distributed-backend", "gloo", "--distributed-no-spawn", "--ddp-backend", backend)
    run([BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", _free_port(), REPO / "tests" / "train_and_dump.py", dump, *train],
        env_extra={"VISIBLE_GPUS": str(visible_gpus)} if visible_gpus else {})
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["data_parallel"] == ranks[1]["data_parallel"] == 2
    wrapper = {"pytorch_ddp": "DistributedDataParallel", "legacy_ddp": "LegacyDistributedDataParallel"}[backend]
    assert ranks[0]["wrapper"] == wrapper
    assert ranks[0]["num_updates"] == ranks[1]["num_updates"] == 6
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    initial = ranks[0]["initial"]
    assert any(not torch.equal(initial[k], v) for k, v in ranks[0]["params"].items())
