"""``tiekd-eval``: decode checkpoints with fairseq-generate, score them with sacreBLEU, test significance.

Each system is a checkpoint, or a checkpoint folder whose last N checkpoints are
averaged first. Hypotheses are put back in corpus order, detokenized, and scored
against the raw reference text with BLEU and chrF; with two or more systems,
sacreBLEU's paired bootstrap resampling compares each with the first. Every input
is checked before anything is decoded. With ``--tokenized-bleu``, BLEU is also
computed as most papers' tables report it (the TIE-KD paper's included): case-
sensitive on Moses-tokenized text, hyphens split (``tokenizer.perl -a``), as
multi-bleu.perl scores it; for a Romanian target also with its diacritics removed.
"""

import argparse
import json
from pathlib import Path

import sacremoses
import sentencepiece
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest
from tqdm import tqdm

from tiekd_fairseq.checkpoints import check_checkpoint
from tiekd_fairseq.data.data_bin import language_pair, subset_size

from .checkpoint_average import average_checkpoints, last_checkpoints, save_checkpoint
from .fairseq_runner import GENERATE_FLAGS, run_fairseq
from .files import atomic_write_text, require_file, write_lines
from .generate_output import generated_hypotheses, in_corpus_order
from .raw_text import read_lines
from .shell import UsageError, positive, run_tool

METRICS = {"bleu": BLEU, "chrf": CHRF}
# Tokenized BLEU columns: key in the results, column title.
TOKENIZED = {"tokenized_bleu": "tok. BLEU", "romanian_tokenized_bleu": "ro norm. tok. BLEU"}
ROMANIAN_COMMA_BELOW = str.maketrans("şţŞŢ", "șțȘȚ")
ROMANIAN_DIACRITICS = str.maketrans("șțȘȚăĂâÂîÎ", "stSTaAaAiI")


def markdown_table(rows, baseline):
    """A markdown table of systems: name, BLEU, chrF, ΔBLEU and p-value against ``baseline``, tokenized BLEUs."""
    extra = [key for key in TOKENIZED if key in rows[0]]
    lines = [f"| system | BLEU | chrF | ΔBLEU vs {baseline} | p-value |" + "".join(f" {TOKENIZED[k]} |" for k in extra),
             "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for row in rows:
        delta = "" if row["delta_bleu"] is None else f"{row['delta_bleu']:+.2f}"
        p_value = "" if row["bleu"]["p_value"] is None else f"{row['bleu']['p_value']:.4f}"
        bleu, chrf = row["bleu"]["score"], row["chrf"]["score"]
        lines.append(f"| {row['name']} | {bleu:.2f} | {chrf:.2f} | {delta} | {p_value} |"
                     + "".join(f" {row[key]['score']:.2f} |" for key in extra))
    return "\n".join(lines) + "\n"


def moses_tokenized(lines, lang, romanian=False):
    """``lines`` as the paper's convention scores them: ’ written ', then Moses-tokenized with hyphens split.

    With ``romanian``, first the comma-below letters for the cedilla ones, then no diacritics (the
    WMT16 En-Ro convention of normalise-romanian.py and remove-diacritics.py).
    Args: lines: detokenized sentences; lang: Moses language code.
    """
    tokenizer = sacremoses.MosesTokenizer(lang=lang)
    out = []
    for line in lines:
        line = line.replace("\u2019", "'")
        if romanian:
            line = line.translate(ROMANIAN_COMMA_BELOW).translate(ROMANIAN_DIACRITICS)
        out.append(tokenizer.tokenize(line, aggressive_dash_splits=True, return_str=True))
    return out


def tokenized_scores(named_hypotheses, references, lang):
    """Tokenized BLEU of each system ({key: score} per system) and the signature of each key.

    Args: named_hypotheses: [(name, hypotheses)]; references: one per hypothesis; lang: target language.
    """
    variants = {"tokenized_bleu": False}
    if lang == "ro":
        variants["romanian_tokenized_bleu"] = True
    # As multi-bleu.perl: the text is tokenized already (sacreBLEU splits on spaces only), no smoothing.
    metric = BLEU(tokenize="none", smooth_method="none", force=True)
    scores = [{} for _ in named_hypotheses]
    for key, romanian in variants.items():
        refs = moses_tokenized(references, lang, romanian)
        for row, (_, hypotheses) in zip(scores, named_hypotheses):
            row[key] = {"score": metric.corpus_score(moses_tokenized(hypotheses, lang, romanian), [refs]).score}
    moses = f"moses -a -l {lang} (sacremoses {sacremoses.__version__})"
    signatures = {key: f"{metric.get_signature()} on {moses}" + (", Romanian diacritics removed" if romanian else "")
                  for key, romanian in variants.items()}
    return scores, signatures


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
            check_checkpoint(checkpoint, "system")
        plans.append({"name": names[i] if names is not None else path.stem, "path": path, "average": average})
    taken = [plan["name"] for plan in plans]
    for name in taken:
        if taken.count(name) > 1 or not name or "/" in name or name.startswith("."):
            raise UsageError(f"system name {name!r} is repeated or not a file name: give distinct --names")
    return plans


def evaluate(data_bin, systems, ref, out, names=None, subset="test", beam=4, lenpen=0.6, max_tokens=None,
             spm_model=None, post_process=None, average_last=None, average_updates=False,
             bootstrap_samples=1000, source_lang=None, target_lang=None, cpu=False, tokenized_bleu=False):
    """Decode, score and compare ``systems`` on ``subset`` of ``data``; write results to ``out``; return them.

    ``tokenized_bleu`` adds the tokenized BLEU of each system (``moses_tokenized``) beside sacreBLEU's.

    Writes ``<name>.hyp`` (detokenized hypotheses, one per reference line), ``<name>.generate.txt``
    (fairseq-generate's output), averaged checkpoints ``<name>.avg<N>.pt``, ``results.md`` and
    ``results.json``. Returns the dictionary saved as ``results.json``.
    """
    if spm_model is not None and post_process is not None:
        raise UsageError("give --spm-model or --post-process, not both")
    positive(**{"--average-last": average_last, "--bootstrap-samples": bootstrap_samples, "--beam": beam})
    source_lang, target_lang = language_pair(data_bin, subset, source_lang, target_lang)
    count = subset_size(data_bin, subset, source_lang, target_lang)
    # As sacreBLEU's command line reads a reference file: lines right-stripped.
    references = [line.rstrip() for line in read_lines(require_file(ref, "reference file"))]
    if len(references) != count:
        raise UsageError(f"reference file {ref} has {len(references)} lines but subset {subset!r} "
                         f"has {count} sentences")
    if spm_model is not None:
        spm = sentencepiece.SentencePieceProcessor(model_file=str(require_file(spm_model, "sentencepiece model")))
    plans = _plan_systems(systems, names, average_last, average_updates)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)

    common = [
        data_bin, *GENERATE_FLAGS, "--gen-subset", subset, "--beam", beam, "--lenpen", lenpen,
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
        hypotheses = in_corpus_order(generated_hypotheses(output), range(count), f"fairseq-generate on {checkpoint}")
        if spm_model is not None:
            hypotheses = [spm.decode(line.split()) for line in hypotheses]
        write_lines(out / f"{name}.hyp", hypotheses)
        named_hypotheses.append((name, hypotheses))
        system_info.append({
            "checkpoint": str(checkpoint), "hypotheses": str(out / f"{name}.hyp"),
            "averaged_from": None if plan["average"] is None else [str(p) for p in plan["average"]],
        })

    scores = score(named_hypotheses, references, bootstrap_samples)
    for row, info in zip(scores["systems"], system_info):
        row.update(info)
    if tokenized_bleu:
        tokenized, tokenized_signatures = tokenized_scores(named_hypotheses, references, target_lang)
        for row, extra in zip(scores["systems"], tokenized):
            row.update(extra)
        scores["signatures"].update(tokenized_signatures)
    results = {
        "data_bin": str(data_bin), "ref": str(ref), "sentences": count, "decoding": decoding,
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
        prog="tiekd-eval",
        description="Decode checkpoints with fairseq-generate, score them with sacreBLEU, test significance.",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq-preprocess output holding the subset")
    parser.add_argument("systems", nargs="+",
                        help="checkpoints (the first is the baseline), or folders with --average-last")
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
    parser.add_argument("--average-last", type=int, metavar="N",
                        help="average the last N checkpoints of a folder system")
    parser.add_argument("--average-updates", action="store_true",
                        help="average checkpoint_<epoch>_<update>.pt files instead of checkpoint<epoch>.pt")
    parser.add_argument("--bootstrap-samples", type=int, default=1000,
                        help="paired bootstrap resamples (default: 1000)")
    parser.add_argument("--source-lang", help="default: inferred from the data folder")
    parser.add_argument("--target-lang", help="default: inferred from the data folder")
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU even if a GPU is visible")
    parser.add_argument("--tokenized-bleu", action="store_true",
                        help="also case-sensitive BLEU on Moses-tokenized text (tokenizer.perl -a), as papers report; "
                             "for a Romanian target also with diacritics removed")

    def run(argv):
        args = parser.parse_args(argv)
        evaluate(
            args.data_bin, args.systems, args.ref, args.out, names=args.names, subset=args.subset, beam=args.beam,
            lenpen=args.lenpen, max_tokens=args.max_tokens, spm_model=args.spm_model,
            post_process=args.post_process, average_last=args.average_last, average_updates=args.average_updates,
            bootstrap_samples=args.bootstrap_samples, source_lang=args.source_lang, target_lang=args.target_lang,
            cpu=args.cpu, tokenized_bleu=args.tokenized_bleu,
        )
        print(Path(args.out, "results.md").read_text(encoding="utf-8"), end="")
        print(f"tiekd-eval: results in {args.out}")

    return run_tool("tiekd-eval", run, argv)


if __name__ == "__main__":
    main()
