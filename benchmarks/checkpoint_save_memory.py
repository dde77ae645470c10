"""Peak host memory of writing `last/` from a sharded run (FSDP2, DeepSpeed ZeRO-2 or ZeRO-3):
gathered to rank 0 (before) vs sharded (DCP).

Both ways save the same state: a mini model of P parameters (fp32) sharded by `--engine` (FSDP2;
ZeRO-2: AdamW's state partitioned; ZeRO-3: everything, in flat partitions), its AdamW state (after
one step) and its EMA teacher's shadow, on 2 gloo CPU processes:
- `gather`: what sharded runs did before sharded checkpoints, and what unsharded runs still do:
  `engine.whole_weights()` + `engine.train_state()` make whole tensors of the weights, the AdamW
  moments and the shadow, and rank 0 writes them (`train.save_train_state`);
- `dcp`: `sharded_checkpoint.save`: every rank writes the shards it holds with
  torch.distributed.checkpoint; nothing is gathered.

Each way runs in fresh processes (`accelerate launch`, workers with MALLOC_MMAP_THRESHOLD_=64 KiB so
freed tensors leave the resident set at once). Each rank measures its resident set (RSS) just before
the save, then samples it every millisecond on a thread while the save runs: the peak increase is
the largest sample minus the baseline. `ru_maxrss` (the peak over the process's life) is printed
too: its increase during the save is a lower bound, zero when the save stayed below an earlier peak
(building the whole model before sharding it).

    python benchmarks/checkpoint_save_memory.py                        # P = 96.5 M (368 MiB fp32), ~1 min
    python benchmarks/checkpoint_save_memory.py --engine zero3         # the same under DeepSpeed ZeRO-3 (or zero2)
    python benchmarks/checkpoint_save_memory.py --d-model 256 --layers 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, out: Path, d_model: int, layers: int, engine: str) -> list[dict]:
    """One save `method` in 2 fresh processes; each rank's measurement."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), __file__, "--worker", method, "--out", str(out),
           "--d-model", str(d_model), "--layers", str(layers), "--engine", engine]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


class PeakRSS:
    """The largest resident set seen while the block runs (sampled on a thread every millisecond)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def worker(method: str, out: Path, d_model: int, layers: int, engine_kind: str) -> None:
    """Build, shard and step a mini model, then save `last/` the `method` way, measuring this rank."""
    import gc
    import resource

    import psutil
    import torch

    from visual_opsd import sharded_checkpoint
    from visual_opsd.backends.mini import MiniBackend
    from visual_opsd.distributed import Dist
    from visual_opsd.engines import TorchEngine, ZeroEngine
    from visual_opsd.teacher import Teacher
    from visual_opsd.tokenizer import build_tokenizer_for_tasks
    from visual_opsd.train import TrainOptimConfig, save_train_state

    torch.set_num_threads(1)
    dist = Dist.create()
    backend = MiniBackend.new(build_tokenizer_for_tasks(["maze"], n_per_task=40), seed=0, d_model=d_model,
                              n_layers=layers, n_heads=max(2, d_model // 64), patch_size=4, max_grid=4)
    n_params = sum(p.numel() for p in backend.model.parameters())
    model_dir = out / "init"
    if dist.is_main and method == "dcp":
        backend.save(model_dir)  # the folder a sharded checkpoint records as the run's init_from (unsharded)
    if engine_kind.startswith("zero"):
        engine = ZeroEngine(dist, backend.model, TrainOptimConfig(), int(engine_kind[-1]), micro_batch=1)
    else:
        engine = TorchEngine(dist, backend.model, TrainOptimConfig(), sharded=True)
    teacher = Teacher(backend.model, "ema", 0.5, layout=engine.layout)
    # one AdamW step on zero gradients: its state exists, shaped as in training
    engine.layout.gather()
    engine.backward(sum((p * 0).sum() for p in engine.params), last=True)
    engine.step(loss_finite=True)
    teacher.update()
    dist.barrier()
    gc.collect()
    base_rss = psutil.Process().memory_info().rss
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = {"step": 1, "best": -1.0, "best_step": None, "bad_steps": 0}
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        if method == "gather":  # train.save_last before sharded checkpoints
            with engine.whole_weights() as weights:
                if engine_kind.startswith("zero"):
                    whole = _zero_train_state(engine, teacher, dist.is_main)
                else:
                    whole = engine.train_state(teacher, dist.is_main)
                if whole is not None:
                    save_train_state(out / "last", backend, weights, whole, state)
        else:
            sharded_checkpoint.save(out / "last", engine, teacher, dist, model_dir, None, state)
        dist.barrier()
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (out / "last").rglob("*") if f.is_file())
    result = {"rank": dist.rank, "params": n_params, "base_rss": base_rss, "peak_rss": peak.peak,
              "increase": peak.peak - base_rss,
              "maxrss_increase": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_max,
              "wall_s": wall, "bytes": size}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    dist.close()


def _zero_train_state(engine, teacher, is_main: bool) -> dict | None:
    """What ZeRO runs saved before sharded checkpoints: AdamW's state gathered from DeepSpeed's
    partitions into whole tensors on every rank (`safe_get_full_optimizer_state`, a collective), the
    teacher's whole shadow; rank 0 writes them."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = engine._adam_step()
    state = {i: {"step": step.detach().clone().cpu(),
                 **{k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in ("exp_avg", "exp_avg_sq")}}
             for i, p in enumerate(engine.params)}
    shadow = teacher.state_dict()
    if not is_main:
        return None
    return {"optimizer": {"state": state, "param_groups": engine.param_groups()}, "teacher": shadow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--engine", choices=["fsdp", "zero2", "zero3"], default="fsdp",
                        help="how the run shards the model: FSDP2 or DeepSpeed ZeRO-2/3 (default fsdp)")
    parser.add_argument("--worker", choices=["gather", "dcp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.out), args.d_model, args.layers, args.engine)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("gather", "dcp"):
            results[method] = launch(method, Path(tmp) / method, args.d_model, args.layers, args.engine)
            print(f"{method}: done", file=sys.stderr, flush=True)
    n = results["gather"][0]["params"]
    print(f"\nmini model: d_model {args.d_model}, {args.layers} layers, P = {n / 1e6:.1f} M parameters; fp32 weights "
          f"{4 * n / MIB:.0f} MiB; last/ holds weights + AdamW (2x) + EMA shadow = {16 * n / MIB:.0f} MiB; "
          f"{'FSDP2' if args.engine == 'fsdp' else 'DeepSpeed ZeRO-' + args.engine[-1]} over 2 gloo processes\n")
    print("| save | rank | RSS before (MiB) | peak during the save (MiB) | increase (MiB) | ru_maxrss increase (MiB) "
          "| wall s | written (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rows in results.items():
        for r in rows:
            print(f"| {method} | {r['rank']} | {r['base_rss'] / MIB:.0f} | {r['peak_rss'] / MIB:.0f} | "
                  f"{r['increase'] / MIB:.0f} | {r['maxrss_increase'] / MIB:.0f} | {r['wall_s']:.1f} | "
                  f"{r['bytes'] / MIB:.0f} |")
    worst = {m: max(r["increase"] for r in rows) for m, rows in results.items()}
    print(f"\nlargest per-rank increase: gather {worst['gather'] / MIB:.0f} MiB, dcp {worst['dcp'] / MIB:.0f} MiB; "
          f"gather / dcp = {worst['gather'] / max(worst['dcp'], 1):.1f}x")


if __name__ == "__main__":
    main()
