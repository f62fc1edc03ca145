"""Forward+backward of the TIE-KD loss terms: ``tie_kd_terms`` against the naive dense formulation.

The naive one is the math written the straightforward way (two softmaxes,
log(p + 1e-6) for both sides, dense products), as in the published code. Each
runs in its own process, so peak memory is its own: CUDA max allocated, or on
CPU the peak resident set size above what the inputs already hold.

    python benchmarks/loss_kernel.py [--positions 4096] [--vocab 32000] [--k 5] [--device cpu]

The last line reads ``loss_kernel: time_ratio=... mem_ratio=... (ours/naive)``.
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
from tiekd import hierarchical_ranking_loss, kl_divergence, tie_kd_terms  # noqa: E402

import peak_memory  # noqa: E402


def naive_terms(student_logits, teacher_logits, k):
    p = torch.softmax(student_logits.float(), dim=-1)
    q = torch.softmax(teacher_logits.float(), dim=-1).detach()
    kl = (q * (torch.log(q + 1e-6) - torch.log(p + 1e-6))).sum(dim=-1)
    a = q.topk(k, dim=-1).indices
    b = p.topk(k, dim=-1).indices
    p_a, p_b, q_a, q_b = p.gather(-1, a), p.gather(-1, b), q.gather(-1, a), q.gather(-1, b)
    outranks = (q_a.unsqueeze(-1) > q_b.unsqueeze(-2)).float()
    r_topk = (outranks * (p_b.unsqueeze(-2) - p_a.unsqueeze(-1)).clamp(min=0)).sum(dim=(-2, -1))
    r_top1 = (p_a[..., 1:] - p_a[..., :1]).clamp(min=0).sum(dim=-1)
    return kl, r_top1 + r_topk


IMPLEMENTATIONS = {"ours": lambda s, t, k: tie_kd_terms(s, t, k), "naive": naive_terms}


def check_exact(k=5):
    """Ours against exact float64 math (log-softmax, no epsilon) at a small size, value and gradient."""
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(64, 500, generator=gen) * 4).requires_grad_()
    t = torch.randn(64, 500, generator=gen) * 4
    kl, rank = tie_kd_terms(s, t, k)
    s64 = s.detach().double().requires_grad_()
    ref_kl = kl_divergence(torch.log_softmax(s64, -1), torch.log_softmax(t.double(), -1))
    ref_rank = hierarchical_ranking_loss(torch.softmax(s64, -1), torch.softmax(t.double(), -1), k)
    (kl.sum() + rank.sum()).backward()
    (ref_kl.sum() + ref_rank.sum()).backward()
    errors = {
        "kl": (kl.double() - ref_kl).abs().max().item(),
        "rank": (rank.double() - ref_rank).abs().max().item(),
        "grad": (s.grad.double() - s64.grad).abs().max().item(),
    }
    if max(errors.values()) > 1e-4:
        raise SystemExit(f"loss_kernel: tie_kd_terms differs from float64 math: {errors}")
    return errors


def measure(name, positions, vocab, k, device, repeats):
    """Run in a fresh process: median seconds and peak bytes of one forward+backward."""
    gen = torch.Generator(device=device).manual_seed(1)
    s = (torch.randn(positions, vocab, device=device, generator=gen) * 3).requires_grad_()
    t = torch.randn(positions, vocab, device=device, generator=gen) * 3
    fn = IMPLEMENTATIONS[name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(s, t, k)  # warm-up
    s.grad = None
    baseline = peak_memory.start(device)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        kl, rank = fn(s, t, k)
        (kl.sum() + rank.sum()).backward()
        sync()
        times.append(time.perf_counter() - start)
        del kl, rank
        s.grad = None
    return {"seconds": statistics.median(times), "peak_bytes": peak_memory.peak_since(device, baseline)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=4096, help="B*T positions")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.positions, args.vocab, args.k, args.device, args.repeats)))
        return
    errors = check_exact(args.k)
    print(f"exactness vs float64 (max abs error): {errors}")
    results = {}
    for name in IMPLEMENTATIONS:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--positions", str(args.positions), "--vocab",
             str(args.vocab), "--k", str(args.k), "--device", args.device, "--repeats", str(args.repeats)],
            check=True, capture_output=True, text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        seconds, peak = results[name]["seconds"], results[name]["peak_bytes"]
        print(f"{name:>6}: {seconds * 1000:8.1f} ms  peak {peak / 2**20:8.1f} MiB")
    print(f"device={args.device} positions={args.positions} vocab={args.vocab} k={args.k} fp32 fwd+bwd")
    time_ratio = results["ours"]["seconds"] / results["naive"]["seconds"]
    mem_ratio = results["ours"]["peak_bytes"] / results["naive"]["peak_bytes"]
    print(f"loss_kernel: time_ratio={time_ratio:.2f} mem_ratio={mem_ratio:.2f} (ours/naive)")


if __name__ == "__main__":
    main()
