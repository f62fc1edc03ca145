"""``translation_kd``: fairseq's translation task plus a frozen teacher for the KD criteria."""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..data.dictionaries import TEACHER_DATA_HELP
from ..data.mono_shards import ParallelWithMono, check_shard, load_shard
from ..data.teacher_cache import TeacherCache
from ..errors import InputError
from ..frozen_model import load_frozen_model

logger = logging.getLogger(__name__)


@dataclass
class TranslationKDConfig(TranslationConfig):
    teacher: Optional[str] = field(
        default=None,
        metadata={"help": "teacher checkpoint (any fairseq encoder-decoder model); required by the KD criteria"},
    )
    teacher_data: Optional[str] = field(
        default=None,
        metadata={"help": TEACHER_DATA_HELP},
    )
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={"help": "tiekd-cache-teacher output for the training subset: the gold pass reads the teacher's "
                          "top-K from it instead of running the teacher (KL over K tokens + a tail bucket)"},
    )
    mono_data: Optional[str] = field(
        default=None,
        metadata={"help": "source-only shard folders, separated by ':' (fairseq-preprocess --only-source with the "
                          "task's source dictionary); epoch e uses shard (e-1) mod S"},
    )
    mono_ratio: float = field(
        default=0.5, metadata={"help": "share of training batches drawn from the source-only shard, in [0, 1)"}
    )
    mono_prefix: ChoiceEnum(["student", "teacher"]) = field(
        default="student", metadata={"help": "who writes the target side of source-only sentences (greedy)"}
    )
    mono_max_len_a: float = field(
        default=1.2, metadata={"help": "source-only prefixes have at most a * (source width) + b tokens"}
    )
    mono_max_len_b: int = field(default=10, metadata={"help": "see --mono-max-len-a"})


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask):
    """Translation with a teacher, loaded only when a KD criterion is built (that is, for training)."""

    def __init__(self, cfg: TranslationKDConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.teacher = None
        self.teacher_cache = None
        self.teacher_cache_k = 1
        self.mono_shards = cfg.mono_data.split(os.pathsep) if cfg.mono_data else []
        # Every shard is checked now, so a bad one stops the run before training, not mid-epoch.
        try:
            if not 0 <= cfg.mono_ratio < 1:
                raise InputError(f"--mono-ratio must be in [0, 1), got {cfg.mono_ratio}")
            for shard in self.mono_shards:
                check_shard(shard, cfg.source_lang, src_dict)
            if cfg.teacher_cache:
                self.teacher_cache = TeacherCache(cfg.teacher_cache)
        except InputError as err:
            raise SystemExit(f"translation_kd: error: {err}") from None

    def has_sharded_data(self, split):
        # With source-only shards the training set changes every epoch.
        return bool(self.mono_shards) or super().has_sharded_data(split)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if split != self.cfg.train_subset:
            return
        if self.teacher_cache is not None:
            try:
                self.teacher_cache.check(self, split, self.teacher_cache_k)
            except InputError as err:
                raise SystemExit(f"translation_kd: error: {err}") from None
        if not self.mono_shards or self.cfg.mono_ratio == 0:
            return
        shard = self.mono_shards[(epoch - 1) % len(self.mono_shards)]
        mono = load_shard(shard, self.cfg.source_lang, self.src_dict, self.cfg.left_pad_source)
        logger.info("epoch %d: source-only shard %s, %d sentences", epoch, shard, len(mono))
        self.datasets[split] = ParallelWithMono(self.datasets[split], mono, self.cfg.mono_ratio)

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        """fairseq's filter, with one line instead of a traceback when a sentence is too long and may not be skipped.

        (Source-only sentences are always skipped, and counted, by ``ParallelWithMono``.)
        """
        indices, too_long = dataset.filter_indices_by_size(indices, max_positions)
        if len(too_long) == 0:
            return indices
        split = next((name for name, loaded in self.datasets.items() if loaded is dataset), "a subset")
        first = int(min(too_long))  # fairseq lists them in length order
        src_len, tgt_len = dataset.size(first)
        where = (f"{len(too_long)} sentences of {split} in {self.cfg.data} are longer than the max positions "
                 f"{max_positions} (the first: sentence {first}, line {first + 1} of the binarized text, "
                 f"{src_len} source and {tgt_len} target tokens)")
        if not ignore_invalid_inputs:
            raise SystemExit(f"translation_kd: error: {where}: shorten or drop them, "
                             "or pass --skip-invalid-size-inputs-valid-test to skip them")
        logger.warning("skipped: %s", where)
        return indices

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint=from_checkpoint)
        use = getattr(criterion, "teacher_use", None)  # declared by the KD criteria only
        if self.mono_shards and not (use and use.learns_from_source_only):
            raise SystemExit(f"translation_kd: error: --mono-data needs a KD criterion with --kd-alpha > 0, "
                             f"not {cfg._name}: source-only batches have no gold target")
        if use is None:
            return criterion
        # With one pass and no source-only batches a cache replaces the teacher entirely.
        needs_teacher = True
        if self.teacher_cache is not None:
            if use.cache_topk is None:
                raise SystemExit(f"translation_kd: error: --teacher-cache holds temperature-1 top-K log-probs: it "
                                 f"serves the full KL at --kd-temperature 1 only ({cfg._name})")
            self.teacher_cache_k = use.cache_topk
            needs_teacher = use.passes > 1 or bool(self.mono_shards)
        if needs_teacher and self.teacher is None:
            if not self.cfg.teacher:
                raise SystemExit(f"translation_kd: error: criterion {cfg._name} needs --teacher")
            try:
                self.teacher = load_frozen_model(self.cfg.teacher, self, self.cfg.teacher_data)
            except InputError as err:
                # One line, no traceback: the run has not started and nothing is lost.
                raise SystemExit(f"translation_kd: error: {err}") from None
        return criterion
