"""The loss from features against the loss from whole logits: forward + backward of the output layer and loss.

    python benchmarks/feature_loss.py [--positions 4096] [--vocab 32000] [--chunk 1024] [--device cpu]

Four arms, each in its own process (peak memory: CUDA max allocated, or on CPU the
peak resident set size above the inputs): fairseq's label-smoothed CE from the
whole logits; the same CE from features (``FeatureLoss`` without a teacher); the
whole TIE-KD loss (CE + KL + ranking, the teacher's logits made from its features)
from features; and the same from whole logits (``tie_kd_terms``). Student width
512, teacher 512 unless ``--teacher-width``, k 5, fp32, median of 5 after one warm-up. The last lines print
each ratio with its target.
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
from tiekd import FeatureLoss, tie_kd_terms  # noqa: E402

import peak_memory  # noqa: E402

WIDTH, EPS, K = 512, 0.1, 5


def _label_smoothed_ce(lprobs, target):
    """fairseq's label_smoothed_nll_loss, summed (imported here so the arms without fairseq stay without it)."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    return label_smoothed_nll_loss(lprobs, target, EPS, ignore_index=-1)[0]


def dense_ce(h, w, th, tw, target, chunk):
    return _label_smoothed_ce(torch.log_softmax((h @ w.T).float(), dim=-1), target)


def features_ce(h, w, th, tw, target, chunk):
    step = FeatureLoss(w, ce_weight=1.0, kd_weight=0.0, label_smoothing=EPS, k=K, temperature=1.0, rank_weight=0.0,
                       pad=-1, max_rows=chunk)
    return step.loss(step.add_pass(h, None, None, target, torch.ones_like(target, dtype=torch.bool), True).ce)


def features_kd(h, w, th, tw, target, chunk):
    step = FeatureLoss(w, ce_weight=0.5, kd_weight=0.5, label_smoothing=EPS, k=K, temperature=1.0, rank_weight=1.0,
                       pad=-1, max_rows=chunk)
    stats = step.add_pass(h, th, tw, target, torch.ones_like(target, dtype=torch.bool), True)
    return step.loss(0.5 * stats.ce + 0.5 * (stats.kl + stats.rank))


def dense_kd(h, w, th, tw, target, chunk):
    s = h @ w.T
    ce = _label_smoothed_ce(torch.log_softmax(s.float(), dim=-1), target)
    kl, rank = tie_kd_terms(s, th @ tw.T, K)
    return 0.5 * ce + 0.5 * (kl + rank).sum()


ARMS = {"CE, whole logits (fairseq)": dense_ce, "CE from features": features_ce,
        "TIE-KD from features": features_kd, "TIE-KD, whole logits": dense_kd}
# (numerator, denominator, measure, target)
TARGETS = [
    ("CE from features", "CE, whole logits (fairseq)", "seconds", 1.0),
    ("TIE-KD from features", "CE from features", "seconds", 1.4),
    ("TIE-KD from features", "TIE-KD, whole logits", "seconds", 1.0),
    ("TIE-KD from features", "CE, whole logits (fairseq)", "peak_bytes", 1.0),
]


def measure(arm, positions, vocab, chunk, teacher_width, device, repeats=5):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(positions, WIDTH, generator=gen).to(device).requires_grad_()
    w = (torch.randn(vocab, WIDTH, generator=gen) / WIDTH**0.5).to(device).requires_grad_()
    th = torch.randn(positions, teacher_width, generator=gen).to(device)
    tw = (torch.randn(vocab, teacher_width, generator=gen) / teacher_width**0.5).to(device)
    target = torch.randint(4, vocab, (positions,), generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn = ARMS[arm]
    baseline = peak_memory.start(device)
    times = []
    for i in range(repeats + 1):
        h.grad = w.grad = None
        sync()
        start = time.perf_counter()
        fn(h, w, th, tw, target, chunk).backward()
        sync()
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": peak_memory.peak_since(device, baseline)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--teacher-width", type=int, default=WIDTH,
                        help=f"the teacher's width (default {WIDTH}, the student's: the 4/3 matrix-product bound; "
                             "a wider teacher adds its share of products)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.positions, args.vocab, args.chunk, args.teacher_width,
                                 args.device)))
        return
    results = {}
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, "--worker", arm, "--positions", str(args.positions),
                              "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--device", args.device,
                              "--teacher-width", str(args.teacher_width)],
                             check=True, capture_output=True, text=True).stdout
        results[arm] = json.loads(out.strip().splitlines()[-1])
    print(f"feature_loss: {args.positions} positions x {args.vocab} vocabulary, chunk {args.chunk}, d {WIDTH} / "
          f"teacher {args.teacher_width}, fp32, {args.device}, forward+backward, median of 5")
    print("| arm | ms | peak MiB |\n|---|---:|---:|")
    for arm, r in results.items():
        print(f"| {arm} | {r['seconds'] * 1000:.1f} | {r['peak_bytes'] / 2**20:.1f} |")
    for over, under, key, target in TARGETS:
        value = results[over][key] / results[under][key]
        what = "memory" if key == "peak_bytes" else "time"
        print(f"feature_loss: {over} / {under} {what} ratio={value:.2f} target<={target:.2f} "
              f"{'met' if value <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
