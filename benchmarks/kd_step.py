"""Full training steps (forward, backward, optimizer) of a student under each criterion, on a fixed batch.

    python benchmarks/kd_step.py [--preset small|small-32k|base-big] [--fp16] [--rounds R] [--json FILE]

Each criterion runs in its own process: median step time after warm-up, target
tokens per second, peak memory (CUDA max allocated; on CPU the peak resident
set size above what the models and batch already hold), and each ratio against
``ce``; the ``logits`` rows are ``--kd-path logits``, the reference the default
features path is compared with. Models are built from fairseq's own architectures with random weights
and a random batch: speed does not depend on what the weights know. ``word_kd
cached`` reads the teacher's top-8 for the batch from memory instead of running
the teacher, as ``--teacher-cache`` does from a memory-mapped file (the file
read is not timed). On a shared machine, ``--rounds R`` runs every criterion R
times, round-robin, and keeps each one's fastest round: the least disturbed.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peak_memory  # noqa: E402


def transformer(layers, width, heads, ffn=4):
    """fairseq flags of a Transformer: ``layers`` + ``layers`` layers of ``width``, FFN ``ffn`` x wider, ``heads``."""
    return ["--arch", "transformer", "--encoder-layers", str(layers), "--decoder-layers", str(layers),
            "--encoder-embed-dim", str(width), "--decoder-embed-dim", str(width),
            "--encoder-ffn-embed-dim", str(ffn * width), "--decoder-ffn-embed-dim", str(ffn * width),
            "--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads)]


PRESETS = {
    # A CPU-sized pair: 2+2 layers d256 student, 3+3 layers d512 teacher, 8k vocabulary.
    "small": {"student": transformer(2, 256, 4), "teacher": transformer(3, 512, 8),
              "vocab": 8000, "sentences": 32, "length": 24},
    # The small pair at a 32k vocabulary and 2048 target positions: where the logits are most of a step.
    "small-32k": {"student": transformer(2, 256, 4), "teacher": transformer(3, 512, 8),
                  "vocab": 32000, "sentences": 64, "length": 32},
    # A 256k vocabulary (multilingual teachers' size) with small widths: what fits on a 24 GB CPU machine.
    "tiny-256k": {"student": transformer(1, 64, 2, ffn=2), "teacher": transformer(1, 128, 2, ffn=2),
                  "vocab": 256000, "sentences": 32, "length": 32, "kd_flags": ["--kd-chunk-size", "128"]},
    # The paper's pair: Transformer-base student, Transformer-big teacher, 32k vocabulary (for CUDA).
    "base-big": {"student": ["--arch", "transformer"], "teacher": ["--arch", "transformer_vaswani_wmt_en_de_big"],
                 "vocab": 32000, "sentences": 128, "length": 32},
}
CRITERIA = {
    "ce": ["--criterion", "label_smoothed_cross_entropy"],
    "word_kd": ["--criterion", "word_kd"],
    "tie_kd N=1": ["--criterion", "tie_kd", "--kd-iterations", "1"],
    "tie_kd N=3": ["--criterion", "tie_kd", "--kd-iterations", "3"],
    "tie_kd N=1 logits": ["--criterion", "tie_kd", "--kd-iterations", "1", "--kd-path", "logits"],
    "tie_kd N=3 logits": ["--criterion", "tie_kd", "--kd-iterations", "3", "--kd-path", "logits"],
    "word_kd cached": ["--criterion", "word_kd"],
}
# (numerator, denominator, measure, target): memory of the features path against CE, and its time
# against the logits path it replaces.
TARGETS = [
    ("tie_kd N=1", "ce", "peak_bytes", 1.0),
    ("tie_kd N=3", "ce", "peak_bytes", 1.3),
    ("tie_kd N=3", "tie_kd N=3 logits", "seconds", 1.0),
    ("tie_kd N=1", "tie_kd N=1 logits", "seconds", 1.0),
]
CACHE_K = 8


class _PrecomputedCache:
    """The teacher's top-K for the fixed batch, served like ``TeacherCache.batch`` (from memory, not disk)."""

    def __init__(self, teacher, sample, k):
        lprobs = teacher.gold_prefix_lprobs(sample["net_input"]).float()
        top, ids = lprobs.topk(k, dim=-1)
        tail = torch.logsumexp(lprobs.scatter(-1, ids, float("-inf")), dim=-1)
        self.tensors = [t.cpu() for t in (ids, top, tail)]

    def batch(self, sample_ids, target_length, pad):
        return [t.clone() for t in self.tensors]


def _build(preset, name, device, fp16):
    """Task, student, criterion and a fixed batch, as fairseq-train builds them from flags."""
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models import build_model

    from tiekd_fairseq.frozen_model import FrozenModel
    from tiekd_fairseq.tasks.translation_kd import TranslationKDTask

    spec = PRESETS[preset]
    dictionary = Dictionary()
    for i in range(spec["vocab"] - len(dictionary)):
        dictionary.add_symbol(f"w{i}")

    def parse(arch_flags):
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [
            "unused", "--user-dir", str(Path(__file__).resolve().parents[1] / "tiekd_fairseq"),
            "--task", "translation_kd", "--share-all-embeddings", "--label-smoothing", "0.1",
            *arch_flags, *CRITERIA[name], *(spec.get("kd_flags", []) if name != "ce" else []),
        ])
        return convert_namespace_to_omegaconf(args)

    cfg = parse(spec["student"])
    task = TranslationKDTask(cfg.task, dictionary, dictionary)
    torch.manual_seed(0)
    dtype = torch.float16 if fp16 else torch.float32
    student = task.build_model(cfg.model).to(device=device, dtype=dtype)
    task.teacher = FrozenModel(build_model(parse(spec["teacher"]).model, task).to(device=device, dtype=dtype))
    criterion = task.build_criterion(cfg.criterion)
    gen = torch.Generator().manual_seed(1)
    n, length = spec["sentences"], spec["length"]
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (n, length), generator=gen)
    target = torch.cat([tokens[:, 1:], torch.full((n, 1), dictionary.eos())], dim=1)
    sample = {
        "net_input": {
            "src_tokens": tokens.to(device), "src_lengths": torch.full((n,), length, device=device),
            "prev_output_tokens": torch.cat([torch.full((n, 1), dictionary.eos()), target[:, :-1]], 1).to(device),
        },
        "target": target.to(device), "ntokens": n * length, "nsentences": n, "id": torch.arange(n),
    }
    if name.endswith("cached"):
        task.teacher_cache = _PrecomputedCache(task.teacher, sample, CACHE_K)
        task.teacher = None  # one pass: the cache is the whole teacher
    return student, criterion, sample


def measure(preset, name, device, fp16, steps, warmup):
    student, criterion, sample = _build(preset, name, device, fp16)
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4, eps=1e-4 if fp16 else 1e-8)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss, sample_size, _ = criterion(student, sample)
        (loss / sample_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The peak window starts before the warm-up: on CPU the allocator keeps what the first
    # steps took, so a window that starts after them would miss the growth.
    baseline = peak_memory.start(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_s": sample["ntokens"] / seconds,
            "peak_bytes": peak_memory.peak_since(device, baseline)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="student and teacher in fp16 (CUDA)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every criterion this many times, round-robin, and keep each one's fastest")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--criteria", nargs="+", choices=sorted(CRITERIA), default=list(CRITERIA),
                        help="the criteria to run (default: all)")
    parser.add_argument("--worker", choices=sorted(CRITERIA), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.preset, args.worker, args.device, args.fp16, args.steps, args.warmup)))
        return
    results = {}
    criteria = ["ce", *(name for name in args.criteria if name != "ce")]  # ce: every ratio's denominator
    for _ in range(args.rounds):
        for name in criteria:
            cmd = [sys.executable, __file__, "--worker", name, "--preset", args.preset, "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *(["--fp16"] if args.fp16 else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # out of memory, say: the table says so
                results.setdefault(name, {"failed": proc.stderr.strip().splitlines()[-1:] or [str(proc.returncode)]})
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if "seconds" not in results.get(name, {}) or result["seconds"] < results[name]["seconds"]:
                results[name] = result
    ce = results["ce"]
    print(f"kd_step: preset={args.preset} device={args.device} {'fp16' if args.fp16 else 'fp32'} "
          f"steps={args.steps} (median after {args.warmup} warm-up; fastest of {args.rounds} rounds)")
    print("| criterion | step ms | target tok/s | peak MiB | time vs ce | memory vs ce |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | failed: {r['failed'][0][:80]} | | | | |")
            continue
        print(f"| {name} | {r['seconds'] * 1000:.1f} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{r['seconds'] / ce['seconds']:.2f} | {r['peak_bytes'] / ce['peak_bytes']:.2f} |")
    if "word_kd" in results and "word_kd cached" in results:
        ratio = results["tie_kd N=1"]["seconds"] / results["word_kd"]["seconds"]
        cached = results["word_kd cached"]["tokens_per_s"] / ce["tokens_per_s"]
        print(f"kd_step: tie_kd_N1/word_kd time_ratio={ratio:.2f} word_kd_cached/ce throughput_ratio={cached:.2f}")
    for over, under, measure_key, target in TARGETS:
        if measure_key not in results.get(over, {}) or measure_key not in results.get(under, {}):
            continue
        value = results[over][measure_key] / results[under][measure_key]
        what = "memory" if measure_key == "peak_bytes" else "time"
        print(f"kd_step: {over} / {under} {what} ratio={value:.2f} target<={target:.2f} "
              f"{'met' if value <= target else 'MISSED'}")
    if args.json:
        from tiekd_cli.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"preset": args.preset, "device": args.device, "fp16": args.fp16,
                                                 "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
