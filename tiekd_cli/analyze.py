"""``tiekd-analyze``: how far students follow the teacher's top-1, under teacher forcing on the gold prefix.

Over the non-padding target positions of a subset, every model decodes the gold
prefix; the tool counts top-1 agreement with the teacher, top-1 = gold for the
teacher and each student, and top-k overlap, and averages each model's entropy and
top-1 probability, overall and by the teacher's top-1 probability. ``position_stats``
and ``summarize`` are pure torch/Python: counts from batches add up exactly, float64
sums up to rounding, and percentages and means are taken once, at the end.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from fairseq import utils
from tqdm import tqdm

from tiekd_fairseq.data.data_bin import translation_task
from tiekd_fairseq.frozen_model import load_frozen_model

from .files import atomic_write_text, require_file
from .shell import UsageError, positive, run_tool

DEFAULT_BINS = (0.0, 0.4, 0.7, 1.0)


def position_stats(teacher_lprobs, student_lprobs_list, target, mask, bins, k):
    """Counts and sums over the positions where ``mask`` is true, per teacher-confidence bin.

    ``teacher_lprobs`` and each student's are (..., V) log-probabilities over the
    same positions as ``target`` and ``mask`` (...). Bin i holds the positions whose
    teacher top-1 probability is in [bins[i], bins[i+1]); the last bin includes
    bins[-1]. Every value is a list, one per bin (see ``add_counts``): ints for the
    counts, float64 sums for the entropies (nats) and top-1 probabilities.
    """
    teacher = teacher_lprobs[mask]
    gold = target[mask]
    # Every top-1 is the first of a top-k, so ties break the same way for all models.
    top_lprobs, teacher_topk = teacher.topk(k, dim=-1)
    teacher_top1 = teacher_topk[:, 0]
    teacher_max_prob = top_lprobs[:, 0].double().exp()
    # right=True puts a probability equal to an inner edge in the bin that starts there.
    inner_edges = torch.tensor(bins[1:-1], dtype=torch.float64, device=teacher.device)
    bin_index = torch.bucketize(teacher_max_prob, inner_edges, right=True)

    def per_bin(values, dtype=torch.long):
        totals = torch.zeros(len(bins) - 1, dtype=dtype, device=teacher.device)
        return totals.index_add_(0, bin_index, values.to(dtype)).tolist()

    students = []
    for student_lprobs in student_lprobs_list:
        student = student_lprobs[mask]
        student_top_lprobs, student_topk = student.topk(k, dim=-1)
        # Top-k ids are distinct within a row, so this counts the intersection.
        shared = teacher_topk.unsqueeze(-1).eq(student_topk.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
        students.append({
            "top1_agree": per_bin(student_topk[:, 0].eq(teacher_top1)),
            "gold": per_bin(student_topk[:, 0].eq(gold)),
            "topk_shared": per_bin(shared),
            "top1_outside_topk": per_bin(~student_topk.eq(teacher_top1.unsqueeze(-1)).any(dim=-1)),
            "entropy": per_bin(entropy(student), torch.float64),
            "max_prob": per_bin(student_top_lprobs[:, 0].double().exp(), torch.float64),
        })
    return {
        "positions": per_bin(torch.ones_like(gold)),
        "teacher_gold": per_bin(teacher_top1.eq(gold)),
        "teacher_entropy": per_bin(entropy(teacher), torch.float64),
        "teacher_max_prob": per_bin(teacher_max_prob, torch.float64),
        "students": students,
    }


def entropy(lprobs):
    """The entropy in nats of each row of (N, V) log-probabilities, computed in float64: (N,)."""
    lprobs = lprobs.double()
    # A token of probability 0 has log-probability -inf: its term is 0, not 0 * -inf = NaN.
    return -torch.where(lprobs > -math.inf, lprobs.exp() * lprobs, 0).sum(dim=-1)


def add_counts(a, b):
    """The element-wise sum of two results of ``position_stats`` (same bins, same students)."""
    if isinstance(a, dict):
        return {key: add_counts(a[key], b[key]) for key in a}
    if isinstance(a, list):
        return [add_counts(x, y) for x, y in zip(a, b)]
    return a + b


def summarize(counts, bins, k, names):
    """Percentages and means for all positions, then for each bin; None where a bin holds no position."""

    def row(label, select):
        positions = select(counts["positions"])

        def percent(part, whole=positions):
            return round(100 * part / whole, 4) if whole else None

        def mean(total):
            return round(total / positions, 4) if positions else None

        return {
            "teacher_confidence": label,
            "positions": positions,
            "teacher_gold": percent(select(counts["teacher_gold"])),
            "teacher_entropy": mean(select(counts["teacher_entropy"])),
            "teacher_max_prob": mean(select(counts["teacher_max_prob"])),
            "students": {
                name: {
                    "top1_agreement": percent(select(s["top1_agree"])),
                    "gold": percent(select(s["gold"])),
                    "topk_overlap": percent(select(s["topk_shared"]), positions * k),
                    "top1_outside_topk": percent(select(s["top1_outside_topk"])),
                    "entropy": mean(select(s["entropy"])),
                    "max_prob": mean(select(s["max_prob"])),
                }
                for name, s in zip(names, counts["students"])
            },
        }

    return [row("all", sum)] + [
        row(bin_label(bins, i), lambda values, i=i: values[i]) for i in range(len(bins) - 1)
    ]


def bin_label(bins, i):
    closing = "]" if i == len(bins) - 2 else ")"
    return f"[{bins[i]:g}, {bins[i + 1]:g}{closing}"


def markdown_table(rows, k):
    """One line per student and confidence row: percentages of that row's positions, then mean entropies and top-1 p."""
    lines = [
        f"| student | teacher top-1 p | positions | teacher = gold % | student = gold % | top-1 agreement % "
        f"| top-{k} overlap % | teacher top-1 outside student top-{k} % "
        "| teacher H | student H | teacher max p | student max p |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in rows[0]["students"]:
        for r in rows:
            s = r["students"][name]
            percents = [r["teacher_gold"], s["gold"], s["top1_agreement"], s["topk_overlap"], s["top1_outside_topk"]]
            means = [r["teacher_entropy"], s["entropy"], r["teacher_max_prob"], s["max_prob"]]
            numbers = " | ".join(["-" if v is None else f"{v:.2f}" for v in percents]
                                 + ["-" if v is None else f"{v:.3f}" for v in means])
            lines.append(f"| {name} | {r['teacher_confidence']} | {r['positions']} | {numbers} |")
    return "\n".join(lines) + "\n"


def parse_bins(text):
    """'0,0.4,0.7,1' -> (0.0, 0.4, 0.7, 1.0): increasing edges from 0 to 1, so every position has a bin."""
    try:
        bins = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--bins {text}: not a comma-separated list of numbers") from None
    if len(bins) < 2 or bins[0] != 0 or bins[-1] != 1 or any(a >= b for a, b in zip(bins, bins[1:])):
        raise UsageError(f"--bins {text}: need strictly increasing edges from 0 to 1, such as 0,0.4,0.7,1")
    return bins


def analyze(data_bin, teacher, students, names=None, subset="valid", bins=DEFAULT_BINS, k=5,
            max_tokens=4096, cpu=False, out=None):
    """Score the students against the teacher on ``subset``; write analysis.json/.md to ``out``; return the report.

    ``bins`` as ``parse_bins`` returns them. Bad input raises UsageError before any model is loaded.
    """
    names = list(names) if names else [str(s) for s in students]
    if len(names) != len(students) or len(set(names)) != len(names):
        raise UsageError(f"--names needs {len(students)} distinct names, one per student, got {len(names)}: {names}")
    positive(**{"--kd-topk": k, "--max-tokens": max_tokens})
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    require_file(teacher, "teacher checkpoint")
    for path in students:
        require_file(path, "student checkpoint")
    task = translation_task(data_bin, subset)
    dataset = task.dataset(subset)
    if k > len(task.tgt_dict):
        raise UsageError(f"--kd-topk {k} exceeds the target vocabulary ({len(task.tgt_dict)} symbols)")
    longest = int(max(dataset.src_sizes.max(), dataset.tgt_sizes.max()))
    if max_tokens < longest:
        raise UsageError(f"--max-tokens {max_tokens} is below the longest sentence of {subset} ({longest} tokens)")

    models = [load_frozen_model(str(teacher), task)]
    models += [load_frozen_model(str(path), task, role=f"student {name}") for name, path in zip(names, students)]
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    for frozen in models:
        frozen.model.to(device)
    batches = task.get_batch_iterator(
        dataset, max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), *(m.model.max_positions() for m in models)),
    ).next_epoch_itr(shuffle=False)
    counts = None
    for sample in tqdm(batches, total=len(batches), desc=f"tiekd-analyze {subset}", unit="batch"):
        sample = utils.apply_to_sample(lambda t: t.to(device), sample)
        net_input, target = sample["net_input"], sample["target"]
        lprobs = [frozen.gold_prefix_lprobs(net_input) for frozen in models]
        batch = position_stats(lprobs[0], lprobs[1:], target, target.ne(task.tgt_dict.pad()), bins, k)
        counts = batch if counts is None else add_counts(counts, batch)

    rows = summarize(counts, bins, k, names)
    report = {
        "data_bin": str(data_bin), "subset": subset, "teacher": str(teacher),
        "students": [{"name": n, "path": str(p)} for n, p in zip(names, students)],
        "bins": list(bins), "topk": k, "results": rows, "counts": counts,
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "analysis.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(Path(out) / "analysis.md", markdown_table(rows, k))
    return report


def main(argv=None):
    return run_tool("tiekd-analyze", _main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="tiekd-analyze",
        description="Top-1 agreement, gold overlap and top-k overlap of students with a teacher, "
        "and each model's mean entropy and top-1 probability, by teacher confidence, "
        "under teacher forcing on the gold prefix.",
    )
    parser.add_argument("--data-bin", required=True, help="fairseq-preprocess output the models were trained on")
    parser.add_argument("--subset", default="valid", help="subset to score (default: valid)")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--students", required=True, nargs="+", help="student checkpoints")
    parser.add_argument("--names", nargs="+", help="one name per student (default: the paths)")
    default_bins = ",".join(f"{b:g}" for b in DEFAULT_BINS)
    parser.add_argument("--bins", default=default_bins, help="edges of the teacher top-1 probability bins; "
                        f"the last bin includes 1 (default: {default_bins})")
    parser.add_argument("--kd-topk", type=int, default=5, help="k of the top-k overlap (default: 5)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default: 4096)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--out", required=True, help="directory for analysis.json and analysis.md")
    args = parser.parse_args(argv)
    report = analyze(
        args.data_bin, args.teacher, args.students, names=args.names, subset=args.subset,
        bins=parse_bins(args.bins), k=args.kd_topk, max_tokens=args.max_tokens, cpu=args.cpu, out=args.out,
    )
    print(markdown_table(report["results"], report["topk"]), end="")
