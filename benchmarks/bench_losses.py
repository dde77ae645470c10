"""Benchmark: generalized JSD forward + backward, TRL vs our plain vs our fused implementation.

Each candidate computes the loss of `tokens` completion positions from the same hidden states
(student and teacher, (N, H)) and the same output head (V, H), then backpropagates into the
student hidden states and the head:

  trl    TRL's GKDTrainer.generalized_jsd_loss on materialised logits (dev-only reference; with
         top-k, both logit tensors are first gathered at the teacher's top-k ids, as the Visual-OPSD
         reference code does). Computing the logits is part of its time and memory.
  plain  visual_opsd.losses.generalized_jsd on the same materialised logits.
  fused  visual_opsd.losses.fused_linear_generalized_jsd from the hidden states (never
         materialises (tokens x vocab) logits).

Every candidate runs in a fresh subprocess. Peak memory = peak RSS (getrusage ru_maxrss) minus
the RSS once the inputs exist; tracemalloc cannot see torch's allocations. Time = median over
`--repeats` timed iterations after one warm-up iteration.

    .venv/bin/python benchmarks/bench_losses.py                     # full size (~16 min, TRL ~20 GiB)
    .venv/bin/python benchmarks/bench_losses.py --vocab 4096 --tokens 256 --hidden 64 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

CANDIDATES = ("trl", "plain", "fused")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _trl_loss_fn():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    for module in ("trl.trainer.gkd_trainer", "trl.experimental.gkd.gkd_trainer"):
        try:
            return importlib.import_module(module).GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    raise ImportError("TRL's GKDTrainer.generalized_jsd_loss was not found")


def worker(args: argparse.Namespace) -> dict:
    """Run one candidate in this process and return its measurements."""
    import torch

    from visual_opsd.losses import fused_linear_generalized_jsd, generalized_jsd

    trl_jsd = _trl_loss_fn() if args.worker == "trl" else None
    top_k = args.top_k or None
    gen = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    # logits with a standard deviation of about 2, teacher close to but not equal to the student
    student_hidden = torch.randn(n, h, generator=gen).requires_grad_()
    teacher_hidden = torch.randn(n, h, generator=gen).mul_(0.5).add_(student_hidden.detach())
    weight = torch.randn(v, h, generator=gen).mul_(2.0 / h**0.5).requires_grad_()  # in place: no 2x peak
    torch.ones(8, 8).sum()  # start torch's thread pool before taking the baseline

    def step() -> float:
        if args.worker == "fused":
            loss = fused_linear_generalized_jsd(
                student_hidden, teacher_hidden, weight, beta=args.beta, top_k=top_k, chunk_size=args.chunk_size
            )
        else:
            student_logits = student_hidden @ weight.t()
            with torch.no_grad():
                teacher_logits = teacher_hidden @ weight.t()
            if args.worker == "plain":
                loss = generalized_jsd(student_logits, teacher_logits, beta=args.beta, top_k=top_k)
            else:
                if top_k is not None:  # the reference code's top-k restriction, outside TRL
                    ids = teacher_logits.topk(top_k, dim=-1).indices
                    student_logits = student_logits.gather(-1, ids)
                    teacher_logits = teacher_logits.gather(-1, ids)
                loss = trl_jsd(student_logits, teacher_logits, beta=args.beta, reduction="batchmean")
            del student_logits, teacher_logits
        loss.backward()
        value = float(loss)
        student_hidden.grad = None
        weight.grad = None
        return value

    baseline_rss = _rss_bytes()
    baseline_max = _max_rss_bytes()
    times, value = [], float("nan")
    for i in range(1 + args.repeats):
        start = time.perf_counter()
        value = step()
        if i > 0:  # the first iteration is a warm-up
            times.append(time.perf_counter() - start)
    peak = _max_rss_bytes()
    return {
        "candidate": args.worker,
        "top_k": top_k,
        "loss": value,
        "time_s": statistics.median(times),
        "time_min_s": min(times),
        "peak_extra_bytes": peak - baseline_rss,
        # if the pre-baseline peak was above the baseline RSS the extra peak is underestimated
        "baseline_gap_bytes": baseline_max - baseline_rss,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--top-k", type=int, default=256, help="the top-k of the second set of rows")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: auto)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset")
    parser.add_argument("--worker", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    common = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens)]
    common += ["--repeats", str(args.repeats), "--beta", str(args.beta)]
    if args.chunk_size:
        common += ["--chunk-size", str(args.chunk_size)]
    print(
        f"generalized JSD (beta={args.beta}) forward+backward: vocab={args.vocab} hidden={args.hidden} "
        f"tokens={args.tokens}, float32, CPU, median of {args.repeats} after 1 warm-up, fresh process each"
    )
    results = {}
    for top_k in (0, args.top_k):
        for name in args.candidates.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--top-k", str(top_k), *common]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} top_k={top_k or None} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[(name, top_k)] = json.loads(proc.stdout.strip().splitlines()[-1])

    # every candidate must hold the float32 gradients of the head (V, H) and hidden states (N, H)
    grads = 4 * (args.vocab + args.tokens) * args.hidden
    print(f"{'candidate':<10}{'top_k':>7}{'time s':>10}{'min s':>9}{'peak MiB':>11}{'- grads':>10}{'loss':>14}")
    for (name, top_k), r in results.items():
        gap = r["baseline_gap_bytes"]
        note = f"  (baseline gap {gap / 2**20:.0f} MiB)" if gap > 2**24 else ""
        print(
            f"{name:<10}{str(top_k or None):>7}{r['time_s']:>10.3f}{r['time_min_s']:>9.3f}"
            f"{r['peak_extra_bytes'] / 2**20:>11.1f}{(r['peak_extra_bytes'] - grads) / 2**20:>10.1f}"
            f"{r['loss']:>14.6f}{note}"
        )
    print(f"'- grads': peak minus the {grads / 2**20:.1f} MiB of float32 gradients that every candidate returns")
    for top_k in (0, args.top_k):
        fused, trl = results.get(("fused", top_k)), results.get(("trl", top_k))
        if fused and trl:
            mem = fused["peak_extra_bytes"] / trl["peak_extra_bytes"]
            floor = grads / trl["peak_extra_bytes"]
            work = (fused["peak_extra_bytes"] - grads) / (trl["peak_extra_bytes"] - grads)
            tim = fused["time_s"] / trl["time_s"]
            print(
                f"fused/TRL top_k={top_k or None}: memory {mem:.3f} (target <= 0.125; the gradients alone are "
                f"{floor:.3f}), memory - grads {work:.3f}, time {tim:.3f} (target <= 1.0)"
            )


if __name__ == "__main__":
    main()
