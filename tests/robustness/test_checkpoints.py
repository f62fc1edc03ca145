"""Damaged or foreign checkpoints: refused with one line and no code run, or handled.

Protected: the checkpoints themselves, unchanged, with nothing written where a refused run would have
written; a foreign teacher that is accepted gives the outputs of the original.
"""

import os
import shutil

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer
from test_criterion import build, valid_sample

from tiekd_cli import eval as evaluation
from tiekd_cli.cache_teacher import build_teacher_cache
from tiekd_cli.iterate import iterate
from tiekd_fairseq.checkpoints import CheckpointError
from tiekd_fairseq.frozen_model import ModelError, load_frozen_model

from .helpers import iterate_kwargs, refused


@pytest.fixture(scope="module")
def task(corpus, teacher):
    return build(corpus.data_bin, teacher)[0]


def truncated_copy(path, dest):
    """What a process killed while writing ``path`` leaves: its first half."""
    dest.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return dest


def iterate_with_student(corpus, teacher, student_init, save_dir):
    return iterate(**iterate_kwargs(corpus, teacher, save_dir, student_init=student_init))


def test_a_truncated_teacher_is_refused_in_one_line(case, corpus, teacher, task, tmp_path):
    protected = case("a truncated teacher checkpoint (partial write)", "the checkpoint; no cache output")
    cut = truncated_copy(teacher, tmp_path / "teacher.pt")
    protected.keep(tmp_path)  # the cache folder may not appear
    message = f"teacher checkpoint {cut} is truncated: its zip archive has no end (a partial write?)"
    refused(CheckpointError, message, load_frozen_model, str(cut), task)
    refused(SystemExit, message, build, corpus.data_bin, cut)
    refused(CheckpointError, message, build_teacher_cache, corpus.data_bin, "valid", cut, 4, tmp_path / "cache",
            cpu=True)
    protected.verify()


def test_a_truncated_student_is_refused_before_training_or_decoding(case, corpus, teacher, tmp_path, capsys):
    protected = case("a truncated student checkpoint (--student-init, a tiekd-eval system)",
                     "the checkpoint; no run folder or tiekd-eval output")
    cut = truncated_copy(teacher, tmp_path / "checkpoint_last.pt")
    protected.keep(tmp_path)  # the run and out folders may not appear
    refused(CheckpointError, f"student checkpoint {cut} is truncated: its zip archive has no end (a partial write?)",
            iterate_with_student, corpus, teacher, cut, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([str(a) for a in ("--data-bin", corpus.data_bin, teacher, cut,
                                          "--ref", corpus.root / "raw.test.de", "--out", tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tiekd-eval: error: system checkpoint {cut} is truncated: its zip archive has no end (a partial write?)")
    protected.verify()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(case, corpus, teacher, tmp_path):
    protected = case("a crafted checkpoint (a pickle that calls os.system)",
                     "the user's files: the code's marker file never appears; no run folder")
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": {}, "cfg": None, "payload": _RunsCode(marker)}, crafted)
    protected.keep(tmp_path)  # the marker the code would touch, and the run folder, may not appear
    reason = ("refused: it asks to load posix.system, which is not a fairseq checkpoint global "
              "(a checkpoint may not run code)")
    refused(SystemExit, f"teacher checkpoint {crafted} {reason}", build, corpus.data_bin, crafted)
    refused(CheckpointError, f"student checkpoint {crafted} {reason}", iterate_with_student, corpus, teacher, crafted,
            tmp_path / "run")
    # fairseq's own loader, as fairseq-generate uses it, refuses it too once the plugin is imported.
    with pytest.raises(Exception, match="GLOBAL posix.system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(crafted))
    protected.verify()


@pytest.fixture(scope="module")
def language_model(corpus, tmp_path_factory):
    """A transformer_lm on the target dictionary, saved by fairseq's trainer as fairseq-train saves it."""
    root = tmp_path_factory.mktemp("lm")
    shutil.copy(corpus.data_bin / "dict.de.txt", root / "dict.txt")
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(root), "--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "1",
        "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
        "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--no-save-optimizer-state",
    ])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    path = root / "checkpoint_best.pt"
    Trainer(cfg, task, model, task.build_criterion(cfg.criterion)).save_checkpoint(str(path), {})
    return path


def test_a_language_model_as_teacher_is_refused_naming_what_it_is(case, corpus, task, language_model):
    protected = case("a language model as teacher", "the checkpoint and the data-bin")
    protected.keep(language_model, corpus.data_bin)
    message = (f"teacher {language_model} is a TransformerLanguageModel (arch transformer_lm, task language_modeling), "
               "not an encoder-decoder translation model")
    refused(ModelError, message, load_frozen_model, str(language_model), task)
    refused(SystemExit, message, build, corpus.data_bin, language_model)
    protected.verify()


def test_a_teacher_saved_on_cuda_loads_on_this_cpu_and_follows_the_students_precision(case, teacher, task, tmp_path):
    protected = case("a teacher saved on CUDA, loaded on a machine without CUDA",
                     "the checkpoint; the teacher's outputs, equal to the CPU-saved original's")
    state = torch.load(teacher, map_location="cpu")
    on_cuda = tmp_path / "teacher_cuda.pt"
    with pytest.MonkeyPatch.context() as patch:
        # Every storage recorded as a CUDA tensor's, as torch.save writes them from a GPU run.
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, on_cuda)
    protected.keep(on_cuda)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
            torch.load(on_cuda)
    frozen, reference = load_frozen_model(str(on_cuda), task), load_frozen_model(str(teacher), task)
    assert {p.device.type for p in frozen.model.parameters()} == {"cpu"}
    net_input = valid_sample(task)["net_input"]
    protected.same("teacher log-probs", frozen.gold_prefix_lprobs(net_input), reference.gold_prefix_lprobs(net_input))
    # The student's precision (--bf16 here; on a GPU also its device): the teacher follows on the first step.
    frozen.follow(torch.zeros(1, dtype=torch.bfloat16))
    assert {p.dtype for p in frozen.model.parameters()} == {torch.bfloat16}
    encoder_out = frozen.encode(net_input["src_tokens"], net_input["src_lengths"])
    logits = frozen.decode(net_input["prev_output_tokens"], encoder_out, net_input["src_lengths"])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    protected.verify()
