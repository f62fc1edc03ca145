"""A plain fairseq ``translation`` task on a binarized data folder, for the tools that read one."""

import os
from pathlib import Path

from fairseq.data import data_utils
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .cli import UsageError, require_file


def translation_task(data_bin, subset):
    """A plain ``translation`` task on ``data_bin`` with ``subset`` loaded; UsageError if either is missing."""
    if not Path(data_bin).is_dir():
        raise UsageError(f"data-bin {data_bin} is not a directory")
    src, tgt = data_utils.infer_language_pair(str(data_bin))
    if src is None:
        raise UsageError(f"data-bin {data_bin} holds no binarized SPLIT.SRC-TGT.* files")
    for lang in (src, tgt):
        require_file(os.path.join(data_bin, f"dict.{lang}.txt"), "dictionary")
    # The II(...) defaults of TranslationConfig point into a full fairseq config; these are their values there.
    task = TranslationTask.setup_task(TranslationConfig(
        data=str(data_bin), source_lang=src, target_lang=tgt,
        train_subset="train", dataset_impl=None, required_seq_len_multiple=1,
    ))
    try:
        task.load_dataset(subset)
    except FileNotFoundError:
        raise UsageError(f"data-bin {data_bin} has no subset {subset!r} ({subset}.{src}-{tgt}.*)") from None
    if len(task.dataset(subset)) == 0:
        raise UsageError(f"subset {subset!r} of {data_bin} holds no sentence")
    return task
