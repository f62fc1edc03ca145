"""The demo's students, each trained with seeds 1..S, compared on the test set by mean and sd over the seeds.

The students are CE, word-KD, TIE-KD with N = 1 and 3, and TIE-KD ranked on
log-probabilities with a hinge margin (``tie_kd_log``). Every run has ``make demo``'s
student architecture, schedule, update budget, data and shipped teacher; only the
seed and the loss differ. Unless ``--rank-margin`` is given, the margin of
``tie_kd_log`` is first picked on the valid split among ``--margin-grid`` (seed 1;
the best valid BLEU, on a tie the smaller margin), and that seed-1 run is the
comparison's. Each seed's students are scored against the same seed's word-KD
student (paired bootstrap) and analysed against the teacher under teacher forcing.

``--out`` is a run folder (``tiekd_cli.run_folder``) as in ``run_demo.py``: a rerun
skips the finished runs and goes on from an interrupted run's last checkpoint.

    python examples/demo/compare_seeds.py --out seeds-out   # 3 seeds of the 5 systems
"""

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from pathlib import Path

import torch
from run_demo import (
    DEMO_DIR,
    LOG_FORMAT,
    PROFILES,
    TEACHER_FILES,
    TGT,
    StageFailed,
    Stages,
    prepare_data,
    student_args,
    train,
)

from tiekd_cli.analyze import analyze
from tiekd_cli.eval import evaluate
from tiekd_cli.export_teacher import verify_checksums
from tiekd_cli.files import atomic_write_text
from tiekd_cli.raw_text import read_lines
from tiekd_cli.run_folder import RunFolder
from tiekd_cli.shell import UsageError, run_tool

PROG = "compare_seeds.py"
DEFAULT = PROFILES["default"]
BASELINE, LOG_RANKED = "word_kd", "tie_kd_log"
# name: (run_demo's student it is, its N of TIE-KD passes, its flags beyond run_demo's); tie_kd_log adds its margin.
SYSTEMS = {
    "ce": ("ce", None, ()),
    "word_kd": ("word_kd", None, ()),
    "tie_kd_n1": ("tie_kd", 1, ("--rank-space", "prob")),
    "tie_kd_n3": ("tie_kd", 3, ("--rank-space", "prob")),
    "tie_kd_log": ("tie_kd", 1, ("--rank-space", "logprob")),
}
DEFAULT_GRID = (0.5, 1.0, 2.0)
# Two runs share the cores: each on one thread, or their thread pools fight over them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def system_args(system, seed, teacher, margin=None):
    """fairseq-train arguments of ``system``'s student with ``seed`` (task and teacher included, budget not)."""
    student, iterations, extra = SYSTEMS[system]
    args = list(student_args(student, replace(DEFAULT, tie_kd_iterations=iterations or DEFAULT.tie_kd_iterations)))
    args[args.index("--seed") + 1] = seed
    args += extra
    if system == LOG_RANKED:
        args += ["--rank-margin", margin]
    task = ("translation",) if student == "ce" else ("translation_kd", "--teacher", teacher)
    return ("--task", *task, *args)


def margin_name(margin):
    """The name, and folder under ``runs``, of the margin grid's run of ``margin`` (tie_kd_log, seed 1)."""
    return f"tie_kd_log-m{margin!r}-seed1"


def pick_margin(valid_bleu):
    """The margin of the highest valid BLEU, the smaller one on a tie; ``valid_bleu``: [(margin, BLEU)]."""
    return min(valid_bleu, key=lambda pair: (-pair[1], pair[0]))[0]


def mean_sd(values):
    """(mean, sample standard deviation or None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


class WholeLines:
    """A text stream that passes each thread's writes on a whole line at a time: ``print`` writes its text and its
    line end apart, so two threads' lines would run into each other."""

    def __init__(self, stream):
        self.stream, self.lock, self.pending = stream, threading.Lock(), threading.local()

    def write(self, text):
        lines, newline, self.pending.text = (getattr(self.pending, "text", "") + text).rpartition("\n")
        if newline:
            with self.lock:
                self.stream.write(lines + newline)
        return len(text)

    def flush(self):
        with self.lock:
            self.stream.flush()


@contextmanager
def environment(variables):
    """``os.environ`` with ``variables`` set within the block, as it was after it."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Comparison:
    """The runs, evaluations and table of one seeded comparison in ``out``; ``run()`` does what is not done yet.

    Args:
        out: the run folder.
        seeds: seeds 1..``seeds``.
        systems: names of ``SYSTEMS``, word_kd among them when more than one.
        margin: tie_kd_log's --rank-margin, or None to pick it from ``margin_grid`` on the valid split.
        updates, train_pairs, valid_pairs, test_pairs, bootstrap_samples: the default profile's, or smaller.
        jobs: commands (fairseq-train runs, evaluations) at a time.
        command: the command line, for the table.
    """

    def __init__(self, out, seeds, systems, margin, margin_grid, updates, train_pairs, valid_pairs, test_pairs,
                 bootstrap_samples, jobs, command):
        self.out, self.seeds, self.systems = Path(out), range(1, seeds + 1), systems
        self.jobs, self.command = jobs, command
        self.given_margin, self.margin_grid = margin, margin_grid
        self.profile = replace(DEFAULT, train_pairs=train_pairs, valid_pairs=valid_pairs, test_pairs=test_pairs,
                               student_updates=updates, bootstrap_samples=bootstrap_samples)
        self.teacher_dir = DEMO_DIR / "teacher"
        self.teacher = self.teacher_dir / "teacher.pt"
        self.data_bin = self.out / "data" / "bin"
        self.picks_margin = LOG_RANKED in systems and margin is None
        self.steps, self.run_names = self._steps()
        self.step_names = ["data", *(name for name, _, _ in self.steps), *(f"analysis-seed{s}" for s in self.seeds)]

    def _steps(self):
        """The steps that run in parallel, in the order they are preferred, as (name, work, names of the steps it
        waits for), and the names of the training runs among them."""
        grid = {m: margin_name(m) for m in self.margin_grid} if self.picks_margin else {}
        steps = [(name, lambda m=m: self._train(LOG_RANKED, 1, margin=m), []) for m, name in grid.items()]
        if self.picks_margin:
            steps += [(f"valid-m{m!r}", lambda m=m: self._validate(m), [name]) for m, name in grid.items()]
            steps.append(("margin", self._write_margin, [f"valid-m{m!r}" for m in grid]))
        runs = list(grid.values())
        for seed in self.seeds:
            # With a picked margin, tie_kd_log's runs wait for it, and its seed-1 run is the chosen grid run.
            waits = ["margin"] if self.picks_margin else []
            systems = [system for system in self.systems
                       if not (self.picks_margin and system == LOG_RANKED and seed == 1)]
            names = [f"{system}-seed{seed}" for system in systems]
            steps += [(name, lambda system=system, seed=seed: self._train(system, seed),
                       waits if system == LOG_RANKED else []) for name, system in zip(names, systems)]
            steps.append((f"eval-seed{seed}", lambda seed=seed: self._evaluate(seed), names + waits))
            runs += names
        return steps, runs

    def settings(self):
        margin_source = None
        if LOG_RANKED in self.systems:
            margin_source = {"margin_grid": self.margin_grid} if self.picks_margin else {"rank_margin": self.margin()}
        return {"teacher": str(self.teacher.resolve()), "seeds": len(self.seeds),
                "updates": self.profile.student_updates, "systems": self.systems, "margin": margin_source,
                "train_pairs": self.profile.train_pairs, "valid_pairs": self.profile.valid_pairs,
                "test_pairs": self.profile.test_pairs, "bootstrap_samples": self.profile.bootstrap_samples}

    def margin(self):
        """tie_kd_log's margin: the one given, or the one ``margin.json`` records as chosen."""
        if not self.picks_margin:
            return self.given_margin
        return json.loads((self.out / "margin.json").read_text())["chosen"]

    def run_dir(self, system, seed):
        if system == LOG_RANKED and seed == 1 and self.picks_margin:
            return self.out / "runs" / margin_name(self.margin())
        return self.out / "runs" / f"{system}-seed{seed}"

    def run(self):
        verify_checksums(self.teacher_dir, TEACHER_FILES)
        with RunFolder(self.out, self.settings(), PROG) as folder:
            self.stages = Stages(folder, self.step_names)
            self.stages.run("data", lambda: prepare_data(DEMO_DIR / "data", self.teacher_dir, self.out / "data",
                                                         self.profile))
            # evaluate() starts fairseq-generate with this process's environment: one thread each, as the runs.
            with environment(ONE_THREAD), redirect_stdout(WholeLines(sys.stdout)):
                self._in_parallel(self.steps)
            # In this process, on every core: after the commands.
            for seed in self.seeds:
                self.stages.run(f"analysis-seed{seed}", lambda seed=seed: self._analyze(seed))
            self._write_table()
        print((self.out / "results.md").read_text(), end="")

    def _in_parallel(self, steps):
        """Run the (name, work, waits for) steps ``self.jobs`` at a time: each time one ends, the first ones in
        ``steps`` whose waits are over start. The first failure starts no more and is raised once the running
        ones have finished (their work is kept)."""
        waiting, running, finished = list(steps), {}, set()
        with ThreadPoolExecutor(self.jobs) as pool:
            while waiting or running:
                for step in [step for step in waiting if finished.issuperset(step[2])][: self.jobs - len(running)]:
                    waiting.remove(step)
                    running[pool.submit(self.stages.run, step[0], step[1])] = step[0]
                ended, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in ended:
                    finished.add(running.pop(future))
                    future.result()

    def _train(self, system, seed, margin=None):
        """Train ``system`` with ``seed``: a run of the comparison, or with ``margin``, a run of the margin grid."""
        save_dir = self.run_dir(system, seed) if margin is None else self.out / "runs" / margin_name(margin)
        if system == LOG_RANKED and margin is None:
            margin = self.margin()
        train(self.data_bin, save_dir, system_args(system, seed, self.teacher, margin), self.profile.student_updates,
              env=ONE_THREAD)

    def _cpu(self):
        return not torch.cuda.is_available()

    def _validate(self, margin):
        evaluate(self.data_bin, [self.out / "runs" / margin_name(margin) / "checkpoint_last.pt"],
                 self.out / "data" / f"valid.{TGT}", self.out / "valid" / f"m{margin!r}", names=[LOG_RANKED],
                 subset="valid", spm_model=self.teacher_dir / "spm.model", cpu=self._cpu())

    def _write_margin(self):
        candidates = []
        for m in self.margin_grid:
            results = json.loads((self.out / "valid" / f"m{m!r}" / "results.json").read_text())
            candidates.append({"margin": m, "valid_bleu": results["systems"][0]["bleu"]["score"],
                               "results": f"valid/m{m!r}/results.json", "run": f"runs/{margin_name(m)}"})
        chosen = pick_margin([(c["margin"], c["valid_bleu"]) for c in candidates])
        record = {"rule": "highest valid BLEU of tie_kd_log, seed 1; on a tie the smaller margin",
                  "candidates": candidates, "chosen": chosen}
        atomic_write_text(self.out / "margin.json", json.dumps(record, indent=2) + "\n")

    def _ordered(self):
        """The systems with word_kd first: the baseline of the paired bootstrap."""
        return sorted(self.systems, key=lambda name: name != BASELINE)

    def _evaluate(self, seed):
        names = self._ordered()
        evaluate(self.data_bin, [self.run_dir(n, seed) / "checkpoint_last.pt" for n in names],
                 self.out / "data" / f"test.{TGT}", self.out / "eval" / f"seed-{seed}", names=names, subset="test",
                 spm_model=self.teacher_dir / "spm.model", bootstrap_samples=self.profile.bootstrap_samples,
                 cpu=self._cpu())

    def _analyze(self, seed):
        analyze(self.data_bin, self.teacher, [self.run_dir(n, seed) / "checkpoint_last.pt" for n in self.systems],
                names=self.systems, subset="test", out=self.out / "analysis" / f"seed-{seed}", cpu=self._cpu())

    def _write_table(self):
        evals = [json.loads((self.out / "eval" / f"seed-{s}" / "results.json").read_text()) for s in self.seeds]
        analyses = [json.loads((self.out / "analysis" / f"seed-{s}" / "analysis.json").read_text())["results"][0]
                    for s in self.seeds]
        if self.picks_margin:
            record = json.loads((self.out / "margin.json").read_text())
            how = {"source": "valid BLEU", "valid_bleu": {repr(c["margin"]): c["valid_bleu"]
                                                          for c in record["candidates"]}}
        else:
            how = {"source": "given"}
        results = {
            "command": self.command, "seeds": list(self.seeds), "updates": self.profile.student_updates,
            "test_segments": len(read_lines(self.out / "data" / f"test.{TGT}")),
            "bootstrap_samples": self.profile.bootstrap_samples,
            "baseline": BASELINE if len(self.systems) > 1 else None,
            "margin": {"rank_margin": self.margin(), **how} if LOG_RANKED in self.systems else None,
            **over_seeds(self.systems, evals, analyses),
            "signatures": evals[0]["signatures"], "significance_signatures": evals[0]["significance_signatures"],
            "minutes": {name: m for name, m in self.stages.minutes().items() if name in self.run_names},
        }
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(self.out / "results.md", markdown_report(results))


def over_seeds(systems, evals, analyses):
    """Each system's scores over the seeds, and the teacher's: ``{"systems": [row per system], "teacher": ...}``.

    Args:
        systems: names, in the order of the rows.
        evals: per seed, the results of ``evaluate`` (word_kd its baseline when it has more than one system).
        analyses: per seed, the row "all" of ``analyze``'s results.
    """
    rows = []
    for name in systems:
        scored = [next(s for s in e["systems"] if s["name"] == name) for e in evals]
        row = {"name": name}
        for metric in ("bleu", "chrf"):
            per_seed = [s[metric]["score"] for s in scored]
            mean, sd = mean_sd(per_seed)
            row[metric] = {"mean": mean, "sd": sd, "per_seed": per_seed}
        row["p_value_vs_word_kd"] = None if name == BASELINE or len(systems) == 1 else [
            s["bleu"]["p_value"] for s in scored]
        for key in ("top1_agreement", "entropy", "max_prob"):
            row[key] = statistics.mean(a["students"][name][key] for a in analyses)
        rows.append(row)
    teacher = {key: statistics.mean(a[f"teacher_{key}"] for a in analyses) for key in ("entropy", "max_prob")}
    return {"systems": rows, "teacher": teacher}


def _number(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(results):
    """``results.md``: the table of ``results`` (as ``results.json`` holds it) and how it was made."""
    lines = ["| system | BLEU mean | BLEU sd | chrF mean | chrF sd | BLEU per seed | p-value vs word_kd per seed "
             "| top-1 agreement % | entropy | max prob |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in results["systems"]:
        per_seed = " / ".join(_number(b) for b in row["bleu"]["per_seed"])
        p_values = "-" if row["p_value_vs_word_kd"] is None else " / ".join(
            _number(p, 4) for p in row["p_value_vs_word_kd"])
        lines.append(f"| {row['name']} | {_number(row['bleu']['mean'])} | {_number(row['bleu']['sd'])} "
                     f"| {_number(row['chrf']['mean'])} | {_number(row['chrf']['sd'])} | {per_seed} | {p_values} "
                     f"| {_number(row['top1_agreement'])} | {_number(row['entropy'], 3)} "
                     f"| {_number(row['max_prob'], 3)} |")
    teacher = results["teacher"]
    lines.append(f"| teacher | - | - | - | - | - | - | - | {_number(teacher['entropy'], 3)} "
                 f"| {_number(teacher['max_prob'], 3)} |")
    signatures = [f"- {key}: `{sig}`" for key, sig in results["signatures"].items()]
    signatures += [f"- p-value ({key}, paired bootstrap): `{sig}`"
                   for key, sig in (results["significance_signatures"] or {}).items()]
    margin = results["margin"]
    if margin is None:
        margin_line = "tie_kd_log is not compared: no margin."
    elif margin["source"] == "given":
        margin_line = f"Margin of tie_kd_log: {margin['rank_margin']!r} nats, given (`--rank-margin`)."
    else:
        grid = ", ".join(f"{m}: {bleu:.2f}" for m, bleu in margin["valid_bleu"].items())
        margin_line = (f"Margin of tie_kd_log: {margin['rank_margin']!r} nats, the best valid BLEU of seed 1 "
                       f"(margin: valid BLEU, {grid}); that run is tie_kd_log's seed 1.")
    minutes = "\n".join(f"| {name} | {m:.1f} |" for name, m in results["minutes"].items())
    seeds = results["seeds"]
    return f"""# The demo's students over {len(seeds)} seeds: LibreOffice help, English to German

Test set: LibreOffice help test split ({results["test_segments"]} segments), beam 4, length penalty 0.6,
detokenized with sentencepiece, scored by sacreBLEU. Mean and sample standard deviation (n - 1) over the seeds;
per seed in the order of the seeds. p-values: paired bootstrap resampling ({results["bootstrap_samples"]}
samples) of each seed's student against the word_kd student of the same seed. Top-1 agreement with the
teacher, mean entropy and mean top-1 probability: all test positions, gold prefixes, mean over the seeds.

{chr(10).join(lines)}

{chr(10).join(signatures)}

TIE-KD: alpha 0.5, k 5; tie_kd_n1 and tie_kd_n3 rank probabilities (N = 1, 3), tie_kd_log log-probabilities
(N = 1). Word-KD: alpha 0.5, full-distribution KL. {margin_line}

Command: `{results["command"]}`

Seeds: {", ".join(map(str, seeds))}. Updates per run: {results["updates"]}.

| run | minutes |
|---|---:|
{minutes}
"""


def parse_grid(text):
    """'0.5,1,2' -> (0.5, 1.0, 2.0): distinct finite margins >= 0."""
    try:
        grid = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--margin-grid {text}: not a comma-separated list of numbers") from None
    if any(not math.isfinite(m) or m < 0 for m in grid) or len(set(grid)) != len(grid):
        raise UsageError(f"--margin-grid {text}: need distinct finite margins >= 0, such as 0.5,1,2")
    return grid


def parse_systems(text):
    systems = text.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or len(set(systems)) != len(systems):
        raise UsageError(f"--systems {text}: need distinct names among {', '.join(SYSTEMS)}"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if len(systems) > 1 and BASELINE not in systems:
        raise UsageError(f"--systems {text}: with more than one system, {BASELINE} is needed (the baseline)")
    return [s for s in SYSTEMS if s in systems]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (run_tool prints them), not usage and error."""

    def error(self, message):
        raise UsageError(message)


def main(argv=None):
    return run_tool(PROG, _main, argv)


def _main(argv):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = _Parser(prog=PROG, description="The demo's students over several seeds, compared by mean and standard "
                                            "deviation. A rerun skips finished runs.")
    parser.add_argument("--out", required=True, help="output folder (a run folder)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..S of every system (default: 3)")
    parser.add_argument("--jobs", type=int, default=2, help="fairseq-train runs at a time, one thread each "
                                                            "(default: 2)")
    margin = parser.add_mutually_exclusive_group()
    margin.add_argument("--rank-margin", type=float, help="tie_kd_log's margin in nats (default: picked on the "
                                                          "valid split from --margin-grid)")
    margin.add_argument("--margin-grid", help="candidate margins of tie_kd_log (default: 0.5,1,2)")
    parser.add_argument("--bootstrap-samples", type=int, default=DEFAULT.bootstrap_samples,
                        help=f"paired bootstrap resamples (default: {DEFAULT.bootstrap_samples})")
    parser.add_argument("--updates", type=int, default=DEFAULT.student_updates,
                        help=f"updates per run (default: {DEFAULT.student_updates})")
    for split in ("train", "valid", "test"):
        default = getattr(DEFAULT, f"{split}_pairs")
        parser.add_argument(f"--{split}-pairs", type=int, default=default,
                            help=f"{split} pairs kept, 0 for all (default: {default})")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a comma list of {', '.join(SYSTEMS)} "
                                                                     "(default: all)")
    args = parser.parse_args(argv)
    for flag in ("seeds", "jobs", "bootstrap_samples", "updates"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    for split in ("train", "valid", "test"):
        if getattr(args, f"{split}_pairs") < 0:
            raise UsageError(f"--{split}-pairs must be 0 (all) or more, not {getattr(args, f'{split}_pairs')}")
    systems = parse_systems(args.systems)
    grid = parse_grid(args.margin_grid) if args.margin_grid is not None else DEFAULT_GRID
    if args.rank_margin is not None and (not math.isfinite(args.rank_margin) or args.rank_margin < 0):
        raise UsageError(f"--rank-margin must be a finite number >= 0, not {args.rank_margin}")
    if LOG_RANKED not in systems and (args.rank_margin is not None or args.margin_grid is not None):
        raise UsageError(f"--rank-margin and --margin-grid are for {LOG_RANKED}, which --systems leaves out")
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO, stream=sys.stdout)
    command = shlex.join(["python", f"examples/demo/{PROG}", *argv])
    try:
        Comparison(args.out, args.seeds, systems, args.rank_margin, grid, args.updates, args.train_pairs,
                   args.valid_pairs, args.test_pairs, args.bootstrap_samples, args.jobs, command).run()
    except StageFailed as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run it again to go on from the runs it was in", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
