"""The frozen teacher: loaded from its own checkpoint, checked against the task, never trained.

``Teacher`` is deliberately not an ``nn.Module``: held by the task, it cannot
become a submodule of the student or the criterion, so it never reaches the
optimizer, DDP or a saved student checkpoint.
"""

import logging
import os

import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import FairseqEncoderDecoderModel

from .cli import one_line
from .safe_checkpoints import load_error

logger = logging.getLogger(__name__)

TEACHER_DATA_HELP = ("folder of the teacher's dict.SRC.txt and dict.TGT.txt (default: the teacher checkpoint's "
                     "folder, then the data dir recorded in it)")


class TeacherError(Exception):
    """A teacher that cannot be used; the message is one line naming the file or symbol."""


class Teacher:
    """A translation model in eval mode with no gradients, that follows the student's device and dtype."""

    def __init__(self, model: FairseqEncoderDecoderModel):
        model.requires_grad_(False)
        model.eval()
        # Dropout must stay off even if something calls .train() on it.
        model.train = lambda mode=True: torch.nn.Module.train(model, False)
        self.model = model

    def follow(self, student_param: torch.Tensor) -> None:
        """Move to the student's device and precision (fp16/bf16 under --fp16/--bf16), once."""
        ref = next(self.model.parameters())
        if ref.device != student_param.device or ref.dtype != student_param.dtype:
            self.model.to(device=student_param.device, dtype=student_param.dtype)

    @torch.no_grad()
    def encode(self, src_tokens, src_lengths):
        return self.model.encoder(src_tokens, src_lengths=src_lengths)

    @torch.no_grad()
    def decode(self, prev_output_tokens, encoder_out, src_lengths):
        """Output logits (B, T, V) for one decoder pass on the given prefix."""
        return self.model.decoder(prev_output_tokens, encoder_out=encoder_out, src_lengths=src_lengths)[0]

    def gold_prefix_lprobs(self, net_input):
        """Log-probabilities (B, T, V) decoding a collated batch's gold prefix."""
        src_lengths = net_input["src_lengths"]
        encoder_out = self.encode(net_input["src_tokens"], src_lengths)
        logits = self.decode(net_input["prev_output_tokens"], encoder_out, src_lengths)
        return self.model.get_normalized_probs((logits, None), log_probs=True)


def load_teacher(path, task, teacher_data=None, role="teacher") -> Teacher:
    """Build the teacher from the config saved in its checkpoint, after checking its dictionaries.

    The dictionaries come from ``dictionary_folder`` and must equal the task's
    symbol by symbol. ``role`` names the model in messages (tools that load
    students frozen, for analysis, use this too).
    """
    state = _read_checkpoint(path, role)
    cfg = convert_namespace_to_omegaconf(state["args"]) if state.get("args") else state.get("cfg")
    if cfg is None or cfg.get("model") is None:
        raise TeacherError(f"{role} checkpoint {path} has no model config (args/cfg): not a fairseq checkpoint")
    # Before the dictionaries: another kind of model (a language model, say) has none to compare.
    arch = getattr(cfg.model, "_name", None) or getattr(cfg.model, "arch", None)
    model_class = models.ARCH_MODEL_REGISTRY.get(arch)
    if model_class is not None and not issubclass(model_class, FairseqEncoderDecoderModel):
        raise TeacherError(f"{role} {path} is a {model_class.__name__} (arch {arch}, task "
                           f"{getattr(cfg.get('task'), '_name', None)}), "
                           "not an encoder-decoder translation model")
    data_dir = dictionary_folder(path, getattr(cfg.task, "data", None), (task.cfg.source_lang, task.cfg.target_lang),
                                 teacher_data, role)
    for side, lang, expected in (
        ("source", task.cfg.source_lang, task.src_dict),
        ("target", task.cfg.target_lang, task.tgt_dict),
    ):
        dict_path = os.path.join(data_dir, f"dict.{lang}.txt")
        diff = dictionary_difference(expected, Dictionary.load(dict_path), role)
        if diff:
            raise TeacherError(f"{role} {side} dictionary {dict_path} differs from the task's: {diff}")
    try:
        model = models.build_model(cfg.model, task, from_checkpoint=True)
    except Exception as err:
        raise TeacherError(f"cannot build {role} model from {path}: {one_line(err)}") from err
    if not isinstance(model, FairseqEncoderDecoderModel):
        raise TeacherError(
            f"{role} {path} is a {type(model).__name__}, not an encoder-decoder translation model"
        )
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except Exception as err:
        raise TeacherError(f"{role} weights in {path} do not fit its config: {one_line(err)}") from err
    logger.info(
        "%s %s: %s, %s parameters, frozen",
        role, path, getattr(cfg.model, "arch", type(model).__name__), f"{sum(p.numel() for p in model.parameters()):,}",
    )
    return Teacher(model)


def dictionary_folder(path, recorded_data, langs, teacher_data=None, role="teacher") -> str:
    """The first folder holding ``dict.{lang}.txt`` for both ``langs`` of the model in checkpoint ``path``.

    Checkpoints do not store dictionaries. Looked for, in order: ``teacher_data``
    (``--teacher-data``); the checkpoint's own folder, where fairseq's released
    models keep them; ``recorded_data``, the data dir recorded in the checkpoint.
    """
    if teacher_data is not None and not os.path.isdir(teacher_data):
        raise TeacherError(f"--teacher-data {teacher_data} is not a folder")
    recorded = str(recorded_data or "").split(os.pathsep)[0]
    places = [
        ("--teacher-data", teacher_data),
        ("the checkpoint's folder", os.path.dirname(os.path.abspath(path))),
        ("the data dir recorded in the checkpoint", recorded or None),
    ]
    names = [f"dict.{lang}.txt" for lang in dict.fromkeys(langs)]
    tried = [(what, folder) for what, folder in places if folder is not None]
    for _, folder in tried:
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return folder
    hint = "; pass --teacher-data DIR holding them" if role == "teacher" else ""
    raise TeacherError(f"{role} dictionaries {' and '.join(names)} not found (checkpoints do not store them) in "
                       + ", ".join(f"{what} {folder}" for what, folder in tried) + hint)


def dictionary_difference(expected: Dictionary, found: Dictionary, found_name="teacher") -> str:
    """'' when both dictionaries hold the same symbols at the same indices, else the first difference."""
    for index, (want, got) in enumerate(zip(expected.symbols, found.symbols)):
        if want != got:
            return f"first difference at index {index}: {found_name} has {got!r}, task has {want!r}"
    if len(expected) != len(found):
        return f"{found_name} has {len(found)} symbols, task has {len(expected)}"
    return ""


def _read_checkpoint(path, role):
    if not os.path.isfile(path):
        raise TeacherError(f"{role} checkpoint {path} does not exist")
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, load_on_all_ranks=True)
    except Exception as err:
        raise TeacherError(load_error(path, role, err)) from err
