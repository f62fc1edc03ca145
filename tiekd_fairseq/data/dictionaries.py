"""Finding a model's dictionaries, and comparing two symbol by symbol."""

import os

from fairseq.data import Dictionary

from ..errors import InputError

TEACHER_DATA_HELP = ("folder of the teacher's dict.SRC.txt and dict.TGT.txt (default: the teacher checkpoint's "
                     "folder, then the data dir recorded in it)")


class DictionaryError(InputError):
    """Dictionaries that are missing or differ; the message names the files."""


def dictionary_folder(checkpoint, recorded_data, langs, teacher_data=None, role="teacher") -> str:
    """The first folder holding ``dict.{lang}.txt`` for both ``langs`` of the model in ``checkpoint``.

    Checkpoints store no dictionaries. Looked for, in order: ``teacher_data``
    (``--teacher-data``); the checkpoint's own folder, where fairseq's released models
    and ``tiekd-export-teacher`` keep them; ``recorded_data``, the data dir recorded in
    the checkpoint, which exists only where it was trained.
    """
    if teacher_data is not None and not os.path.isdir(teacher_data):
        raise DictionaryError(f"--teacher-data {teacher_data} is not a folder")
    recorded = str(recorded_data or "").split(os.pathsep)[0]
    places = [
        ("--teacher-data", teacher_data),
        ("the checkpoint's folder", os.path.dirname(os.path.abspath(checkpoint))),
        ("the data dir recorded in the checkpoint", recorded or None),
    ]
    names = [f"dict.{lang}.txt" for lang in dict.fromkeys(langs)]
    tried = [(what, folder) for what, folder in places if folder is not None]
    for _, folder in tried:
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return folder
    hint = "; pass --teacher-data DIR holding them" if role == "teacher" else ""
    raise DictionaryError(f"{role} dictionaries {' and '.join(names)} not found (checkpoints do not store them) in "
                          + ", ".join(f"{what} {folder}" for what, folder in tried) + hint)


def dictionary_difference(expected: Dictionary, found: Dictionary, found_name="teacher") -> str:
    """'' when both dictionaries hold the same symbols at the same indices, else the first difference."""
    for index, (want, got) in enumerate(zip(expected.symbols, found.symbols)):
        if want != got:
            return f"first difference at index {index}: {found_name} has {got!r}, task has {want!r}"
    if len(expected) != len(found):
        return f"{found_name} has {len(found)} symbols, task has {len(expected)}"
    return ""
