"""tiekd-analyze: the counting on hand-built tensors, then the console script on the real teacher and a student."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tiekd_cli.analyze import add_counts, main, position_stats, summarize

from conftest import data_bin_with_swapped_symbols, fairseq, kd_train_args, run

ANALYZE = Path(sys.executable).parent / "tiekd-analyze"
BINS = (0.0, 0.4, 0.7, 1.0)


def lprobs(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


# Two sentences of two positions; the last position is padding (gold 1 = pad).
TEACHER = lprobs([
    [[0.9, 0.05, 0.03, 0.02], [0.1, 0.5, 0.3, 0.1]],   # top-1 0 at p .9 (bin 2); top-1 1 at .5 (bin 1)
    [[0.35, 0.3, 0.2, 0.15], [0.05, 0.05, 0.05, 0.85]],  # top-1 0 at .35 (bin 0); padding
])
STUDENT = lprobs([
    [[0.6, 0.1, 0.25, 0.05], [0.1, 0.2, 0.6, 0.1]],  # top-2 {0, 2}: agrees; top-2 {2, 1}: disagrees, holds 1
    [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]],    # top-2 {3, 2}: disagrees, misses 0; padding
])
TARGET = torch.tensor([[0, 2], [0, 1]])
MASK = TARGET.ne(1)
COUNTS = ("top1_agree", "gold", "topk_shared", "top1_outside_topk")
PERCENTS = ("top1_agreement", "gold", "topk_overlap", "top1_outside_topk")


def test_position_stats_counts_a_case_computed_by_hand():
    counts = position_stats(TEACHER, [STUDENT, TEACHER], TARGET, MASK, BINS, k=2)
    # Bins [0, .4), [.4, .7), [.7, 1] hold the third, second and first position.
    assert counts["positions"] == [1, 1, 1] and counts["teacher_gold"] == [1, 0, 1]
    assert [{key: s[key] for key in COUNTS} for s in counts["students"]] == [
        {"top1_agree": [0, 0, 1], "gold": [0, 1, 1], "topk_shared": [0, 2, 1], "top1_outside_topk": [1, 0, 0]},
        {"top1_agree": [1, 1, 1], "gold": [1, 0, 1], "topk_shared": [2, 2, 2], "top1_outside_topk": [0, 0, 0]},
    ]
    rows = summarize(counts, BINS, 2, ["s", "self"])
    assert [r["teacher_confidence"] for r in rows] == ["all", "[0, 0.4)", "[0.4, 0.7)", "[0.7, 1]"]
    assert rows[0]["positions"] == 3 and rows[0]["teacher_gold"] == pytest.approx(200 / 3, abs=1e-3)
    assert {key: rows[0]["students"]["s"][key] for key in PERCENTS} == pytest.approx(
        {"top1_agreement": 100 / 3, "gold": 200 / 3, "topk_overlap": 50.0, "top1_outside_topk": 100 / 3}, abs=1e-3
    )
    assert rows[0]["students"]["self"] == {
        "top1_agreement": 100.0, "gold": rows[0]["teacher_gold"], "topk_overlap": 100.0, "top1_outside_topk": 0.0,
        "entropy": rows[0]["teacher_entropy"], "max_prob": rows[0]["teacher_max_prob"],
    }
    assert {key: rows[2]["students"]["s"][key] for key in PERCENTS} == {
        "top1_agreement": 0.0, "gold": 100.0, "topk_overlap": 100.0, "top1_outside_topk": 0.0
    }


def test_bin_edges_and_empty_bins():
    # p = 0.5 is an inner edge: it opens the upper bin; p = 1 falls in the last, closed bin.
    teacher = lprobs([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    counts = position_stats(teacher, [], target, target.ge(0), (0, 0.5, 1), k=1)
    assert counts["positions"] == [0, 2]
    rows = summarize(counts, (0, 0.5, 1), 1, [])
    assert rows[1]["positions"] == 0 and rows[1]["teacher_gold"] is None
    assert rows[1]["teacher_entropy"] is None and rows[1]["teacher_max_prob"] is None
    # The one-hot row has entropy 0; the other 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2.
    assert rows[2]["teacher_entropy"] == pytest.approx(0.75 * math.log(2), abs=1e-4)
    assert rows[2]["teacher_max_prob"] == 0.75


# Two sentences of three positions, the third of the first masked out; zeros make -inf log-probabilities.
# The teacher's top-1 probabilities put position (0, 0) and (1, 0) in bin [.7, 1], (0, 1) and (1, 1) in
# [.4, .7), (1, 2) in [0, .4). The masked position would pull the means of [.7, 1] if it counted.
TEACHER_PROBS = [
    [[0.8, 0.2, 0.0, 0.0], [0.5, 0.3, 0.2, 0.0], [0.97, 0.01, 0.01, 0.01]],
    [[0.9, 0.1, 0.0, 0.0], [0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]],
]
STUDENT_PROBS = [
    [[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]],
    [[0.4, 0.4, 0.2, 0.0], [0.7, 0.1, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]],
]
MASKED = torch.tensor([[True, True, False], [True, True, True]])


def plain_means(teacher_probs, student_probs):
    """Over the kept positions, then those of each bin: mean entropy and top-1 p of the teacher, then the student."""
    groups = [[] for _ in BINS]  # "all", then one per bin
    for sentences in zip(teacher_probs, student_probs, MASKED.tolist()):
        for teacher_row, student_row, kept in zip(*sentences):
            if kept:
                # The bin is the number of inner edges at or below the teacher's top-1 p.
                index = 1 + sum(max(teacher_row) >= edge for edge in BINS[1:-1])
                for group in (groups[0], groups[index]):
                    group.append((teacher_row, student_row))
    means = []
    for group in groups:
        for side in range(2):
            rows = [pair[side] for pair in group]
            means.append(sum(-sum(p * math.log(p) for p in row if p > 0) for row in rows) / len(rows))
            means.append(sum(max(row) for row in rows) / len(rows))
    return means


def mean_columns(rows):
    """The teacher's entropy and top-1 p, then student s's, for every row of ``summarize``, in one list."""
    return [value for r in rows for value in (r["teacher_entropy"], r["teacher_max_prob"],
                                              r["students"]["s"]["entropy"], r["students"]["s"]["max_prob"])]


def test_entropy_and_max_prob_per_bin_match_a_plain_computation():
    target = torch.zeros(2, 3, dtype=torch.long)
    counts = position_stats(lprobs(TEACHER_PROBS), [lprobs(STUDENT_PROBS)], target, MASKED, BINS, k=2)
    rows = summarize(counts, BINS, 2, ["s"])
    assert [r["positions"] for r in rows] == [5, 1, 2, 2]
    assert mean_columns(rows) == pytest.approx(plain_means(TEACHER_PROBS, STUDENT_PROBS), abs=1e-4)


def test_counts_of_batches_add_up_to_the_counts_of_the_whole():
    teacher, student = lprobs(TEACHER_PROBS), lprobs(STUDENT_PROBS)
    target = torch.tensor([[0, 1, 2], [2, 0, 1]])

    def stats(sentences):
        return position_stats(teacher[sentences], [student[sentences]], target[sentences], MASKED[sentences],
                              BINS, k=3)

    # Bins [.4, .7) and [.7, 1] hold a position of each sentence: their sums are made of both batches.
    whole, summed = stats(slice(0, 2)), add_counts(stats(slice(0, 1)), stats(slice(1, 2)))
    assert [summed[key] for key in ("positions", "teacher_gold")] == [whole["positions"], whole["teacher_gold"]]
    assert [summed["students"][0][key] for key in COUNTS] == [whole["students"][0][key] for key in COUNTS]
    assert mean_columns(summarize(summed, BINS, 3, ["s"])) == pytest.approx(
        mean_columns(summarize(whole, BINS, 3, ["s"])), abs=1e-4
    )


@pytest.fixture(scope="module")
def student(corpus, teacher, tmp_path_factory):
    """A tie_kd student after a few updates: far from the teacher."""
    save_dir = tmp_path_factory.mktemp("analysis_student")
    fairseq("fairseq-train", *kd_train_args(corpus.data_bin, teacher, save_dir, "--max-update", "4",
                                            "--disable-validation", "--kd-iterations", "1"))
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def analysis(corpus, teacher, student, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    proc = run([ANALYZE, "--data-bin", corpus.data_bin, "--teacher", teacher, "--students", teacher, student,
                "--names", "self", "tiny", "--kd-topk", "5", "--cpu", "--max-tokens", "1000", "--out", out])
    return json.loads((out / "analysis.json").read_text()), proc, out


def test_teacher_against_itself_agrees_everywhere(analysis):
    report, _, _ = analysis
    for row in report["results"]:
        if row["positions"]:
            assert row["students"]["self"] == {
                "top1_agreement": 100.0, "gold": row["teacher_gold"], "topk_overlap": 100.0, "top1_outside_topk": 0.0,
                "entropy": row["teacher_entropy"], "max_prob": row["teacher_max_prob"],
            }
    assert 0 < report["results"][0]["teacher_gold"] < 100
    # A bin's mean top-1 probability lies within its edges.
    for row, low, high in zip(report["results"][1:], BINS, BINS[1:]):
        if row["positions"]:
            assert low <= row["teacher_max_prob"] <= high and row["teacher_entropy"] > 0


def test_a_barely_trained_student_disagrees_with_the_teacher(analysis):
    report, _, _ = analysis
    tiny = report["results"][0]["students"]["tiny"]
    assert tiny["top1_agreement"] < 100 and tiny["topk_overlap"] < 100 and tiny["top1_outside_topk"] > 0


def test_bins_cover_every_non_padding_target_position(analysis, corpus):
    report, _, _ = analysis
    # Every sentencepiece piece is one token, plus the end-of-sentence token.
    lines = (corpus.root / "sp.valid.de").read_text().splitlines()
    positions = sum(len(line.split()) + 1 for line in lines)
    assert sum(report["counts"]["positions"]) == report["results"][0]["positions"] == positions
    assert [r["positions"] for r in report["results"][1:]] == report["counts"]["positions"]
    assert [r["teacher_confidence"] for r in report["results"]] == ["all", "[0, 0.4)", "[0.4, 0.7)", "[0.7, 1]"]


def test_the_table_is_printed_and_written(analysis):
    report, proc, out = analysis
    table = (out / "analysis.md").read_text()
    assert table in proc.stdout
    assert len(table.splitlines()) == 2 + 2 * 4 and "top-5 overlap" in table
    assert table.splitlines()[0].endswith("| teacher H | student H | teacher max p | student max p |")
    everything = report["results"][0]
    means = [everything["teacher_entropy"], everything["students"]["tiny"]["entropy"],
             everything["teacher_max_prob"], everything["students"]["tiny"]["max_prob"]]
    tiny = next(line for line in table.splitlines() if line.startswith("| tiny | all |"))
    assert tiny.startswith(f"| tiny | all | {everything['positions']} |")
    assert tiny.endswith(" | ".join(f"{value:.3f}" for value in means) + " |")
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "analysis.md"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_positions_and_full_self_agreement(analysis, corpus, teacher, tmp_path):
    report, _, _ = analysis
    run([ANALYZE, "--data-bin", corpus.data_bin, "--teacher", teacher, "--students", teacher, "--out", tmp_path])
    cuda = json.loads((tmp_path / "analysis.json").read_text())
    assert cuda["counts"]["positions"] == report["counts"]["positions"]
    assert cuda["results"][0]["students"][str(teacher)]["top1_agreement"] == 100.0


def test_bad_input_exits_2_with_one_line_from_the_console_script(corpus, tmp_path):
    missing = tmp_path / "missing.pt"
    proc = run([ANALYZE, "--data-bin", corpus.data_bin, "--teacher", missing, "--students", missing,
                "--out", tmp_path / "out"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"tiekd-analyze: error: teacher checkpoint {missing} does not exist"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--bins", "0,0.7,0.4,1"], "--bins 0,0.7,0.4,1: need strictly increasing edges from 0 to 1"),
    (["--bins", "0.1,1"], "--bins 0.1,1: need strictly increasing edges from 0 to 1"),
    (["--bins", "0,a,1"], "--bins 0,a,1: not a comma-separated list of numbers"),
    (["--kd-topk", "0"], "--kd-topk must be at least 1, not 0"),
    (["--kd-topk", "5000"], "--kd-topk 5000 exceeds the target vocabulary"),
    (["--subset", "dev"], "has no subset 'dev'"),
    (["--max-tokens", "10"], "--max-tokens 10 is below the longest sentence of valid"),
    (["--names", "a", "b"], "--names needs 1 distinct names, one per student, got 2"),
    (["--students", "{missing}"], "student checkpoint {missing} does not exist"),
])
def test_bad_input_is_one_line_before_any_model_loads(flags, message, corpus, teacher, tmp_path, capsys, monkeypatch):
    import tiekd_cli.analyze as analysis

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(analysis, "load_frozen_model", no_loading)
    missing = str(tmp_path / "missing.pt")
    flags = [f.format(missing=missing) for f in flags]
    args = ["--data-bin", str(corpus.data_bin), "--teacher", str(teacher), "--students", str(teacher),
            "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tiekd-analyze: error: ")
    assert message.format(missing=missing) in err


def test_a_data_bin_with_other_dictionaries_is_refused_in_one_line(corpus, teacher, tmp_path):
    data = tmp_path / "bin"
    data_bin_with_swapped_symbols(corpus.data_bin, data)
    proc = run([ANALYZE, "--data-bin", data, "--teacher", teacher, "--students", teacher, "--cpu",
                "--out", tmp_path / "out"], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith("tiekd-analyze: error: teacher source dictionary ")
    assert "differs from the task's: first difference at index 14" in last
