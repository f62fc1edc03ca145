"""``make demo``: a teacher, CE, word-KD and TIE-KD students and iterative KD on real text, compared on a test set.

The corpus is LibreOffice help (English-German, ``examples/demo/data``); the
source-only text of the iterative stage is English Ding dictionary sentences.
The teacher, its sentencepiece model and dictionaries ship in
``examples/demo/teacher`` (checked against ``SHA256SUMS`` before use); the
``full`` profile trains all three anew with the same commands.

``--out`` is a run folder (``tiekd_cli.run_folder``): every stage writes its
outputs there, its log to ``logs/<stage>.log`` and its done marker to ``done/``;
a rerun skips the finished stages, and a stage that was interrupted goes on from
its last checkpoint (fairseq's ``checkpoint_last.pt``).

    python examples/demo/run_demo.py --profile default --out demo-out   # what `make demo` runs
"""

import argparse
import json
import logging
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from tiekd_cli.analyze import analyze
from tiekd_cli.eval import evaluate
from tiekd_cli.export_teacher import export_teacher, verify_checksums
from tiekd_cli.fairseq_runner import PLUGIN_DIR, run_fairseq
from tiekd_cli.files import atomic_write, atomic_write_text, write_lines
from tiekd_cli.iterate import iterate
from tiekd_cli.raw_text import RawTextError, read_lines, read_parallel
from tiekd_cli.run_folder import RunFolder
from tiekd_cli.shell import UsageError, run_tool
from tiekd_fairseq.errors import one_line

# A recipe, not an installed command: it reads its corpus and teacher beside itself.
DEMO_DIR = Path(__file__).resolve().parent
SRC, TGT = "en", "de"
TEACHER_FILES = ("teacher.pt", f"dict.{SRC}.txt", f"dict.{TGT}.txt", "spm.model")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo run; every student gets the same architecture, seed and updates."""

    train_pairs: int  # 0: all training pairs within max_len
    valid_pairs: int
    test_pairs: int  # 0: the whole test set
    mono_sentences: int
    student_updates: int
    iterate_updates: int
    tie_kd_iterations: int
    bootstrap_samples: int
    train_teacher: bool = False
    teacher_updates: int = 0


PROFILES = {
    # Minutes: for the tests of the pipeline itself.
    "tiny": Profile(train_pairs=1500, valid_pairs=20, test_pairs=20, mono_sentences=300, student_updates=12,
                    iterate_updates=6, tie_kd_iterations=1, bootstrap_samples=100),
    "default": Profile(train_pairs=0, valid_pairs=500, test_pairs=0, mono_sentences=0, student_updates=400,
                       iterate_updates=150, tie_kd_iterations=1, bootstrap_samples=1000),
    "full": Profile(train_pairs=0, valid_pairs=0, test_pairs=0, mono_sentences=0, student_updates=2000,
                    iterate_updates=1000, tie_kd_iterations=3, bootstrap_samples=1000, train_teacher=True,
                    teacher_updates=2028),  # 12 epochs
}

VOCAB_SIZE = 6000
# Longest segment kept for training, in sentencepiece tokens on either side (96% of the pairs).
MAX_LEN = 64
SEED = 1
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def transformer(encoder_layers, decoder_layers, dim, ffn, heads, dropout):
    """fairseq-train flags of a Transformer with shared embeddings."""
    return ("--arch", "transformer", "--share-all-embeddings",
            "--encoder-layers", encoder_layers, "--decoder-layers", decoder_layers,
            "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
            "--encoder-ffn-embed-dim", ffn, "--decoder-ffn-embed-dim", ffn,
            "--encoder-attention-heads", heads, "--decoder-attention-heads", heads, "--dropout", dropout)


# A deep encoder and shallow decoder: most of the quality of 3+3 layers for less compute.
TEACHER_ARCH = (*transformer(3, 2, 256, 1024, 4, 0.2), "--attention-dropout", 0.1)
STUDENT_ARCH = transformer(1, 1, 128, 256, 2, 0.1)
OPTIMIZER = (
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", 1.0,
    "--lr-scheduler", "inverse_sqrt", "--label-smoothing", 0.1, "--seed", SEED,
    "--required-batch-size-multiple", 1, "--max-epoch", 100,
)
TEACHER_SCHEDULE = ("--lr", 1e-3, "--warmup-updates", 400, "--max-tokens", 4096)
# Small batches: on a short budget more updates teach a small student more than bigger ones.
STUDENT_SCHEDULE = ("--lr", 2e-3, "--warmup-updates", 100, "--max-tokens", 2048)


class StageFailed(Exception):
    """A stage ended in an error; the message is one line: the stage, the tool's own error line, the log."""


class Stages:
    """The demo's stages in a run folder: each runs once, logs to ``logs/<name>.log``, and is marked done.

    Each stage's own logging, and the traceback of a failure, go to its log.
    """

    def __init__(self, run_folder, names):
        self.folder, self.names = run_folder, names
        self.logs = run_folder.path / "logs"
        self.logs.mkdir(exist_ok=True)

    def run(self, name, work):
        number = f"[{self.names.index(name) + 1}/{len(self.names)}]"
        if self.folder.done(name):
            print(f"{number} {name}: done before, skipped", flush=True)
            return
        print(f"{number} {name}", flush=True)
        start = time.monotonic()
        log = self.logs / f"{name}.log"
        handler = logging.FileHandler(log)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        try:
            work()
        except Exception as err:
            with open(log, "a") as f:
                f.write(getattr(err, "output", ""))
                traceback.print_exc(file=f)
            line = getattr(err, "line", None) or (str(err) if isinstance(err, UsageError) else one_line(err))
            raise StageFailed(f"stage {name} failed: {line} (log: {getattr(err, 'log', None) or log})") from None
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        seconds = time.monotonic() - start
        self.folder.mark_done(name, f"{seconds:.0f}")
        print(f"{number} {name}: finished in {seconds / 60:.1f} min", flush=True)

    def minutes(self):
        """Minutes of each finished stage, by name."""
        return {name: int(self.folder.note(name)) / 60 for name in self.names if self.folder.done(name)}


def _encode(sp, lines):
    return [" ".join(pieces) for pieces in sp.encode(lines, out_type=str)]


def prepare_data(corpus, vocab_dir, data_dir, profile):
    """Raw pairs, sentencepiece-encoded, filtered by length and binarized with the vocabulary's dictionary.

    Writes ``data_dir/bin`` (fairseq data-bin), the raw references ``{valid,test}.de``
    and the source-only text ``mono.en``. When ``vocab_dir`` has no sentencepiece
    model yet (the full profile), trains it on the training pairs, and fairseq
    builds the dictionary.
    """
    import sentencepiece as spm

    corpus, vocab_dir, data_dir = Path(corpus), Path(vocab_dir), Path(data_dir)
    try:
        pairs = {split: read_parallel(corpus / f"lohelp.{split}.{SRC}.xz", corpus / f"lohelp.{split}.{TGT}.xz")
                 for split in ("train", "valid", "test")}
        mono = [line for line in read_lines(corpus / f"ding.{SRC}.xz") if line.strip()]
    except (RawTextError, OSError) as err:
        raise UsageError(str(err)) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    model = vocab_dir / "spm.model"
    if not model.is_file():
        text = data_dir / "spm-input.txt"
        write_lines(text, [side for pair in pairs["train"] for side in pair if side.strip()])
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(vocab_dir / "spm"), vocab_size=VOCAB_SIZE,
                                       character_coverage=1.0, input_sentence_size=10**6, shuffle_input_sentence=True,
                                       seed_sentencepiece_size=10**6, minloglevel=2)
        text.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    limits = {"train": profile.train_pairs, "valid": profile.valid_pairs, "test": profile.test_pairs}
    for split, split_pairs in pairs.items():
        split_pairs = [p for p in split_pairs if p[0].strip()]
        encoded = list(zip(_encode(sp, [p[0] for p in split_pairs]), _encode(sp, [p[1] for p in split_pairs])))
        keep = range(len(split_pairs))
        if split != "test":  # the test set is scored whole
            keep = [i for i in keep if max(len(encoded[i][0].split()), len(encoded[i][1].split())) <= MAX_LEN]
        keep = list(keep)[: limits[split] or None]
        for side, lang in enumerate((SRC, TGT)):
            write_lines(data_dir / f"{split}.sp.{lang}", [encoded[i][side] for i in keep])
        write_lines(data_dir / f"{split}.{TGT}", [split_pairs[i][1] for i in keep])
    write_lines(data_dir / f"mono.{SRC}", mono[: profile.mono_sentences or None])
    dictionary = vocab_dir / f"dict.{SRC}.txt"
    bin_dir = data_dir / "bin"
    shutil.rmtree(bin_dir, ignore_errors=True)
    args = ["--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary", "--workers", 2,
            "--trainpref", data_dir / "train.sp", "--validpref", data_dir / "valid.sp",
            "--testpref", data_dir / "test.sp", "--destdir", bin_dir]
    if dictionary.is_file():
        args += ["--srcdict", dictionary]
    run_fairseq("preprocess", args, data_dir / "preprocess.log")


def _updates_done(save_dir):
    """Updates in ``checkpoint_last.pt``, 0 without one; a file cut short by a kill (fairseq copies it in place)
    is removed, so that training starts again instead of stopping on it."""
    last = Path(save_dir) / "checkpoint_last.pt"
    if not last.is_file():
        return 0
    try:
        return torch.load(last, map_location="cpu")["optimizer_history"][-1]["num_updates"]
    except Exception:  # any unreadable file: fairseq would stop on it with a traceback
        logger.warning("%s is damaged (interrupted while written); removed", last)
        last.unlink()
        return 0


def train(data_bin, save_dir, args, updates, desc=None, env=None):
    """fairseq-train into ``save_dir`` for ``updates`` updates, resuming from its last checkpoint.

    ``desc``: the progress bar's label (None: no bar); ``env``: variables for the command's environment.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    # fairseq resumed at its --max-update still makes one more update.
    if _updates_done(save_dir) >= updates:
        return
    run_fairseq("train", [
        data_bin, "--user-dir", PLUGIN_DIR, *args, "--max-update", updates, "--save-dir", save_dir,
        "--no-epoch-checkpoints", "--save-interval-updates", max(updates // 4, 5), "--keep-interval-updates", 1,
        "--log-format", "simple", "--log-interval", 10, "--num-workers", 0,
        *(() if torch.cuda.is_available() else ("--cpu",)),
    ], save_dir / "train.log", progress=(desc, updates) if desc else None, env=env)


def teacher_args():
    return ("--task", "translation", "--criterion", "label_smoothed_cross_entropy",
            *TEACHER_ARCH, *OPTIMIZER, *TEACHER_SCHEDULE)


def train_teacher(data_bin, teacher_dir, profile):
    """Train the teacher and export its best checkpoint in fp16 with dictionaries, sentencepiece model and card."""
    teacher_dir, data_dir = Path(teacher_dir), Path(data_bin).parent
    run_dir = teacher_dir / "train"
    train(data_bin, run_dir, teacher_args(), profile.teacher_updates, "teacher")
    export_teacher(run_dir / "checkpoint_best.pt", teacher_dir, teacher_data=data_bin,
                   spm_model=teacher_dir / "spm.model", fp16=True)
    scores = evaluate(data_bin, [teacher_dir / "teacher.pt"], data_dir / f"test.{TGT}", run_dir / "test",
                      names=["teacher"], subset="test", spm_model=teacher_dir / "spm.model",
                      cpu=not torch.cuda.is_available())
    write_teacher_card(teacher_dir, (run_dir / "train.log").read_text(), scores)


BEST_LINE = re.compile(r"Saved checkpoint \S*checkpoint_best\.pt \(epoch (\d+) @ (\d+) updates, score ([\d.]+)\)")


def write_teacher_card(teacher_dir, log, scores):
    """``TEACHER.md``: how the shipped teacher was made and how good it is."""
    best = BEST_LINE.findall(log)
    if not best:
        raise RuntimeError(f"no best checkpoint in the teacher's training log ({teacher_dir / 'train' / 'train.log'})")
    epoch, updates, loss = best[-1]
    # From the first to the last line of the log: fairseq's own wall clock restarts when a run resumes.
    stamps = [datetime.fromisoformat(t) for t in re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \|", log, re.M)]
    minutes = (stamps[-1] - stamps[0]).total_seconds() / 60
    bleu = scores["systems"][0]
    command = " ".join(str(a) for a in ("fairseq-train", "demo-out-full/data/bin", "--user-dir", "tiekd_fairseq",
                                        *teacher_args(), "--max-update", updates))
    text = f"""# The demo teacher

Trained by `make demo PROFILE=full` (stage `teacher`) on the LibreOffice help training pairs of at most
{MAX_LEN} sentencepiece tokens a side, with a joint sentencepiece model of {VOCAB_SIZE} pieces (`spm.model`)
and the joint dictionary fairseq built from them (`dict.en.txt`, `dict.de.txt`):

```
{command.replace("(0.9, 0.98)", "'(0.9, 0.98)'")}
```

- {updates} updates ({epoch} epochs) in {minutes:.0f} minutes (first to last line of the training log)
  {"on CUDA" if torch.cuda.is_available() else "on the CPU"}.
- The kept checkpoint is the one of best valid loss: {loss} (label-smoothed cross-entropy, base 2).
- Test set (LibreOffice help test split, whole, beam 4, length penalty 0.6): BLEU {bleu["bleu"]["score"]:.2f},
  chrF {bleu["chrf"]["score"]:.2f}.
  - `{scores["signatures"]["bleu"]}`
  - `{scores["signatures"]["chrf"]}`
- Exported by `tiekd-export-teacher --fp16`: `teacher.pt` holds the weights in fp16, no optimizer state and
  no path of the machine that trained it (its data, save and user dirs are cleared), and `spm.model` no
  training path; the dictionaries sit beside `teacher.pt`, where `--teacher` finds them. `make demo`
  checks the four files against `SHA256SUMS` before it uses them.
"""
    atomic_write_text(Path(teacher_dir) / "TEACHER.md", text)


# The students: same architecture, seed, schedule and update budget; they differ in the loss only.
STUDENTS = {
    "ce": ("--criterion", "label_smoothed_cross_entropy"),
    "word_kd": ("--criterion", "word_kd", "--kd-alpha", 0.5),
    "tie_kd": ("--criterion", "tie_kd", "--kd-alpha", 0.5, "--kd-topk", 5),
}
ITERATED = "tie_kd+iterate"


def student_args(name, profile):
    """fairseq-train arguments of a student, without the task, the teacher and the budget."""
    args = (*STUDENTS[name], *STUDENT_ARCH, *OPTIMIZER, *STUDENT_SCHEDULE)
    if name == "tie_kd":
        args += ("--kd-iterations", profile.tie_kd_iterations)
    return args


class Demo:
    """The stages of one demo run in ``out``; ``run()`` does the ones not done yet."""

    def __init__(self, out, profile_name="default", corpus=DEMO_DIR / "data", shipped_teacher=DEMO_DIR / "teacher"):
        if profile_name not in PROFILES:
            raise UsageError(f"unknown profile {profile_name!r}; choose one of {', '.join(PROFILES)}")
        self.out = Path(out)
        self.profile_name, self.profile = profile_name, PROFILES[profile_name]
        self.corpus = Path(corpus)
        self.teacher_dir = self.out / "teacher" if self.profile.train_teacher else Path(shipped_teacher)
        self.data_bin = self.out / "data" / "bin"
        self.teacher = self.teacher_dir / "teacher.pt"
        self.stage_names = ["data", *["teacher"] * self.profile.train_teacher, *STUDENTS, "iterate", "evaluate",
                            "analyze", "report"]

    def checkpoint(self, name):
        if name == ITERATED:
            return self.out / "iterate" / "checkpoint_best.pt"
        return self.out / name / "checkpoint_last.pt"

    def run(self):
        if not self.profile.train_teacher:
            verify_checksums(self.teacher_dir, TEACHER_FILES)
        settings = {"profile": self.profile_name, "teacher": str(self.teacher.resolve())}
        with RunFolder(self.out, settings, "make demo") as folder:
            self.stages = Stages(folder, self.stage_names)
            self._run_stages()
        print((self.out / "results.md").read_text(), end="")

    def _run_stages(self):
        self.teacher_dir.mkdir(exist_ok=True)
        stage = self.stages.run
        stage("data", lambda: prepare_data(self.corpus, self.teacher_dir, self.out / "data", self.profile))
        if self.profile.train_teacher:
            stage("teacher", lambda: train_teacher(self.data_bin, self.teacher_dir, self.profile))
        for name in STUDENTS:
            task = ("translation",) if name == "ce" else ("translation_kd", "--teacher", self.teacher)
            stage(name, lambda name=name, task=task: train(
                self.data_bin, self.out / name, ("--task", *task, *student_args(name, self.profile)),
                self.profile.student_updates, name))
        stage("iterate", self.iterate)
        stage("evaluate", self.evaluate)
        stage("analyze", self.analyze)
        stage("report", self.report)

    def iterate(self):
        """One round of TIE-KD on the Ding English text, from the TIE-KD student."""
        train_args = [*student_args("tie_kd", self.profile), "--max-update", self.profile.iterate_updates,
                      "--no-epoch-checkpoints", "--num-workers", 0]
        iterate(self.data_bin, self.out / "data" / f"mono.{SRC}", self.teacher, self.out / "iterate",
                self.out / "data" / f"valid.{TGT}", rounds=1, train_args=train_args,
                student_init=self.checkpoint("tie_kd"), spm_model=self.teacher_dir / "spm.model",
                cpu=not torch.cuda.is_available())

    def systems(self):
        """(name, checkpoint): the CE student first, as the baseline of the significance tests."""
        return [(name, self.checkpoint(name)) for name in (*STUDENTS, ITERATED)] + [("teacher", self.teacher)]

    def evaluate(self):
        names, paths = zip(*self.systems())
        evaluate(self.data_bin, paths, self.out / "data" / f"test.{TGT}", self.out / "eval", names=names,
                 subset="test", spm_model=self.teacher_dir / "spm.model",
                 bootstrap_samples=self.profile.bootstrap_samples, cpu=not torch.cuda.is_available())

    def analyze(self):
        names, paths = zip(*self.systems()[:-1])
        analyze(self.data_bin, self.teacher, paths, names=names, subset="test", out=self.out / "analysis",
                cpu=not torch.cuda.is_available())

    def report(self):
        results = json.loads((self.out / "eval" / "results.json").read_text())
        write_report(self.out, self.profile_name, self.profile, (self.out / "eval" / "results.md").read_text(),
                     (self.out / "analysis" / "analysis.md").read_text(), self.stages.minutes())
        bar_chart([(s["name"], s["bleu"]["score"]) for s in results["systems"]], self.out / "bleu.png")


def write_report(out, profile_name, profile, scores, analysis_table, minutes):
    """``out/results.md``: tiekd-eval's table and signatures, the top-1 analysis, and how it was made."""
    updates = {name: profile.student_updates for name in STUDENTS}
    updates[ITERATED] = f"{profile.student_updates} + {profile.iterate_updates} (1 round, Ding English source-only)"
    updates["teacher"] = "shipped" if not profile.train_teacher else profile.teacher_updates
    rows = "\n".join(f"| {name} | {updates[name]} |" for name in updates)
    stage_rows = "\n".join(f"| {name} | {m:.1f} |" for name, m in minutes.items())
    text = f"""# TIE-KD demo: LibreOffice help, English to German

Profile `{profile_name}`. Test set: LibreOffice help test split ({_test_size(out)} segments), beam 4,
length penalty 0.6, detokenized with sentencepiece, scored by sacreBLEU. p-values: paired bootstrap
resampling ({profile.bootstrap_samples} samples) against the CE student.

{scores}

TIE-KD: alpha 0.5, k 5, N = {profile.tie_kd_iterations}. Word-KD: alpha 0.5, full-distribution KL.

| system | updates |
|---|---|
{rows}

## Where the students follow the teacher (test set, gold prefixes)

{analysis_table}
## Stage times (minutes)

| stage | minutes |
|---|---:|
{stage_rows}
"""
    atomic_write_text(Path(out) / "results.md", text)


def _test_size(out):
    return len(read_lines(Path(out) / "data" / f"test.{TGT}"))


def bar_chart(bleu, path):
    """A PNG bar chart of BLEU per system, written whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, scores = zip(*bleu)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 1, 3.6))
    bars = ax.bar(names, scores, color=["#999999" if n == "teacher" else "#4477aa" for n in names])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("BLEU (sacreBLEU)")
    ax.set_title("LibreOffice help en-de, test set")
    ax.set_ylim(0, max(scores) * 1.15 + 1)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    return run_tool("make demo", _main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="run_demo.py",
        description="Teacher, CE / word-KD / TIE-KD students and iterative KD on LibreOffice help (en-de), "
                    "compared on its test set. A rerun skips finished stages.")
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--profile", default="default", choices=PROFILES,
                        help="tiny: minutes, for tests; default: the shipped teacher, about 11 minutes on 2 CPU "
                             "cores; full: trains sentencepiece, dictionary and teacher too, hours on CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO, stream=sys.stdout)
    try:
        Demo(args.out, args.profile).run()
    except StageFailed as err:
        print(f"make demo: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("make demo: interrupted; run it again to go on from the stage it was in", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
