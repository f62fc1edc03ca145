"""The GPU benchmark of the loss from features (about 8 minutes on one GPU); on a CPU-only machine it says so.

    python benchmarks/gpu_feature_loss.py [--json FILE]

1. The loss alone, forward and backward, at 4096 and 16384 positions, 40k vocabulary,
   d 512 (student) and 1024 (teacher), fp32 and bf16: ``FeatureLoss`` (CE + KL +
   ranking), the dense path (logits, ``tie_kd_terms``, fairseq's CE), and where they
   install, Liger-Kernel's fused linear JSD at beta 0 (forward KL, no CE, no ranking)
   and Cut Cross-Entropy (CE alone). Median time and peak CUDA memory above the inputs.
2. A chunk-size sweep of ``FeatureLoss`` at 16384 positions: where small chunks
   become launch-bound.
3. Full training steps, Transformer-base student and big teacher, N = 1 and 3, features
   and logits paths: ``kd_step.py --preset base-big --fp16``.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiekd import FeatureLoss, tie_kd_terms  # noqa: E402

VOCAB, WIDTH, TEACHER_WIDTH = 40000, 512, 1024


def _inputs(positions, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(positions, WIDTH, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(VOCAB, WIDTH, device="cuda", dtype=dtype, generator=gen) / WIDTH**0.5).requires_grad_()
    th = torch.randn(positions, TEACHER_WIDTH, device="cuda", dtype=dtype, generator=gen)
    tw = torch.randn(VOCAB, TEACHER_WIDTH, device="cuda", dtype=dtype, generator=gen) / TEACHER_WIDTH**0.5
    target = torch.randint(4, VOCAB, (positions,), device="cuda", generator=gen)
    return h, w, th, tw, target


def _features(h, w, th, tw, target, chunk=1024):
    step = FeatureLoss(w, ce_weight=0.5, kd_weight=0.5, label_smoothing=0.1, k=5, temperature=1.0, rank_weight=1.0,
                       pad=1, max_rows=chunk)
    stats = step.add_pass(h, th, tw, target, torch.ones_like(target, dtype=torch.bool), with_ce=True)
    return step.loss(0.5 * stats.ce + 0.5 * (stats.kl + stats.rank))


def _dense(h, w, th, tw, target):
    s = h @ w.T
    lprobs = torch.log_softmax(s.float(), dim=-1)
    ce = torch.nn.functional.nll_loss(lprobs, target, reduction="sum")
    kl, rank = tie_kd_terms(s, th @ tw.T, 5)
    return 0.5 * ce + 0.5 * (kl + rank).sum()


def _liger(h, w, th, tw, target):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=0.0)(h, w, th, tw)


def _cce(h, w, th, tw, target):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, target, reduction="sum")


def _time(fn, inputs, repeats=5):
    """(median ms, peak MiB above the inputs) of forward + backward; None if the implementation is missing."""
    try:
        fn(*inputs).backward()
    except ImportError:
        return None
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_feature_loss: no CUDA device here; this benchmark runs on a GPU only")
        return
    results = {"loss": [], "chunks": [], "device": torch.cuda.get_device_name()}
    print(f"gpu_feature_loss: {results['device']}, vocabulary {VOCAB}, d {WIDTH} / teacher {TEACHER_WIDTH}")
    print("| positions | dtype | implementation | ms | peak MiB |\n|---:|---|---|---:|---:|")
    implementations = {"features (CE+KL+rank)": _features, "dense (CE+KL+rank)": _dense,
                       "Liger fused linear JSD beta 0 (KL)": _liger, "Cut Cross-Entropy (CE)": _cce}
    for positions in (4096, 16384):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = _inputs(positions, dtype)
            for name, fn in implementations.items():
                measured = _time(fn, inputs)
                if measured is None:
                    print(f"| {positions} | {dtype} | {name} | not installed | |")
                    continue
                results["loss"].append({"positions": positions, "dtype": str(dtype), "name": name,
                                        "ms": measured[0], "peak_mib": measured[1]})
                print(f"| {positions} | {dtype} | {name} | {measured[0]:.1f} | {measured[1]:.0f} |")
            del inputs
            torch.cuda.empty_cache()
    print("| chunk | ms | peak MiB |\n|---:|---:|---:|")
    inputs = _inputs(16384, torch.bfloat16)
    for chunk in (128, 256, 512, 1024, 2048, 4096, 8192):
        ms, mib = _time(lambda *a, c=chunk: _features(*a, chunk=c), inputs)
        results["chunks"].append({"chunk": chunk, "ms": ms, "peak_mib": mib})
        print(f"| {chunk} | {ms:.1f} | {mib:.0f} |")
    del inputs
    torch.cuda.empty_cache()
    subprocess.run([sys.executable, str(Path(__file__).with_name("kd_step.py")), "--preset", "base-big", "--fp16",
                    "--steps", "5", "--warmup", "2"], check=True)
    if args.json:
        from tiekd_cli.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
