"""compare_seeds.py on a tiny budget: the margin picked on the valid split, per-seed runs, the table's statistics,
a rerun that trains nothing, and bad arguments refused in one line."""

import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run

sys.path.insert(0, str(REPO / "examples" / "demo"))
from compare_seeds import main, markdown_report, over_seeds, pick_margin, system_args  # noqa: E402

SYSTEMS = ["word_kd", "tie_kd_log"]
GRID = (0.5, 2.0)
SEEDS = (1, 2)


def _args(out):
    return ["--out", str(out), "--seeds", "2", "--systems", ",".join(SYSTEMS), "--margin-grid", "0.5,2",
            "--updates", "10", "--train-pairs", "1500", "--valid-pairs", "20", "--test-pairs", "20",
            "--bootstrap-samples", "100", "--jobs", "2"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The tiny comparison run, then run again: its out folder, what each run printed, how long the rerun took,
    and the training logs' sizes and the tables after the first run."""
    out = tmp_path_factory.mktemp("seeds") / "out"
    cmd = [sys.executable, "examples/demo/compare_seeds.py", *_args(out)]
    first = run(cmd, cwd=REPO).stdout
    logs = {path: path.stat().st_size for path in (out / "runs").glob("*/train.log")}
    tables = {name: (out / name).read_text() for name in ("results.md", "results.json")}
    start = time.monotonic()
    second = run(cmd, cwd=REPO).stdout
    return SimpleNamespace(out=out, first=first, second=second, rerun_seconds=time.monotonic() - start,
                           logs=logs, tables=tables)


def _json(path):
    return json.loads(Path(path).read_text())


def _config(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["cfg"]


def _mean_and_sample_sd(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _row(report, name):
    """The cells of the table row of ``name`` in results.md."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_the_table_holds_each_systems_mean_and_sample_sd_over_seeds_and_p_values_against_the_same_seeds_word_kd(
        comparison):
    out = comparison.out
    evals = {seed: _json(out / "eval" / f"seed-{seed}" / "results.json") for seed in SEEDS}
    analyses = {seed: _json(out / "analysis" / f"seed-{seed}" / "analysis.json")["results"][0] for seed in SEEDS}
    table, report = _json(out / "results.json"), (out / "results.md").read_text()
    assert [row["name"] for row in table["systems"]] == SYSTEMS
    for seed in SEEDS:
        assert evals[seed]["baseline"] == "word_kd" and evals[seed]["bootstrap_samples"] == 100
        assert analyses[seed]["teacher_confidence"] == "all"
    chrf_differs = False
    for row in table["systems"]:
        name = row["name"]
        scored = {seed: next(s for s in evals[seed]["systems"] if s["name"] == name) for seed in SEEDS}
        cells = _row(report, name)
        for column, metric in enumerate(("bleu", "chrf")):
            per_seed = [scored[seed][metric]["score"] for seed in SEEDS]
            mean, sd = _mean_and_sample_sd(per_seed)
            assert row[metric]["per_seed"] == per_seed
            assert row[metric]["mean"] == pytest.approx(mean) and row[metric]["sd"] == pytest.approx(sd)
            assert cells[2 * column: 2 * column + 2] == [f"{mean:.2f}", f"{sd:.2f}"]
        chrf_differs |= scored[1]["chrf"]["score"] != scored[2]["chrf"]["score"]
        assert cells[4] == " / ".join(f"{scored[seed]['bleu']['score']:.2f}" for seed in SEEDS)
        p_values = [scored[seed]["bleu"]["p_value"] for seed in SEEDS]
        if name == "word_kd":
            assert row["p_value_vs_word_kd"] is None and cells[5] == "-"
        else:
            assert row["p_value_vs_word_kd"] == p_values and None not in p_values
            assert cells[5] == " / ".join(f"{p:.4f}" for p in p_values)
        for key, column in (("top1_agreement", 6), ("entropy", 7), ("max_prob", 8)):
            mean = sum(analyses[seed]["students"][name][key] for seed in SEEDS) / len(SEEDS)
            assert row[key] == pytest.approx(mean)
            assert cells[column] == f"{mean:.{2 if column == 6 else 3}f}"
    # Seeds that scored alike would let a wrong standard deviation pass.
    assert chrf_differs
    teacher = _row(report, "teacher")
    assert teacher[-2:] == [f"{sum(analyses[seed][f'teacher_{key}'] for seed in SEEDS) / len(SEEDS):.3f}"
                            for key in ("entropy", "max_prob")]
    assert f"- bleu: `{evals[1]['signatures']['bleu']}`" in report and "bs:100|" in report
    command = shlex.join(["python", "examples/demo/compare_seeds.py", *_args(out)])
    assert f"Command: `{command}`" in report and table["command"] == command


def test_the_margin_is_the_best_valid_bleu_of_the_grid_and_its_seed_1_run_is_the_comparisons(comparison):
    out = comparison.out
    record = _json(out / "margin.json")
    valid = {}
    for m in GRID:
        results = _json(out / "valid" / f"m{m!r}" / "results.json")
        assert results["decoding"]["subset"] == "valid" and results["ref"] == str(out / "data" / "valid.de")
        valid[m] = results["systems"][0]["bleu"]["score"]
    assert {c["margin"]: c["valid_bleu"] for c in record["candidates"]} == valid
    best = max(valid.values())
    chosen = min(m for m, bleu in valid.items() if bleu == best)
    assert record["chosen"] == chosen
    assert _json(out / "results.json")["margin"]["rank_margin"] == chosen

    for seed in SEEDS:
        log_ranked = next(s for s in _json(out / "eval" / f"seed-{seed}" / "results.json")["systems"]
                          if s["name"] == "tie_kd_log")
        checkpoint = Path(log_ranked["checkpoint"])
        if seed == 1:  # the grid's run, not trained again
            assert checkpoint.parent == out / "runs" / f"tie_kd_log-m{chosen!r}-seed1"
        criterion = _config(checkpoint)["criterion"]
        assert (criterion["rank_space"], criterion["rank_margin"]) == ("logprob", chosen)
    assert not (out / "runs" / "tie_kd_log-seed1").exists()


def test_each_seeds_runs_train_with_that_seed_and_differ(comparison):
    out = comparison.out
    for name in SYSTEMS:
        checkpoints = [Path(next(s for s in _json(out / "eval" / f"seed-{seed}" / "results.json")["systems"]
                                 if s["name"] == name)["checkpoint"]) for seed in SEEDS]
        for seed, checkpoint in zip(SEEDS, checkpoints):
            assert _config(checkpoint)["common"]["seed"] == seed
        weights = [torch.load(c, map_location="cpu", weights_only=True)["model"] for c in checkpoints]
        assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0]), name


def test_runs_are_reported_as_they_start_and_end_and_a_rerun_trains_nothing_and_writes_the_same_table(comparison):
    out, first, second = comparison.out, comparison.first, comparison.second
    runs = [f"tie_kd_log-m{m!r}-seed1" for m in GRID] + [f"word_kd-seed{s}" for s in SEEDS] + ["tie_kd_log-seed2"]
    # data, 2 grid runs, 2 valid evaluations, the pick, 3 more runs, 2 evaluations, 2 analyses.
    for name in runs:
        assert re.search(rf"^\[\d+/13\] {re.escape(name)}$", first, re.M), first
        assert re.search(rf"^\[\d+/13\] {re.escape(name)}: finished in \d+\.\d min$", first, re.M), first
        assert re.search(rf"^\[\d+/13\] {re.escape(name)}: done before, skipped$", second, re.M), second
        assert re.search(rf"^\| {re.escape(name)} \| \d+\.\d \|$", comparison.tables["results.md"], re.M)
    assert "finished in" not in second
    assert comparison.logs and {path: path.stat().st_size for path in comparison.logs} == comparison.logs
    assert comparison.rerun_seconds < 30
    assert {name: (out / name).read_text() for name in comparison.tables} == comparison.tables


def _flags(args):
    """fairseq-train arguments as {flag: value} (the value as a string)."""
    args = [str(a) for a in args]
    return {flag: args[i + 1] for i, flag in enumerate(args) if flag.startswith("--") and i + 1 < len(args)
            and not args[i + 1].startswith("--")}


@pytest.mark.parametrize("system, criterion, iterations, rank_space", [
    ("ce", "label_smoothed_cross_entropy", None, None), ("word_kd", "word_kd", None, None),
    ("tie_kd_n1", "tie_kd", "1", "prob"), ("tie_kd_n3", "tie_kd", "3", "prob"),
    ("tie_kd_log", "tie_kd", "1", "logprob"),
])
def test_every_system_is_the_demos_student_with_its_seed_and_its_loss(system, criterion, iterations, rank_space):
    flags = _flags(system_args(system, 3, "teacher.pt", margin=0.75))
    assert (flags["--criterion"], flags.get("--kd-iterations"), flags.get("--rank-space")) == (
        criterion, iterations, rank_space)
    assert flags.get("--rank-margin") == ("0.75" if system == "tie_kd_log" else None)
    assert flags["--seed"] == "3" and flags["--max-tokens"] == "2048" and flags["--encoder-embed-dim"] == "128"
    assert flags["--task"] == ("translation" if system == "ce" else "translation_kd")
    if system != "ce":
        assert (flags["--teacher"], flags["--kd-alpha"]) == ("teacher.pt", "0.5")
    assert flags.get("--kd-topk") == ("5" if criterion == "tie_kd" else None)


def _scored(name, bleu, chrf, p_value):
    return {"name": name, "bleu": {"score": bleu, "p_value": p_value}, "chrf": {"score": chrf, "p_value": p_value}}


def test_three_seeds_of_known_scores_give_their_means_sample_sds_and_each_seeds_p_values():
    # Per seed: (BLEU, chrF, p-value against that seed's word_kd) of ce; word_kd's own scores.
    ce = [(10.0, 40.0, 0.01), (13.0, 41.0, 0.2), (19.0, 45.0, 0.03)]
    word_kd = [(12.0, 42.0), (13.0, 42.0), (14.0, 44.0)]
    evals = [{"systems": [_scored("word_kd", wb, wc, None), _scored("ce", b, c, p)]}
             for (b, c, p), (wb, wc) in zip(ce, word_kd)]
    analyses = [{"teacher_entropy": 2.0 + i, "teacher_max_prob": 0.5 + i / 10,
                 "students": {name: {"top1_agreement": 60.0 + i + (name == "ce"), "entropy": 3.0 * (i + 1),
                                     "max_prob": 0.1 * (i + 1)} for name in ("ce", "word_kd")}}
                for i in range(3)]
    results = over_seeds(["ce", "word_kd"], evals, analyses)
    row = results["systems"][0]
    assert row["name"] == "ce" and row["bleu"]["per_seed"] == [10.0, 13.0, 19.0]
    # (10 + 13 + 19) / 3 = 14; squared deviations 16 + 1 + 25 = 42 over n - 1 = 2.
    assert row["bleu"]["mean"] == pytest.approx(14.0) and row["bleu"]["sd"] == pytest.approx(math.sqrt(21))
    # 42; squared deviations 4 + 1 + 9 = 14 over 2.
    assert row["chrf"]["mean"] == pytest.approx(42.0) and row["chrf"]["sd"] == pytest.approx(math.sqrt(7))
    assert row["p_value_vs_word_kd"] == [0.01, 0.2, 0.03]
    assert (row["top1_agreement"], row["entropy"], row["max_prob"]) == pytest.approx((62.0, 6.0, 0.2))
    assert results["systems"][1]["p_value_vs_word_kd"] is None
    assert results["systems"][1]["bleu"]["sd"] == pytest.approx(1.0)  # 12, 13, 14
    assert results["teacher"] == pytest.approx({"entropy": 3.0, "max_prob": 0.6})

    report = markdown_report({
        **results, "seeds": [1, 2, 3], "test_segments": 3, "bootstrap_samples": 10, "command": "python x",
        "updates": 5, "margin": None, "signatures": {"bleu": "sig"}, "significance_signatures": None,
        "minutes": {"ce-seed1": 1.0}})
    assert _row(report, "ce") == ["14.00", f"{math.sqrt(21):.2f}", "42.00", f"{math.sqrt(7):.2f}",
                                  "10.00 / 13.00 / 19.00", "0.0100 / 0.2000 / 0.0300", "62.00", "6.000", "0.200"]
    assert _row(report, "word_kd")[5] == "-"
    assert _row(report, "teacher") == ["-"] * 7 + ["3.000", "0.600"]


def test_one_seed_has_no_standard_deviation():
    results = over_seeds(["ce"], [{"systems": [_scored("ce", 7.0, 30.0, None)]}],
                         [{"teacher_entropy": 1.0, "teacher_max_prob": 0.9,
                           "students": {"ce": {"top1_agreement": 50.0, "entropy": 2.0, "max_prob": 0.4}}}])
    row = results["systems"][0]
    assert (row["bleu"]["mean"], row["bleu"]["sd"], row["p_value_vs_word_kd"]) == (7.0, None, None)


@pytest.mark.parametrize("valid_bleu, chosen", [
    ([(0.5, 3.0), (1.0, 4.5), (2.0, 4.5)], 1.0),  # a tie at the top: the smaller margin
    ([(2.0, 5.0), (0.5, 1.0)], 2.0),  # the best, not the first or the smallest
    ([(1.0, 2.0), (0.5, 2.0)], 0.5),
])
def test_the_margin_is_the_best_valid_bleu_and_on_a_tie_the_smaller(valid_bleu, chosen):
    assert pick_margin(valid_bleu) == chosen


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be at least 1, not 0"),
    (["--systems", "ce,bogus"], "--systems ce,bogus: need distinct names among"),
    (["--systems", "ce,tie_kd_n1"], "word_kd is needed"),
    (["--margin-grid", "1,x"], "--margin-grid 1,x: not a comma-separated list"),
    (["--rank-margin", "1", "--margin-grid", "1,2"], "not allowed with argument"),
    (["--systems", "ce,word_kd", "--rank-margin", "1"], "which --systems leaves out"),
    (["--jobs", "two"], "invalid int value: 'two'"),
])
def test_a_bad_argument_is_one_line_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--out", out, *args])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("compare_seeds.py: error: ")
    assert message in captured.err
    assert not out.exists()

