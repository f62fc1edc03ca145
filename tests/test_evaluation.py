"""tiekd-eval through its console script on the test split, its pure functions, averaging and bad input."""

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece
import torch
from sacrebleu.metrics import BLEU, CHRF

from tiekd_cli.checkpoint_average import average_checkpoints, last_checkpoints
from tiekd_cli.eval import main, markdown_table
from tiekd_cli.generate_output import generated_hypotheses, in_corpus_order
from tiekd_cli.shell import UsageError

from conftest import BIN, run

TOOL = BIN / "tiekd-eval"


def lines_of(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def noisy_folder(teacher, tmp_path_factory):
    """A training folder: checkpoint1..3.pt are the teacher with independent noise, plus a checkpoint_last.pt."""
    folder = tmp_path_factory.mktemp("noisy")
    state = torch.load(teacher, map_location="cpu")
    generator = torch.Generator().manual_seed(0)
    for epoch in (1, 2, 3):
        model = {key: value + 0.02 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                 else value for key, value in state["model"].items()}
        torch.save({**state, "model": model}, folder / f"checkpoint{epoch}.pt")
    shutil.copy(teacher, folder / "checkpoint_last.pt")
    return folder


@pytest.fixture(scope="module")
def evaluated(corpus, teacher, noisy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    proc = run([TOOL, "--data-bin", corpus.data_bin, teacher, noisy_folder, "--average-last", "2",
                "--names", "teacher", "noisy", "--ref", corpus.root / "raw.test.de", "--out", out,
                "--spm-model", corpus.root / "spm.model", "--cpu"])
    return SimpleNamespace(out=out, proc=proc, results=json.loads((out / "results.json").read_text()))


def test_scores_are_sacrebleu_on_the_written_hypotheses(evaluated, corpus, teacher):
    refs = lines_of(corpus.root / "raw.test.de")
    results = evaluated.results
    assert results["sentences"] == len(refs) == 100
    assert results["decoding"]["beam"] == 4 and results["decoding"]["lenpen"] == 0.6
    assert [s["name"] for s in results["systems"]] == ["teacher", "noisy"]
    assert results["systems"][0]["checkpoint"] == str(teacher)
    metrics = {"bleu": BLEU(), "chrf": CHRF()}
    for system in results["systems"]:
        hyps = lines_of(evaluated.out / f"{system['name']}.hyp")
        assert len(hyps) == len(refs)
        for key, metric in metrics.items():
            assert system[key]["score"] == pytest.approx(metric.corpus_score(hyps, [refs]).score, abs=1e-9)
    assert results["signatures"] == {key: str(metric.get_signature()) for key, metric in metrics.items()}
    assert "bs:1000" in results["significance_signatures"]["bleu"]
    baseline, other = results["systems"]
    assert baseline["bleu"]["p_value"] is None and baseline["delta_bleu"] is None
    assert 0 < other["bleu"]["p_value"] <= 1 and 0 < other["chrf"]["p_value"] <= 1
    assert other["delta_bleu"] == pytest.approx(other["bleu"]["score"] - baseline["bleu"]["score"])
    report = (evaluated.out / "results.md").read_text()
    assert report in evaluated.proc.stdout and results["signatures"]["bleu"] in report
    assert f"| noisy | {other['bleu']['score']:.2f} | {other['chrf']['score']:.2f} |" in report


def cli_p_values(stdout):
    """{metric name: [p-value of each system after the baseline]} from sacreBLEU's multi-system text table."""
    header = next(line for line in stdout.splitlines() if "System" in line)
    names = re.findall(r"(BLEU|chrF2) \(", header)
    rows = [[float(p) for p in re.findall(r"\(p = ([0-9.]+)\)", line)] for line in stdout.splitlines()]
    p_rows = [row for row in rows if row]
    return {name: [row[i] for row in p_rows] for i, name in enumerate(names)}


def test_p_values_are_sacrebleus_paired_bootstrap_on_the_written_files(evaluated, corpus):
    results = evaluated.results
    samples = results["bootstrap_samples"]
    baseline, other = (evaluated.out / f"{s['name']}.hyp" for s in results["systems"])
    # The command line's default JSON output fails on numpy scalars in multi-system mode: its text table instead.
    proc = run([BIN / "sacrebleu", corpus.root / "raw.test.de", "-i", baseline, other, "-m", "bleu", "chrf",
                "--paired-bs", "--paired-bs-n", samples, "--format", "text", "--no-color"])
    cli = cli_p_values(proc.stdout)
    assert list(cli) == ["BLEU", "chrF2"] and all(len(p) == 1 for p in cli.values()), proc.stdout
    for key in ("bleu", "chrf"):
        assert results["significance_signatures"][key] in proc.stdout
    system = results["systems"][1]
    # The table prints 4 decimals; p = (c + 1) / (samples + 1) moves in steps of about 1e-3.
    assert abs(system["bleu"]["p_value"] - system["chrf"]["p_value"]) > 1e-4, "a BLEU/chrF swap would not show"
    assert system["bleu"]["p_value"] == pytest.approx(cli["BLEU"][0], abs=5e-5)
    assert system["chrf"]["p_value"] == pytest.approx(cli["chrF2"][0], abs=5e-5)


def test_every_hypothesis_comes_back_in_corpus_order(evaluated, corpus):
    # fairseq's default batching (sizes a multiple of 8) drops the last, longest batch of this test set.
    from fairseq.data import data_utils

    sizes = [max(len(s.split()), len(t.split())) + 1 for s, t in
             zip(lines_of(corpus.root / "sp.test.en"), lines_of(corpus.root / "sp.test.de"))]
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    kept = data_utils.batch_by_size(order, sizes.__getitem__, max_tokens=12000, required_batch_size_multiple=8)
    dropped = sorted(set(order) - {int(i) for batch in kept for i in batch})
    assert dropped

    sp = sentencepiece.SentencePieceProcessor(model_file=str(corpus.root / "spm.model"))
    generated = (evaluated.out / "teacher.generate.txt").read_text(encoding="utf-8")
    by_id = dict(re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", generated, flags=re.M))
    hyps = lines_of(evaluated.out / "teacher.hyp")
    assert len(by_id) == len(hyps) == 100
    for i in [0, 1, 50, 99, *dropped]:
        assert hyps[i] == sp.decode(by_id[str(i)].split())


def test_folder_system_is_the_mean_of_its_last_two_epoch_checkpoints(evaluated, noisy_folder):
    system = evaluated.results["systems"][1]
    assert system["averaged_from"] == [str(noisy_folder / "checkpoint3.pt"), str(noisy_folder / "checkpoint2.pt")]
    averaged = torch.load(system["checkpoint"], map_location="cpu")["model"]
    last, previous = (torch.load(noisy_folder / f"checkpoint{e}.pt", map_location="cpu")["model"] for e in (3, 2))
    assert averaged.keys() == last.keys()
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (last[key] + previous[key]) / 2, rtol=0, atol=1e-7)


def test_average_checkpoints_is_fairseqs_elementwise_mean(tmp_path):
    shared = torch.tensor([1.0, 2.0])
    states = [
        {"model": OrderedDict(w=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), half=torch.tensor([1.0], dtype=torch.half),
                              step=torch.tensor([7, 8], dtype=torch.int32), tied_a=shared, tied_b=shared),
         "extra_state": {"epoch": 2}},
        {"model": OrderedDict(w=torch.tensor([[3.0, 2.0], [1.0, 0.0]]), half=torch.tensor([2.0], dtype=torch.half),
                              step=torch.tensor([2, 2], dtype=torch.int32), tied_a=shared * 3, tied_b=shared * 3),
         "extra_state": {"epoch": 1}},
    ]
    paths = [tmp_path / f"c{i}.pt" for i in range(2)]
    for state, path in zip(states, paths):
        torch.save(state, path)
    averaged = average_checkpoints(paths)
    assert averaged["extra_state"] == {"epoch": 2}
    model = averaged["model"]
    torch.testing.assert_close(model["w"], torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    assert model["half"].dtype == torch.float32 and model["half"].item() == 1.5
    assert model["step"].tolist() == [4, 5]  # integers are floor-divided, as in fairseq
    torch.testing.assert_close(model["tied_a"], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(model["tied_b"], torch.tensor([2.0, 4.0]))

    torch.save({"model": OrderedDict(other=torch.zeros(1))}, paths[1])
    with pytest.raises(UsageError, match="other parameters"):
        average_checkpoints(paths)


def test_last_checkpoints_picks_the_highest_epoch_or_update(tmp_path):
    for name in ("checkpoint2.pt", "checkpoint9.pt", "checkpoint10.pt", "checkpoint_best.pt", "checkpoint_last.pt",
                 "checkpoint_3_500.pt", "checkpoint_3_1000.pt", "checkpoint_2_900.pt"):
        (tmp_path / name).touch()
    assert [p.name for p in last_checkpoints(tmp_path, 2)] == ["checkpoint10.pt", "checkpoint9.pt"]
    assert [p.name for p in last_checkpoints(tmp_path, 2, update_based=True)] == [
        "checkpoint_3_1000.pt", "checkpoint_2_900.pt"]
    with pytest.raises(UsageError, match=r"holds 3 checkpoint<epoch>\.pt files"):
        last_checkpoints(tmp_path, 4)


def test_hypotheses_are_read_back_in_sample_id_order_and_a_subset_is_refused():
    output = "\n".join([
        "2024-01-01 00:00:00 | INFO | fairseq_cli.generate | loading",
        "S-2\tsource two", "T-2\ttarget two", "H-2\t-0.5\t▁two", "D-2\t-0.5\ttwo", "P-2\t-0.5",
        "H-0\t-0.1\t▁zero ▁words", "H-1\t-0.3\t", "Generate test with beam=4: BLEU = 1.00",
    ])
    assert in_corpus_order(generated_hypotheses(output), range(3), "generate") == ["▁zero ▁words", "", "▁two"]
    with pytest.raises(UsageError, match=r"^generate: 2 of 5 sentences got no hypothesis \(ids 3, 4\)$"):
        in_corpus_order(generated_hypotheses(output), range(5), "generate")


def test_markdown_table():
    rows = [
        {"name": "ce", "bleu": {"score": 27.304, "p_value": None}, "chrf": {"score": 56.0}, "delta_bleu": None},
        {"name": "tie_kd", "bleu": {"score": 28.3449, "p_value": 0.001}, "chrf": {"score": 57.25},
         "delta_bleu": 1.0409},
    ]
    assert markdown_table(rows, "ce") == (
        "| system | BLEU | chrF | ΔBLEU vs ce | p-value |\n"
        "|---|---:|---:|---:|---:|\n"
        "| ce | 27.30 | 56.00 |  |  |\n"
        "| tie_kd | 28.34 | 57.25 | +1.04 | 0.0010 |\n"
    )


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", r"checkpoint \S+missing\.pt does not exist"),
    ("missing ref", r"reference file \S+missing\.de does not exist"),
    ("ref of another length", r"reference file \S+raw\.valid\.de has 200 lines but subset 'test' has 100 sentences"),
    ("too few checkpoints", r"--average-last 4: \S+ holds 3 checkpoint<epoch>\.pt files"),
    ("folder without --average-last", r"system \S+ is a folder: give --average-last N .*"),
    ("names count", r"--names gives 1 names for 2 systems"),
])
def test_bad_input_is_one_line_before_decoding(case, message, corpus, teacher, noisy_folder, tmp_path, capsys):
    ref = corpus.root / "raw.test.de"
    systems = {
        "missing checkpoint": [teacher, tmp_path / "missing.pt"],
        "too few checkpoints": [teacher, noisy_folder, "--average-last", "4"],
        "folder without --average-last": [teacher, noisy_folder],
        "names count": [teacher, teacher, "--names", "a"],
    }.get(case, [teacher])
    ref = {"missing ref": tmp_path / "missing.de", "ref of another length": corpus.root / "raw.valid.de"}.get(case, ref)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in ["--data-bin", corpus.data_bin, *systems, "--ref", ref, "--out", out]])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.fullmatch(f"tiekd-eval: error: {message}", errors[0]), errors
    assert not out.exists()


def test_console_script_exits_2_with_one_line(corpus, teacher, tmp_path):
    proc = run([TOOL, "--data-bin", corpus.data_bin, teacher, tmp_path / "missing.pt",
                "--ref", corpus.root / "raw.test.de", "--out", tmp_path / "out"], check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    missing = tmp_path / "missing.pt"
    assert proc.stderr.strip().splitlines()[-1] == f"tiekd-eval: error: checkpoint {missing} does not exist"
