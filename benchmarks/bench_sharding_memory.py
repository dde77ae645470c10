"""Peak host memory per process of `visual-opsd train` by engine, side by side on one machine.

Peers, each launched with `accelerate launch` on N CPU processes (gloo) running the same 2 steps of
the same config (deterministic rollouts, EMA teacher, AdamW) on a mini model of P parameters:
- `ddp`: data parallel, whole weights, gradients, AdamW state and EMA shadow on every rank (1.0x);
- `fsdp`: FSDP2 (`shard_weights=true`): weights, gradients, AdamW state and shadow sharded;
- `zero1`, `zero2`, `zero3`: DeepSpeed ZeRO stage 1/2/3 (`deepspeed_stage`).
One process (`single`) is printed too.

Each rank reports its resident set after the last step (`memory/rss_gib` in metrics.jsonl: what
it holds between steps) and its peak (`memory/peak_rss_gib`), the largest rank's. Both include the
interpreter, torch and DeepSpeed themselves, so every engine also runs on a very small model, and
the table shows the differences: the memory that grows with the model. Workers run with
MALLOC_MMAP_THRESHOLD_=64 KiB so freed tensors leave the resident set at once. A step gathers the
whole weights for the rollouts under FSDP2 and ZeRO-3 (docs/scale.md), and makes whole gradients
before they are reduced, so their peak includes whole copies on top of the shards.

    python benchmarks/bench_sharding_memory.py                       # P = 96.5 M, 2 processes (~5 min)
    python benchmarks/bench_sharding_memory.py --d-model 256 --layers 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"single": [], "ddp": [], "fsdp": ["shard_weights=true"], "zero1": ["deepspeed_stage=1"],
           "zero2": ["deepspeed_stage=2"], "zero3": ["deepspeed_stage=3"]}
# bytes per parameter each rank holds between steps, for N processes: fp32 weights 4, gradients 4,
# AdamW 8, EMA shadow 4; DeepSpeed also keeps its own fp32 master copy of the weights (4/N; its
# "16-bit" weights are fp32 here). FSDP2 and ZeRO-3 gather the whole weights (+4) during a step.
STATE_BYTES = {"single": lambda n: 20, "ddp": lambda n: 20, "fsdp": lambda n: 20 / n,
               "zero1": lambda n: 12 + 12 / n, "zero2": lambda n: 8 + 16 / n, "zero3": lambda n: 24 / n}


def save_model(path: Path, d_model: int, layers: int) -> int:
    import torch  # noqa: F401  (after argument parsing: --help stays fast)

    from visual_opsd.backends.mini import MiniBackend
    from visual_opsd.tokenizer import build_tokenizer_for_tasks

    backend = MiniBackend.new(build_tokenizer_for_tasks(["maze"], n_per_task=40), seed=0, d_model=d_model,
                              n_layers=layers, n_heads=max(2, d_model // 64), patch_size=4, max_grid=4)
    backend.save(path)
    return sum(p.numel() for p in backend.model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(engine: str, model: Path, out: Path, processes: int, steps: int) -> dict:
    """One training run; its last metrics row plus the wall time."""
    args = [f"init_from={model}", f"out_dir={out}", "progress=false", "threads=1", "data.sizes=[3,4]",
            "data.n_train=16", "data.n_val=2", "rollout.source=data", "eval.every=1000", "eval.max_new_tokens=4",
            f"optim.steps={steps}", f"optim.prompts_per_step={2 * processes}", "save_every=1000", "loss.top_k=null",
            *ENGINES[engine]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    train = ["-m", "visual_opsd.cli", "train", *args]
    if engine == "single":
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *train]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**[r for r in rows if "lr" in r][-1], "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    args = parser.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        n_params = save_model(big, args.d_model, args.layers)
        save_model(small, 32, 2)
        results = {}
        for engine in engines:
            rows = {name: run(engine, model, Path(tmp) / f"{engine}-{name}", args.processes, args.steps)
                    for name, model in (("big", big), ("small", small))}
            results[engine] = {what: (rows["big"][f"memory/{what}_gib"] - rows["small"][f"memory/{what}_gib"]) * 1024
                               for what in ("rss", "peak_rss")} | {"wall": rows["big"]["wall_s"]}
            print(f"{engine}: done ({rows['big']['wall_s']:.0f} s)", file=sys.stderr, flush=True)

    n = args.processes
    print(f"\nmini model: d_model {args.d_model}, {args.layers} layers, P = {n_params / 1e6:.1f} M parameters "
          f"(fp32 weights {4 * n_params / 2**20:.0f} MiB); {n} processes, {args.steps} steps, EMA teacher\n")
    print("Memory that grows with the model, per process (the largest rank), MiB:\n")
    print("| engine | between steps | vs ddp | expected between steps (arithmetic) | peak during a step | vs ddp "
          "| wall s |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("ddp")
    for engine, r in results.items():
        ratio = {k: f"{r[k] / base[k]:.2f}x" if base else "-" for k in ("rss", "peak_rss")}
        state = STATE_BYTES[engine](1 if engine == "single" else n) * n_params / 2**20
        print(f"| {engine} | {r['rss']:.0f} | {ratio['rss']} | {state:.0f} | {r['peak_rss']:.0f} | {ratio['peak_rss']} "
              f"| {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
