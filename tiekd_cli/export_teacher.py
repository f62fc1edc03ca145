"""``tiekd-export-teacher``: a trained model as a folder that loads on any machine.

A fairseq checkpoint records the absolute paths of the machine that trained it
(data dir, save dir, user dir, ...) and no dictionaries; a sentencepiece model
records its training input. The exported folder holds the checkpoint with every
absolute path in its config cleared and no optimizer state, the dictionaries
beside it (where ``--teacher`` finds them), the sentencepiece model without
its training paths, and ``SHA256SUMS``. The weights are kept bit for bit, or cast
to fp16 with ``--fp16``.
"""

import argparse
import os
from argparse import Namespace
from pathlib import Path

import torch
from fairseq.data import Dictionary

from tiekd_fairseq.checkpoints import check_checkpoint
from tiekd_fairseq.data.data_bin import DataBinError, language_pair
from tiekd_fairseq.data.dictionaries import TEACHER_DATA_HELP, dictionary_folder

from .files import atomic_write, atomic_write_text, sha256_file
from .shell import UsageError, run_tool

CHECKSUMS = "SHA256SUMS"


def export_teacher(checkpoint, out, teacher_data=None, spm_model=None, fp16=False, source_lang=None,
                   target_lang=None) -> Path:
    """Write ``out/teacher.pt``, ``out/dict.{src,tgt}.txt``, ``out/spm.model`` (if given) and ``out/SHA256SUMS``.

    Args:
        checkpoint: fairseq encoder-decoder checkpoint.
        out: output folder (created; may be the folder of ``spm_model``).
        teacher_data: folder of the model's dictionaries, searched first as by ``--teacher-data``.
        spm_model: sentencepiece model of the training text.
        fp16: cast floating-point weights to fp16.
        source_lang, target_lang: the language pair when neither the checkpoint nor a data-bin names it.
    """
    out = Path(out)
    check_checkpoint(checkpoint, "checkpoint")
    if spm_model is not None and not Path(spm_model).is_file():
        raise UsageError(f"--spm-model {spm_model} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    task_cfg = state["args"] if state.get("args") else state["cfg"]["task"]
    task_cfg = vars(task_cfg) if isinstance(task_cfg, Namespace) else task_cfg
    recorded = task_cfg.get("data")
    langs = _language_pair(task_cfg, source_lang, target_lang, [teacher_data, recorded])
    folder = dictionary_folder(checkpoint, recorded, langs, teacher_data)
    dictionaries = {lang: Path(folder) / f"dict.{lang}.txt" for lang in langs}
    _check_dictionaries_fit(state["model"], dictionaries, langs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out {out}: {err.strerror}") from None

    model = {k: v.half() if fp16 and v.is_floating_point() else v for k, v in state["model"].items()}
    portable = {
        "args": without_machine_paths(state.get("args")),
        "cfg": without_machine_paths(state.get("cfg")),
        "model": model,
        "extra_state": {"train_iterator": state.get("extra_state", {}).get("train_iterator")},
        "optimizer_history": state["optimizer_history"][-1:],
        "last_optimizer_state": None,
    }
    atomic_write(out / "teacher.pt", lambda f: torch.save(portable, f))
    written = ["teacher.pt"]
    for lang, path in dictionaries.items():
        target = out / f"dict.{lang}.txt"
        if path.resolve() != target.resolve():
            atomic_write(target, lambda f, path=path: f.write(path.read_bytes()))
        written.append(target.name)
    if spm_model is not None:
        data = Path(spm_model).read_bytes()
        atomic_write(out / "spm.model", lambda f: f.write(sentencepiece_without_paths(data)))
        written.append("spm.model")
    atomic_write_text(out / CHECKSUMS, "".join(f"{sha256_file(out / name)}  {name}\n" for name in written))
    return out


def verify_checksums(folder, required):
    """Check ``folder`` against its ``SHA256SUMS``, which must list every name in ``required``; one line if not."""
    sums = Path(folder) / CHECKSUMS
    if not sums.is_file():
        raise UsageError(f"{sums} does not exist")
    expected = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines() if line.strip())
    for name in (*required, *(n for n in expected if n not in required)):
        path = Path(folder) / name
        if name not in expected:
            raise UsageError(f"{sums} lists no {name}")
        if not path.is_file():
            raise UsageError(f"{path} does not exist")
        if sha256_file(path) != expected[name]:
            raise UsageError(f"{path} does not match its checksum in {sums}: the file is damaged or was replaced")


def _language_pair(task_cfg, source_lang, target_lang, folders):
    """The pair given, else recorded in the checkpoint, else read from a data-bin's file names."""
    src = source_lang or task_cfg.get("source_lang")
    tgt = target_lang or task_cfg.get("target_lang")
    if src and tgt:
        return src, tgt
    for folder in folders:
        for part in str(folder or "").split(os.pathsep):
            if part and os.path.isdir(part):
                try:
                    return language_pair(part, None, src, tgt)
                except DataBinError:
                    continue
    raise UsageError("the checkpoint records no language pair and no data-bin names one: "
                     "pass --source-lang and --target-lang")


def _check_dictionaries_fit(model, dictionaries, langs):
    """Each dictionary's size must be the row count of its side's embedding (a wrong folder shows here)."""
    for side, lang in zip(("encoder", "decoder"), langs):
        weight = model.get(f"{side}.embed_tokens.weight")
        size = len(Dictionary.load(str(dictionaries[lang])))
        if weight is not None and weight.size(0) != size:
            raise UsageError(f"dictionary {dictionaries[lang]} has {size} symbols but the checkpoint's {side} "
                             f"embedding has {weight.size(0)} rows: not the dictionary it was trained with")


def without_machine_paths(value):
    """A copy of a checkpoint's config (dicts, lists, Namespaces) with every absolute path set to None.

    A string counts as a path list when it is split by ``os.pathsep`` (fairseq's ``--data a:b``).
    """
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, Namespace):
        return Namespace(**without_machine_paths(vars(value)))
    if isinstance(value, (list, tuple)):
        return type(value)(without_machine_paths(item) for item in value)
    if isinstance(value, str) and any(os.path.isabs(part) for part in value.split(os.pathsep)):
        return None
    return value


# sentencepiece's ModelProto keeps its TrainerSpec in field 2, whose fields 1 (input) and
# 2 (model_prefix) are the training paths; protobuf itself is not needed to drop them.
TRAINER_SPEC, PATH_FIELDS = 2, (1, 2)


def sentencepiece_without_paths(data: bytes) -> bytes:
    """A serialized sentencepiece model with its trainer's input and model-prefix paths removed."""
    fields = []
    for number, raw, payload in _fields(data):
        if number == TRAINER_SPEC and payload is not None:
            spec = b"".join(raw for field, raw, _ in _fields(payload) if field not in PATH_FIELDS)
            raw = _varint(TRAINER_SPEC << 3 | 2) + _varint(len(spec)) + spec
        fields.append(raw)
    return b"".join(fields)


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data):
    """(field number, raw bytes of the field, payload if length-delimited) of a protobuf message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        wire_type, payload = key & 7, None
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            payload, pos = data[pos:pos + length], pos + length
        else:
            raise UsageError(f"not a sentencepiece model: protobuf wire type {wire_type} at byte {start}")
        if pos > len(data):
            raise UsageError("not a sentencepiece model: it ends inside a field (truncated?)")
        yield key >> 3, data[start:pos], payload


def main(argv=None):
    run_tool("tiekd-export-teacher", _main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="tiekd-export-teacher",
        description="A trained model as a folder that loads on any machine: the checkpoint without machine paths "
                    "or optimizer state, its dictionaries beside it, the sentencepiece model, SHA256SUMS.")
    parser.add_argument("checkpoint", help="fairseq checkpoint of the teacher")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--teacher-data", help=TEACHER_DATA_HELP)
    parser.add_argument("--spm-model", help="sentencepiece model to ship beside it (its training paths are removed)")
    parser.add_argument("--fp16", action="store_true", help="store floating-point weights in fp16 (half the size)")
    parser.add_argument("--source-lang", help="default: recorded in the checkpoint or read from the data-bin")
    parser.add_argument("--target-lang", help="default: recorded in the checkpoint or read from the data-bin")
    args = parser.parse_args(argv)
    out = export_teacher(args.checkpoint, args.out, args.teacher_data, args.spm_model, args.fp16,
                         args.source_lang, args.target_lang)
    print(f"tiekd-export-teacher: {out}: {(out / CHECKSUMS).read_text().count(chr(10))} files, see {CHECKSUMS}")


if __name__ == "__main__":
    main()
