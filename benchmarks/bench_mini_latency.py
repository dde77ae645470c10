"""Latency of the mini unified model at batch size 1, measured side by side in one run.

    PYTHONPATH=src python benchmarks/bench_mini_latency.py --model runs/sft_demo/final --n 20

Per held-out maze (test split, sizes 3..6), after `--warmup` untimed samples, interleaved:
1. interleaved decoding: the teacher generates its VT with `--vt-steps` (default 50) denoising steps;
2. text-only decoding of the same model (image skip), with the KV cache;
3. the same text-only decoding without a cache (every step re-runs the whole sequence); it must
   produce the same ids as 2.
Each timing covers the whole pipeline: context building (image preprocessing) + decoding, greedy.
Prints mean seconds per sample, mean tokens per answer, and the ratios interleaved / text and
no-cache / cache. Without `--model`, a freshly initialised demo-size model is timed (its outputs
are then arbitrary, so only the per-token costs mean anything).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from visual_opsd.backends.base import Decoder, sample_with_image_skip
from visual_opsd.backends.mini import MiniBackend, MiniContext, collate, text_tokens
from visual_opsd.tasks import get_task
from visual_opsd.tokenizer import build_tokenizer_for_tasks


class NoCacheDecoder(Decoder):
    """Decoding without a KV cache: every step runs the full context + ids generated so far."""

    def __init__(self, backend: MiniBackend, contexts: list[MiniContext]):
        self.backend, self.contexts = backend, contexts
        self.ids: list[list[int]] = [[] for _ in contexts]
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        be = self.backend
        x = collate([c.row for c in self.contexts], be.cfg.patch_dim, left_pad=True)
        n = max(len(i) for i in self.ids)
        if n:
            ids = torch.tensor([i + [0] * (n - len(i)) for i in self.ids])
            valid = torch.tensor([[k < len(i) for k in range(n)] for i in self.ids])
            pos = torch.tensor([c.next_pos for c in self.contexts])[:, None] + torch.arange(n)[None]
            tail = text_tokens(ids, pos, valid, be.cfg.patch_dim)
            x = type(x)(**{f: torch.cat([getattr(x, f), getattr(tail, f)], 1) for f in x.__dataclass_fields__})
        hidden, _ = be.model(x)  # (B, S, D): the whole sequence again
        last = torch.tensor([x.kind.shape[1] - 1 - (n - len(i)) for i in self.ids])
        self.logits = be.model.logits(hidden[torch.arange(len(self.ids)), last])

    def step(self, ids: torch.Tensor, active: torch.Tensor) -> None:
        for b in torch.nonzero(active).flatten().tolist():
            self.ids[b].append(int(ids[b]))
        self._refresh()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="saved mini model folder (default: a fresh demo-size model)")
    ap.add_argument("--n", type=int, default=20, help="timed samples")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vt-steps", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        backend = MiniBackend.load(args.model)
    else:
        backend = MiniBackend.new(build_tokenizer_for_tasks(["maze", "jigsaw"]), patch_size=4)
    backend.model.eval()
    samples = get_task("maze").generate(
        args.n + args.warmup, seed=1, split="test", sizes=(3, 6), cell_px=backend.cfg.patch_size
    )
    times: dict[str, list[float]] = {"interleaved": [], "text": [], "text_no_cache": []}
    tokens: dict[str, list[int]] = {k: [] for k in times}
    for i, sample in enumerate(samples):
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        out = backend.generate_interleaved(
            [backend.build_context(sample)], args.max_new_tokens, 0.0, args.vt_steps, generator=gen
        )[0]
        t1 = time.perf_counter()
        cached = backend.sample([backend.build_context(sample)], 1, args.max_new_tokens, 0.0)[0]
        t2 = time.perf_counter()
        plain = sample_with_image_skip(
            backend,
            NoCacheDecoder(backend, [backend.build_context(sample)]),
            args.max_new_tokens,
            0.0,
            max_image_skips=1,
        )[0]
        t3 = time.perf_counter()
        if plain.ids != cached.ids:
            raise AssertionError(f"sample {i}: decoding without a cache gave different ids")
        if i < args.warmup:
            continue
        for key, dt, n in (
            ("interleaved", t1 - t0, len(out.ids)),
            ("text", t2 - t1, len(cached.ids)),
            ("text_no_cache", t3 - t2, len(plain.ids)),
        ):
            times[key].append(dt)
            tokens[key].append(n)
    params = sum(p.numel() for p in backend.model.parameters())
    print(
        f"mini model {params / 1e6:.2f}M params, batch size 1, {args.n} test mazes (sizes 3..6), "
        f"{args.threads} threads, VT steps {args.vt_steps}"
    )
    for key in times:
        print(
            f"  {key:14s} {statistics.mean(times[key]) * 1000:8.1f} ms/sample  "
            f"(median {statistics.median(times[key]) * 1000:.1f})  {statistics.mean(tokens[key]):.1f} tokens/answer"
        )
    mean = {k: statistics.mean(v) for k, v in times.items()}
    print(f"  interleaved / text-only : {mean['interleaved'] / mean['text']:.2f}x")
    print(f"  no cache / KV cache     : {mean['text_no_cache'] / mean['text']:.2f}x")


if __name__ == "__main__":
    main()
