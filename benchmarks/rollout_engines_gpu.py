"""Rollout engines on one GPU with a real vision-language student: native vs vLLM, multimodal path.

Not run in this repository (no GPU here). On a GPU machine with CUDA torch, torchvision and vLLM:

    pip install -e '.[hf,vllm-gpu]'
    python benchmarks/rollout_engines_gpu.py --model Qwen/Qwen2.5-VL-7B-Instruct
    python benchmarks/rollout_engines_gpu.py --model /path/to/a/saved/model --prompts 32 --new-tokens 512

It opens the model with the HF backend (bf16, on cuda), builds the student contexts of maze
prompts (question + problem image, the chat template's image placeholders expanded by the
processor) and, side by side in one process:

1. throughput: completion tokens per second of the native engine (`HFBackend.sample`, sampling on
   the device) and of the vLLM engine (`rollout_engines.VLLMEngine`: the same ids with the problem
   images as `multi_modal_data`), interleaved over `--repeats` rounds after a warm-up (vLLM's
   start-up printed apart); temperature 1, no top-k / top-p, each row to end-of-sequence or
   `--new-tokens`, so both engines' rows end by the same rule;
2. log-prob agreement: each engine's per-token log-probs of its own samples against the training
   backend's scores of the same ids (`Backend.score`, bf16, log-softmax without the suppressed ids):
   max and mean |difference| and the share of tokens within 0.05 nats, then the same after a weight
   update (every weight nudged, `weights_changed`, sampled again).

Prints a markdown table of both. If vLLM cannot take the expanded image placeholders of a context
for this model, the error is printed and the native figures stand alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from visual_opsd.backends.base import token_logprobs
from visual_opsd.backends.hf import HFBackend
from visual_opsd.backends.hf_config import HFOptions
from visual_opsd.rollout import collect_rollout
from visual_opsd.rollout_engines import NativeEngine, VLLMEngine
from visual_opsd.tasks import get_task


def model_folder(name: str) -> Path:
    """A local folder, or a Hub id's snapshot (downloaded on first use)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name))


def agreement(backend, contexts, rollout) -> dict[str, float]:
    """|engine log-prob - training score| over the sampled ids of `rollout`."""
    gaps = []
    with torch.no_grad():
        for i in range(0, len(rollout.ids), 4):  # a few rows at a time: logits are rows x T x V
            ids = rollout.ids[i : i + 4]
            scores = backend.score(contexts[i // rollout.n : (i + 4) // rollout.n], ids)
            for r, row in enumerate(ids):
                ref = token_logprobs(scores.logits[r, : len(row)], torch.tensor(row), 1.0, backend.suppressed_ids)
                for lp, want, s in zip(rollout.logprobs[i + r], ref.tolist(), rollout.sampled[i + r], strict=True):
                    if s:
                        gaps.append(abs(lp - want))
    g = torch.tensor(gaps)
    return {"max": float(g.max()), "mean": float(g.mean()), "within_0.05": float((g <= 0.05).float().mean()),
            "tokens": len(gaps)}


def timed(engine, backend, samples, contexts, args, seed):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ro = collect_rollout(backend, samples, contexts, n=1, max_new_tokens=args.new_tokens, temperature=1.0,
                         max_image_skips=1, generator=torch.Generator().manual_seed(seed), engine=engine)
    torch.cuda.synchronize()
    return ro, sum(len(i) for i in ro.ids) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="a model folder or a Hub id")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share of the GPU")
    args = ap.parse_args()
    backend = HFBackend.load(model_folder(args.model), HFOptions(dtype="bfloat16", device="cuda", max_length=4096))
    backend.disable_dropout()
    samples = get_task("maze").generate(args.prompts, seed=0, split="test", sizes=(3, 6), cell_px=backend.cell_px)
    contexts = [backend.build_context(s, "student") for s in samples]
    engines = {"native": NativeEngine(backend)}
    t0 = time.perf_counter()
    try:
        engines["vllm"] = VLLMEngine(backend, gpu_memory_utilization=args.gpu_memory_utilization)
        print(f"vllm: engine start {time.perf_counter() - t0:.1f} s (not counted)")
    except Exception as e:  # e.g. this vLLM refuses the model or its contexts
        print(f"vllm: not available ({type(e).__name__}: {e})")
    rates = {name: [] for name in engines}
    last = {}
    for name, engine in list(engines.items()):  # warm-up
        try:
            timed(engine, backend, samples, contexts, args, 123)
        except Exception as e:
            print(f"{name}: failed ({type(e).__name__}: {e})")
            engines.pop(name)
    for r in range(args.repeats):
        for name, engine in engines.items():
            last[name], rate = timed(engine, backend, samples, contexts, args, r)
            rates[name].append(rate)
            print(f"round {r + 1}: {name} {rate:.0f} tokens/s", flush=True)
    print(f"\n{args.model}: {args.prompts} prompts, up to {args.new_tokens} new tokens, bf16, "
          f"{torch.cuda.get_device_name()}")
    print("| engine | tokens/s (median) | vs native | logprob max / mean abs diff | within 0.05 nats |")
    print("|---|---|---|---|---|")
    for name in engines:
        vs = statistics.median(a / b for a, b in zip(rates[name], rates["native"], strict=True))
        a = agreement(backend, contexts, last[name])
        print(f"| {name} | {statistics.median(rates[name]):.0f} | {vs:.2f}x | {a['max']:.3g} / {a['mean']:.3g} | "
              f"{100 * a['within_0.05']:.1f}% of {a['tokens']} |")
    if "vllm" in engines:  # after a weight update
        with torch.no_grad():
            for p in backend.model.parameters():
                if p.requires_grad:
                    p.mul_(1 + 1e-3 * torch.randn_like(p))
        engines["vllm"].weights_changed()
        ro, _ = timed(engines["vllm"], backend, samples, contexts, args, 7)
        a = agreement(backend, contexts, ro)
        print(f"| vllm after a weight update | | | {a['max']:.3g} / {a['mean']:.3g} | "
              f"{100 * a['within_0.05']:.1f}% of {a['tokens']} |")
        engines["vllm"].close()


if __name__ == "__main__":
    main()
