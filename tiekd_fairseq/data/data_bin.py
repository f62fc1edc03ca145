"""A fairseq data-bin: its language pair, the size of a subset, and a plain translation task on it."""

import os
from pathlib import Path

from fairseq.data import indexed_dataset
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..errors import InputError


class DataBinError(InputError):
    """A data-bin, subset or dictionary that is missing; the message names the folder or file."""


def language_pair(data_bin, subset=None, source_lang=None, target_lang=None):
    """(src, tgt) as given, else read from the names of the binarized ``SUBSET.SRC-TGT.SRC.idx`` files.

    Args:
        data_bin: the folder.
        subset: look at this subset's files only (None: any subset).
        source_lang, target_lang: either or both, to choose among several pairs.
    """
    if source_lang and target_lang:
        return source_lang, target_lang
    if not Path(data_bin).is_dir():
        raise DataBinError(f"data-bin {data_bin} is not a folder")
    pairs = set()
    for path in Path(data_bin).glob(f"{subset or '*'}.*-*.*.idx"):
        parts = path.name[:-len(".idx")].rsplit(".", 2)
        src, _, tgt = parts[1].partition("-")
        if len(parts) == 3 and parts[2] == src and (source_lang or src) == src and (target_lang or tgt) == tgt:
            pairs.add((src, tgt))
    if len(pairs) != 1:
        found = "no" if not pairs else "several (" + ", ".join(sorted(f"{s}-{t}" for s, t in pairs)) + ")"
        files = f"{subset} source files {subset}" if subset else "source files SUBSET"
        raise DataBinError(f"data-bin {data_bin} has {found} binarized {files}.SRC-TGT.SRC.idx"
                           + ("; pass --source-lang and --target-lang" if pairs else ""))
    return pairs.pop()


def subset_size(data_bin, subset, source_lang, target_lang) -> int:
    """Sentences in a binarized subset, found in either direction as fairseq's translation task finds it."""
    for pair in (f"{source_lang}-{target_lang}", f"{target_lang}-{source_lang}"):
        prefix = os.path.join(data_bin, f"{subset}.{pair}.{source_lang}")
        impl = indexed_dataset.infer_dataset_impl(prefix)
        if impl is not None:
            return len(indexed_dataset.make_dataset(prefix, impl=impl))
    raise DataBinError(f"data-bin {data_bin} has no binarized subset {subset!r} for {source_lang}-{target_lang}")


def translation_task(data_bin, subset=None, source_lang=None, target_lang=None) -> TranslationTask:
    """A plain ``translation`` task on ``data_bin``, with ``subset`` loaded (and not empty) when given."""
    src, tgt = language_pair(data_bin, None, source_lang, target_lang)
    for lang in (src, tgt):
        if not os.path.isfile(os.path.join(data_bin, f"dict.{lang}.txt")):
            raise DataBinError(f"dictionary {os.path.join(data_bin, f'dict.{lang}.txt')} does not exist")
    # The II(...) defaults of TranslationConfig point into a full fairseq config; these are their values there.
    task = TranslationTask.setup_task(TranslationConfig(
        data=str(data_bin), source_lang=src, target_lang=tgt,
        train_subset="train", dataset_impl=None, required_seq_len_multiple=1,
    ))
    if subset is not None:
        try:
            task.load_dataset(subset)
        except FileNotFoundError:
            raise DataBinError(f"data-bin {data_bin} has no subset {subset!r} ({subset}.{src}-{tgt}.*)") from None
        if len(task.dataset(subset)) == 0:
            raise DataBinError(f"subset {subset!r} of {data_bin} holds no sentence")
    return task
