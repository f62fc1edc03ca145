"""A model loaded frozen from its own checkpoint, checked against the task: the teacher, or a student under study.

``FrozenModel`` is deliberately not an ``nn.Module``: held by the task, the teacher
cannot become a submodule of the student or the criterion, so it never reaches the
optimizer, DDP or a saved student checkpoint.
"""

import logging
import os

import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import FairseqEncoderDecoderModel

from .checkpoints import CheckpointError, load_error
from .data.dictionaries import DictionaryError, dictionary_difference, dictionary_folder
from .errors import InputError, one_line

logger = logging.getLogger(__name__)


class ModelError(InputError):
    """A checkpoint that holds no usable translation model; the message names the file."""


class FrozenModel:
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
        """The encoder output of a batch: src_tokens (B, S), src_lengths (B,)."""
        return self.model.encoder(src_tokens, src_lengths=src_lengths)

    @torch.no_grad()
    def decode(self, prev_output_tokens, encoder_out, src_lengths):
        """Output logits (B, T, V) of one decoder pass on the prefix ``prev_output_tokens`` (B, T)."""
        return self.model.decoder(prev_output_tokens, encoder_out=encoder_out, src_lengths=src_lengths)[0]

    @torch.no_grad()
    def decode_features(self, prev_output_tokens, encoder_out, src_lengths):
        """Decoder features (B, T, d), before the output projection ``output_weight``, of one pass."""
        return self.model.decoder(prev_output_tokens, encoder_out=encoder_out, src_lengths=src_lengths,
                                  features_only=True)[0]

    def gold_prefix_lprobs(self, net_input):
        """Log-probabilities (B, T, V) decoding a collated batch's gold prefix."""
        src_lengths = net_input["src_lengths"]
        encoder_out = self.encode(net_input["src_tokens"], src_lengths)
        logits = self.decode(net_input["prev_output_tokens"], encoder_out, src_lengths)
        return self.model.get_normalized_probs((logits, None), log_probs=True)


def load_frozen_model(path, task, teacher_data=None, role="teacher") -> FrozenModel:
    """Build the model from the config saved in checkpoint ``path``, after checking its dictionaries.

    Args:
        path: the checkpoint.
        task: a translation task; the model's dictionaries (found by ``dictionary_folder``) must equal
            its source and target dictionaries symbol by symbol.
        teacher_data: the folder of the dictionaries, looked at first (``--teacher-data``).
        role: what the model is, in messages (teacher, student NAME).
    """
    state = _read_checkpoint(path, role)
    cfg = convert_namespace_to_omegaconf(state["args"]) if state.get("args") else state.get("cfg")
    if cfg is None or cfg.get("model") is None:
        raise ModelError(f"{role} checkpoint {path} has no model config (args/cfg): not a fairseq checkpoint")
    # Before the dictionaries: another kind of model (a language model, say) has none to compare.
    arch = getattr(cfg.model, "_name", None) or getattr(cfg.model, "arch", None)
    model_class = models.ARCH_MODEL_REGISTRY.get(arch)
    if model_class is not None and not issubclass(model_class, FairseqEncoderDecoderModel):
        raise ModelError(f"{role} {path} is a {model_class.__name__} (arch {arch}, task "
                         f"{getattr(cfg.get('task'), '_name', None)}), not an encoder-decoder translation model")
    langs = (task.cfg.source_lang, task.cfg.target_lang)
    folder = dictionary_folder(path, getattr(cfg.task, "data", None), langs, teacher_data, role)
    for side, lang, expected in (("source", langs[0], task.src_dict), ("target", langs[1], task.tgt_dict)):
        dict_path = f"{folder}/dict.{lang}.txt"
        diff = dictionary_difference(expected, Dictionary.load(dict_path), role)
        if diff:
            raise DictionaryError(f"{role} {side} dictionary {dict_path} differs from the task's: {diff}")
    try:
        model = models.build_model(cfg.model, task, from_checkpoint=True)
    except Exception as err:
        raise ModelError(f"cannot build {role} model from {path}: {one_line(err)}") from err
    if not isinstance(model, FairseqEncoderDecoderModel):
        raise ModelError(f"{role} {path} is a {type(model).__name__}, not an encoder-decoder translation model")
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except Exception as err:
        raise ModelError(f"{role} weights in {path} do not fit its config: {one_line(err)}") from err
    logger.info(
        "%s %s: %s, %s parameters, frozen",
        role, path, getattr(cfg.model, "arch", type(model).__name__), f"{sum(p.numel() for p in model.parameters()):,}",
    )
    return FrozenModel(model)


def _read_checkpoint(path, role):
    if not os.path.isfile(path):
        raise CheckpointError(f"{role} checkpoint {path} does not exist")
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path, load_on_all_ranks=True)
    except Exception as err:
        raise CheckpointError(load_error(path, role, err)) from err
