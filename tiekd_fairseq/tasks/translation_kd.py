"""``translation_kd``: fairseq's translation task plus a frozen teacher for the KD criteria."""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..teacher import TeacherError, load_teacher

logger = logging.getLogger(__name__)


@dataclass
class TranslationKDConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "teacher checkpoint (any fairseq encoder-decoder model); required by the KD criteria"},
    )
    teacher_data: Optional[str] = field(
        default=None,
        metadata={"help": "directory with the teacher's dict.{src,tgt}.txt; default: the data dir saved in its checkpoint"},
    )


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask):
    """Translation with a teacher, loaded only when a KD criterion is built (that is, for training)."""

    def __init__(self, cfg: TranslationKDConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.teacher = None

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint=from_checkpoint)
        if getattr(criterion, "needs_teacher", False) and self.teacher is None:
            if not self.cfg.teacher_path:
                raise SystemExit(f"translation_kd: error: criterion {cfg._name} needs --teacher-path")
            try:
                self.teacher = load_teacher(self.cfg.teacher_path, self, self.cfg.teacher_data)
            except TeacherError as err:
                # One line, no traceback: the run has not started and nothing is lost.
                raise SystemExit(f"translation_kd: error: {err}") from None
        return criterion
