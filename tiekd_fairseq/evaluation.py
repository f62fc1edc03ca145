"""``tiekd-eval``: decode checkpoints with fairseq-generate, score them with sacreBLEU, test significance.

Each system is a checkpoint, or a checkpoint folder whose last N epoch (or
update) checkpoints are averaged first, as fairseq's
``scripts/average_checkpoints.py`` does (that script is not part of the
installed package). Hypotheses are put back in corpus order, detokenized, and
scored against the raw reference text with BLEU and chrF; with two or more
systems, sacreBLEU's paired bootstrap resampling compares each with the first.
Every input is checked before anything is decoded.
"""

import argparse
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import sentencepiece
import torch
from fairseq import utils as fairseq_utils
from fairseq.data import data_utils, indexed_dataset
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest
from tqdm import tqdm

from . import raw_text, safe_checkpoints  # safe_checkpoints also lets averaging torch.load fairseq checkpoints
from .cli import GENERATE_FLAGS, UsageError, atomic_write, atomic_write_text, require_file, run_fairseq, run_tool

# As in fairseq's average_checkpoints.py: the number is the epoch, or the update with --average-updates.
CHECKPOINT_PATTERNS = {False: re.compile(r"checkpoint(\d+)\.pt"), True: re.compile(r"checkpoint_\d+_(\d+)\.pt")}
HYPOTHESIS_LINE = re.compile(r"H-(\d+)\t[^\t]*\t(.*)")
METRICS = {"bleu": BLEU, "chrf": CHRF}


def read_lines(path):
    """A UTF-8 text file's lines as sacreBLEU's command line reads them: split on newlines only, right-stripped.

    Bytes that are not UTF-8 stop the tool with one line naming the file and line.
    """
    return [line.rstrip() for line in raw_text.iter_lines(path)]


def subset_size(data, subset, source_lang=None, target_lang=None):
    """Number of sentences in a binarized translation subset, found as fairseq's translation task finds it."""
    data_dir = fairseq_utils.split_paths(str(data))[0]
    if not Path(data_dir).is_dir():
        raise UsageError(f"data directory {data_dir} does not exist")
    if source_lang is None or target_lang is None:
        source_lang, target_lang = data_utils.infer_language_pair(data_dir)
    for pair in (f"{source_lang}-{target_lang}", f"{target_lang}-{source_lang}"):
        prefix = os.path.join(data_dir, f"{subset}.{pair}.{source_lang}")
        impl = indexed_dataset.infer_dataset_impl(prefix)
        if impl is not None:
            return len(indexed_dataset.make_dataset(prefix, impl=impl))
    raise UsageError(f"no binarized subset {subset!r} for {source_lang}-{target_lang} in {data_dir}")


def last_checkpoints(directory, n, update_based=False):
    """The last ``n`` of ``checkpoint<epoch>.pt`` (or ``checkpoint_<epoch>_<update>.pt``) in ``directory``, newest first."""
    pattern = CHECKPOINT_PATTERNS[update_based]
    found = sorted(
        ((int(m.group(1)), path) for path in Path(directory).iterdir() if (m := pattern.fullmatch(path.name))),
        reverse=True,
    )
    if len(found) < n:
        kind = "checkpoint_<epoch>_<update>.pt" if update_based else "checkpoint<epoch>.pt"
        raise UsageError(f"--average-last {n}: {directory} holds {len(found)} {kind} files")
    return [path for _, path in found[:n]]


def average_checkpoints(paths):
    """fairseq's averaging: the first checkpoint's state with each parameter replaced by the mean over ``paths``.

    fp16 parameters are summed (and kept) in fp32; integer buffers are floor-divided, as fairseq does.
    """
    state, sums = None, OrderedDict()
    for path in paths:
        loaded = torch.load(path, map_location="cpu")
        if state is None:
            state = loaded
        params = loaded["model"]
        if list(params) != list(state["model"]):
            raise UsageError(f"checkpoint {path} has other parameters than {paths[0]}: they cannot be averaged")
        for key, param in params.items():
            param = param.float() if param.dtype == torch.half else param
            # clone(): a shared (tied) parameter must not be summed into twice.
            sums[key] = param.clone() if key not in sums else sums[key] + param
    for key, total in sums.items():
        sums[key] = total.div_(len(paths)) if total.is_floating_point() else total // len(paths)
    state["model"] = sums
    return state


def save_checkpoint(state, path):
    """``torch.save`` via a temporary file in the same folder and a rename."""
    atomic_write(path, lambda f: torch.save(state, f))


def restore_order(generate_output, count, what="fairseq-generate"):
    """The top hypotheses (``H-<id>`` lines) of fairseq-generate's output in sample-id order, 0..count-1.

    fairseq prints batches sorted by length; a missing id raises a one-line UsageError rather
    than scoring a subset.
    """
    found = {}
    for line in generate_output.split("\n"):
        m = HYPOTHESIS_LINE.fullmatch(line)
        if m:
            found[int(m.group(1))] = m.group(2)
    missing = [i for i in range(count) if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UsageError(
            f"{what} returned {count - len(missing)} hypotheses for {count} sentences (missing ids: {shown}); "
            f"fairseq skips inputs longer than the model's max positions"
        )
    return [found[i] for i in range(count)]


def markdown_table(rows, baseline):
    """A markdown table of systems: name, BLEU, chrF, BLEU difference and p-value against ``baseline``."""
    lines = [f"| system | BLEU | chrF | ΔBLEU vs {baseline} | p-value |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        delta = "" if row["delta_bleu"] is None else f"{row['delta_bleu']:+.2f}"
        p_value = "" if row["bleu"]["p_value"] is None else f"{row['bleu']['p_value']:.4f}"
        lines.append(f"| {row['name']} | {row['bleu']['score']:.2f} | {row['chrf']['score']:.2f} | {delta} | {p_value} |")
    return "\n".join(lines) + "\n"


def score(named_hypotheses, references, bootstrap_samples=1000):
    """BLEU and chrF per system; with two or more, paired bootstrap p-values against the first.

    Returns ``{"signatures": ..., "significance_signatures": ... or None, "systems": [...]}``.
    """
    signatures, rows = {}, [{"name": name} for name, _ in named_hypotheses]
    for key, metric_class in METRICS.items():
        metric = metric_class()
        for row, (_, hypotheses) in zip(rows, named_hypotheses):
            row[key] = {"score": metric.corpus_score(hypotheses, [references]).score, "p_value": None}
        signatures[key] = str(metric.get_signature())
    for row in rows:
        row["delta_bleu"] = None if row is rows[0] else row["bleu"]["score"] - rows[0]["bleu"]["score"]
    if len(rows) < 2:
        return {"signatures": signatures, "significance_signatures": None, "systems": rows}

    metrics = {key: metric_class() for key, metric_class in METRICS.items()}
    test_signatures, results = PairedTest(
        named_hypotheses, metrics, [references], test_type="bs", n_samples=bootstrap_samples
    )()
    # PairedTest reports each metric under the name its scores carry (BLEU, chrF2), in the order given.
    for key, metric_name in zip(metrics, (name for name in results if name != "System")):
        for row, result in zip(rows, results[metric_name]):
            # float(): sacreBLEU gives numpy scalars, which json cannot write.
            row[key].update(
                p_value=None if result.p_value is None else float(result.p_value),
                bootstrap_mean=float(result.mean), bootstrap_ci95=float(result.ci),
            )
        test_signatures[key] = str(test_signatures.pop(metric_name))
    return {"signatures": signatures, "significance_signatures": test_signatures, "systems": rows}


def _plan_systems(systems, names, average_last, average_updates):
    """Check every system path and name; a folder needs --average-last N and at least N checkpoints."""
    if names is not None and len(names) != len(systems):
        raise UsageError(f"--names gives {len(names)} names for {len(systems)} systems")
    plans = []
    for i, system in enumerate(systems):
        path, average = Path(system), None
        if path.is_dir():
            if average_last is None:
                raise UsageError(f"system {path} is a folder: give --average-last N to average its last N checkpoints")
            average = last_checkpoints(path, average_last, average_updates)
        else:
            require_file(path, "checkpoint")
        # A training killed while saving leaves a truncated file: refused here, before any decoding.
        for checkpoint in average or [path]:
            safe_checkpoints.check_checkpoint(checkpoint, "system")
        plans.append({"name": names[i] if names is not None else path.stem, "path": path, "average": average})
    taken = [plan["name"] for plan in plans]
    for name in taken:
        if taken.count(name) > 1 or not name or "/" in name or name.startswith("."):
            raise UsageError(f"system name {name!r} is repeated or not a file name: give distinct --names")
    return plans


def evaluate(data, systems, ref, out, names=None, subset="test", beam=4, lenpen=0.6, max_tokens=None,
             spm_model=None, post_process=None, average_last=None, average_updates=False,
             bootstrap_samples=1000, source_lang=None, target_lang=None, cpu=False):
    """Decode, score and compare ``systems`` on ``subset`` of ``data``; write results to ``out``; return them.

    Writes ``<name>.hyp`` (detokenized hypotheses, one per reference line), ``<name>.generate.txt``
    (fairseq-generate's output), averaged checkpoints ``<name>.avg<N>.pt``, ``results.md`` and
    ``results.json``. Returns the dictionary saved as ``results.json``.
    """
    if spm_model is not None and post_process is not None:
        raise UsageError("give --spm-model or --post-process, not both")
    if average_last is not None and average_last < 1:
        raise UsageError(f"--average-last must be at least 1, not {average_last}")
    if bootstrap_samples < 1:
        raise UsageError(f"--bootstrap-samples must be at least 1, not {bootstrap_samples}")
    count = subset_size(data, subset, source_lang, target_lang)
    references = read_lines(require_file(ref, "reference file"))
    if len(references) != count:
        raise UsageError(f"reference file {ref} has {len(references)} lines but subset {subset!r} has {count} sentences")
    if spm_model is not None:
        spm = sentencepiece.SentencePieceProcessor(model_file=str(require_file(spm_model, "sentencepiece model")))
    plans = _plan_systems(systems, names, average_last, average_updates)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)

    common = [
        data, *GENERATE_FLAGS, "--gen-subset", subset, "--beam", beam, "--lenpen", lenpen,
        "--skip-invalid-size-inputs-valid-test",
    ]
    for flag, value in (("--max-tokens", max_tokens), ("--post-process", post_process),
                        ("--source-lang", source_lang), ("--target-lang", target_lang)):
        if value is not None:
            common += [flag, value]
    common += ["--cpu"] if cpu else []
    decoding = {
        "subset": subset, "beam": beam, "lenpen": lenpen, "max_tokens": max_tokens,
        "spm_model": None if spm_model is None else str(spm_model), "post_process": post_process,
        "fairseq_generate_args": [str(arg) for arg in common],
    }

    named_hypotheses, system_info = [], []
    progress = tqdm(plans, desc="tiekd-eval", unit="system")
    for plan in progress:
        name = plan["name"]
        progress.set_postfix_str(name)
        checkpoint = plan["path"]
        if plan["average"] is not None:
            checkpoint = out / f"{name}.avg{len(plan['average'])}.pt"
            save_checkpoint(average_checkpoints(plan["average"]), checkpoint)
        output = run_fairseq("generate", [*common, "--path", checkpoint])
        atomic_write_text(out / f"{name}.generate.txt", output)
        hypotheses = restore_order(output, count, what=f"fairseq-generate on {checkpoint}")
        if spm_model is not None:
            hypotheses = [spm.decode(line.split()) for line in hypotheses]
        atomic_write_text(out / f"{name}.hyp", "".join(line + "\n" for line in hypotheses))
        named_hypotheses.append((name, hypotheses))
        system_info.append({
            "checkpoint": str(checkpoint), "hypotheses": str(out / f"{name}.hyp"),
            "averaged_from": None if plan["average"] is None else [str(p) for p in plan["average"]],
        })

    scores = score(named_hypotheses, references, bootstrap_samples)
    for row, info in zip(scores["systems"], system_info):
        row.update(info)
    results = {
        "data": str(data), "ref": str(ref), "sentences": count, "decoding": decoding,
        "baseline": plans[0]["name"], "significance_test": None if len(plans) < 2 else "paired bootstrap resampling",
        "bootstrap_samples": None if len(plans) < 2 else bootstrap_samples, **scores,
    }
    signatures = [f"- {key}: `{sig}`" for key, sig in scores["signatures"].items()]
    signatures += [f"- p-value ({key}, paired bootstrap): `{sig}`"
                   for key, sig in (scores["significance_signatures"] or {}).items()]
    report = markdown_table(scores["systems"], plans[0]["name"]) + "\n" + "\n".join(signatures) + "\n"
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "results.md", report)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tiekd-eval", description="Decode checkpoints with fairseq-generate, score them with sacreBLEU, test significance."
    )
    parser.add_argument("data", help="fairseq data-bin folder (dictionaries and the binarized subset)")
    parser.add_argument("systems", nargs="+", help="checkpoints (the first is the baseline), or folders with --average-last")
    parser.add_argument("--ref", required=True, help="raw reference text of the subset, one sentence a line")
    parser.add_argument("--out", required=True, help="folder for hypotheses, results.md and results.json")
    parser.add_argument("--names", nargs="+", help="one name per system (default: file stem)")
    parser.add_argument("--subset", default="test", help="subset to decode (default: test)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--lenpen", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: fairseq's)")
    detok = parser.add_mutually_exclusive_group()
    detok.add_argument("--spm-model", help="sentencepiece model that detokenizes the hypotheses")
    detok.add_argument("--post-process", help="fairseq's subword removal scheme (sentencepiece, subword_nmt, ...)")
    parser.add_argument("--average-last", type=int, metavar="N", help="average the last N checkpoints of a folder system")
    parser.add_argument("--average-updates", action="store_true",
                        help="average checkpoint_<epoch>_<update>.pt files instead of checkpoint<epoch>.pt")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, help="paired bootstrap resamples (default: 1000)")
    parser.add_argument("--source-lang", help="default: inferred from the data folder")
    parser.add_argument("--target-lang", help="default: inferred from the data folder")
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU even if a GPU is visible")

    def run(argv):
        args = parser.parse_args(argv)
        evaluate(
            args.data, args.systems, args.ref, args.out, names=args.names, subset=args.subset, beam=args.beam,
            lenpen=args.lenpen, max_tokens=args.max_tokens, spm_model=args.spm_model,
            post_process=args.post_process, average_last=args.average_last, average_updates=args.average_updates,
            bootstrap_samples=args.bootstrap_samples, source_lang=args.source_lang, target_lang=args.target_lang,
            cpu=args.cpu,
        )
        print(Path(args.out, "results.md").read_text(encoding="utf-8"), end="")
        print(f"tiekd-eval: results in {args.out}")

    return run_tool("tiekd-eval", run, argv)


if __name__ == "__main__":
    main()
