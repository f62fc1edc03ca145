"""What the teacher cache costs in quality: word_kd students trained from a top-K cache against the online teacher.

    python benchmarks/cache_quality.py [--demo-out demo-out] [--kd-topk 8 32]

Needs a finished ``make demo`` run in ``--demo-out``: its data, its teacher and its
``word_kd`` student (trained with the online teacher) are reused. For each K,
caches the teacher's top-K on the training set with ``tiekd-cache-teacher``'s
library function, trains a ``word_kd`` student from it with the demo's exact
arguments and budget (``--teacher-cache`` in place of ``--teacher``), and
scores all of them on the test set with tiekd-eval (paired bootstrap against the
online student). Writes ``<demo-out>/cache_quality/results.md`` and prints it.
"""

import argparse
import sys
from pathlib import Path

import torch

from tiekd_cli.cache_teacher import build_teacher_cache
from tiekd_cli.eval import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "demo"))
from run_demo import PROFILES, TGT, Demo, student_args, train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", default="demo-out", help="folder of a finished make demo run")
    parser.add_argument("--profile", default="default", choices=PROFILES, help="profile of that run")
    parser.add_argument("--kd-topk", type=int, nargs="+", default=[8, 32], help="cache sizes K to try")
    args = parser.parse_args()
    demo = Demo(args.demo_out, args.profile)
    online = demo.checkpoint("word_kd")
    if not online.is_file():
        raise SystemExit(f"cache_quality: {online} does not exist: run make demo first")
    out = Path(args.demo_out) / "cache_quality"
    cpu = not torch.cuda.is_available()
    systems = [("word_kd online", online)]
    for k in args.kd_topk:
        cache = build_teacher_cache(demo.data_bin, "train", demo.teacher, k, out / f"cache-K{k}", cpu=cpu)
        student = out / f"word_kd-K{k}"
        if not (student / "checkpoint_last.pt").is_file() or "done training" not in (student / "train.log").read_text():
            train(demo.data_bin, student, ("--task", "translation_kd", "--teacher-cache", cache,
                                           *student_args("word_kd", demo.profile)),
                  demo.profile.student_updates, f"word_kd K={k}")
        systems.append((f"word_kd cache K={k}", student / "checkpoint_last.pt"))
    names, paths = zip(*systems)
    evaluate(demo.data_bin, paths, demo.out / "data" / f"test.{TGT}", out / "eval", names=names, subset="test",
             spm_model=demo.teacher_dir / "spm.model", bootstrap_samples=demo.profile.bootstrap_samples, cpu=cpu)
    print((out / "eval" / "results.md").read_text(), end="")


if __name__ == "__main__":
    main()
