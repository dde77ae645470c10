"""Rollout throughput on a CPU: completion tokens per second of the samplers a run can use.

One tiny-but-not-trivial text-only Qwen2 causal LM built in code (random weights; hidden 256,
4 layers, 4 heads of 64, vocabulary 32,000, so the output head dominates a step as in real models),
one batch of prompts (the maze task's student contexts, left-padded), temperature 1, no top-k /
top-p, a fixed number of new tokens (end-of-sequence and the image marker made unreachable, so
every row decodes exactly `--new-tokens`). Candidates, measured side by side in one process,
interleaved over `--repeats` rounds after one warm-up round; printed: the median rate and the
median over rounds of each round's ratios (a busy machine changes speed between rounds, not within
one round's few seconds):

    legacy    the native sampler as it was (kept below): the generic per-row Python loop
              (`sample_with_image_skip` before log-probs) over a decoder that copies the full
              fp32 logits to the host every token and draws with `torch.multinomial`
    native    today's native engine: `HFBackend.sample` (`sample_on_device`: state in tensors on
              the model's device, inversion sampling, ids copied once; log-probs recorded)
    generate  `model.generate` on the same model and batch (do_sample, top_k 0, min_new_tokens)
    vllm      the vLLM engine (`rollout_engines.VLLMEngine`), when vllm imports (.venv-vllm);
              its start-up (seconds) is printed apart and not counted

    .venv/bin/python benchmarks/rollout_throughput.py              # legacy, native, generate
    .venv-vllm/bin/python benchmarks/rollout_throughput.py         # the same plus vllm
    .venv/bin/python benchmarks/rollout_throughput.py --prompts 4 --new-tokens 16 --repeats 1   # smoke

Timings on a shared machine are noisy: read the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from visual_opsd.backends.base import Completion, Decoder, next_token
from visual_opsd.backends.hf import _CACHE_KWARG, HFBackend, _cache_of
from visual_opsd.backends.hf_config import HFOptions
from visual_opsd.backends.hf_tiny import tiny_text_qwen2
from visual_opsd.tasks import get_task

# -- the native sampler before this change (for comparison only) -------------------------------


class LegacyHFDecoder(Decoder):
    """The HF decoder as it was: logits copied to the host (fp32, full vocabulary) every step."""

    def __init__(self, backend, model, contexts, n):
        self.backend, self.model = backend, model
        ids, attn, pos, pixels = backend._batch([(c.ids, c.pixels) for c in contexts], model, left_pad=True)
        out = backend._inner(model)(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **pixels)
        self.cache = _cache_of(out)
        if n > 1:
            self.cache.batch_repeat_interleave(n)
        self.attn = attn.repeat_interleave(n, 0)
        self.next_pos = backend._next_positions(pos, attn).repeat_interleave(n)
        self.logits = backend._logits(model, out.last_hidden_state[:, -1]).float().cpu().repeat_interleave(n, 0)

    @torch.no_grad()
    def step(self, ids, active):
        device = self.attn.device
        ids, active_dev = ids.to(device), active.to(device)
        self.attn = torch.cat([self.attn, active_dev[:, None].long()], dim=1)
        pos = self.next_pos[:, None]
        if self.backend.mrope:
            pos = pos[None].expand(3, -1, -1)
        out = self.backend._inner(self.model)(input_ids=ids[:, None], attention_mask=self.attn, position_ids=pos,
                                              use_cache=True, **{_CACHE_KWARG: self.cache})
        self.cache = _cache_of(out)
        logits = self.backend._logits(self.model, out.last_hidden_state[:, -1]).float().cpu()
        self.logits = torch.where(active.cpu()[:, None], logits, self.logits)
        self.next_pos = self.next_pos + active_dev.long()


def legacy_sample(backend, dec, max_new_tokens, temperature, max_image_skips, generator=None):
    """`sample_with_image_skip` as it was: a Python loop over the active rows every step."""
    injection = [backend.image_end_id]
    rows = dec.logits.shape[0]
    ids = [[] for _ in range(rows)]
    sampled = [[] for _ in range(rows)]
    pending = [[] for _ in range(rows)]
    skips, finished = [0] * rows, [False] * rows
    active = torch.ones(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        tok = next_token(dec.logits, temperature, generator, backend.suppressed_ids).cpu()
        for b in torch.nonzero(active).flatten().tolist():
            forced = bool(pending[b])
            t = pending[b].pop(0) if forced else int(tok[b])
            tok[b] = t
            ids[b].append(t)
            sampled[b].append(not forced)
            if forced:
                continue
            if t == backend.eos_id:
                finished[b] = True
                active[b] = False
            elif t == backend.image_start_id:
                if skips[b] < max_image_skips:
                    skips[b] += 1
                    pending[b] = list(injection)
                else:
                    active[b] = False
        if not active.any():
            break
        dec.step(tok, active)
    return [Completion(ids=ids[b], text=backend.decode(ids[b]), sampled=sampled[b], finished=finished[b],
                       image_skips=skips[b]) for b in range(rows)]


# -- the candidates ------------------------------------------------------------------------------


def run_legacy(backend, contexts, args, gen):
    with torch.no_grad():
        dec = LegacyHFDecoder(backend, backend.model, contexts, 1)
        return legacy_sample(backend, dec, args.new_tokens, 1.0, 0, gen)


def run_native(backend, contexts, args, gen):
    return backend.sample(contexts, n=1, max_new_tokens=args.new_tokens, temperature=1.0, max_image_skips=0,
                          generator=gen)


def run_generate(backend, contexts, args, gen):
    """`model.generate` on the same left-padded batch; returns the new ids per row."""
    del gen  # generate draws from torch's global stream
    ids, attn, _, _ = backend._batch([(c.ids, c.pixels) for c in contexts], backend.model, left_pad=True)
    with torch.no_grad():
        out = backend.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=backend.pad_id)
    return [Completion(ids=row.tolist(), text="", sampled=[], finished=False) for row in out[:, ids.shape[1]:]]


def run_vllm(engine, contexts, args, gen):
    return engine.sample(contexts, n=1, max_new_tokens=args.new_tokens, temperature=1.0, max_image_skips=0,
                         generator=gen)


def build(args):
    """The model, its backend (end-of-sequence and image marker unreachable) and the contexts."""
    model, tok = tiny_text_qwen2(seed=0, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab)
    backend = HFBackend.prepare(model, tok, HFOptions(device="cpu"))
    backend.model.eval()
    samples = get_task("maze").generate(args.prompts, seed=0, split="train", sizes=(3, 6), cell_px=8)
    contexts = [backend.build_context(s, "student") for s in samples]
    # fixed lengths: no row may stop early (generate gets min_new_tokens for the same effect)
    backend.eos_id, backend.image_start_id = -1, -1
    return backend, contexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="rows in the batch")
    ap.add_argument("--new-tokens", type=int, default=64, help="completion tokens per row")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians are printed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vllm even where it imports")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend, contexts = build(args)
    candidates = {"legacy": run_legacy, "native": run_native, "generate": run_generate}
    engine = None
    if not args.no_vllm:
        try:
            from visual_opsd.rollout_engines import VLLMEngine, import_vllm

            import_vllm()
        except Exception as e:
            print(f"vllm: skipped ({str(e).splitlines()[0][:100]})")
        else:
            t0 = time.perf_counter()
            engine = VLLMEngine(backend, cpu_kv_cache_gib=2)
            print(f"vllm: engine start {time.perf_counter() - t0:.1f} s (not counted)")
            run_vllm(engine, contexts, args, torch.Generator().manual_seed(99))  # warm-up
            candidates["vllm"] = lambda b, c, a, g: run_vllm(engine, c, a, g)
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up round, not counted
        fn(backend, contexts, args, torch.Generator().manual_seed(123))
    for r in range(args.repeats):
        for name, fn in candidates.items():
            gen = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            comps = fn(backend, contexts, args, gen)
            dt = time.perf_counter() - t0
            lengths = {len(c.ids) for c in comps}
            if lengths != {args.new_tokens}:
                raise SystemExit(f"{name}: completion lengths {sorted(lengths)}, expected {args.new_tokens} each")
            rates[name].append(len(comps) * args.new_tokens / dt)
            print(f"round {r + 1}: {name} {rates[name][-1]:.1f} tokens/s", flush=True)
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens, Qwen2 LM hidden {args.hidden}, {args.layers} "
          f"layers, vocab {args.vocab}, {args.threads} threads, median of {args.repeats}")
    print("| sampler | tokens/s (median) | vs legacy | vs generate |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        vs_legacy = statistics.median(a / b for a, b in zip(rate, rates["legacy"], strict=True))
        vs_generate = statistics.median(a / b for a, b in zip(rate, rates["generate"], strict=True))
        print(f"| {name} | {statistics.median(rate):.1f} | {vs_legacy:.2f}x | {vs_generate:.2f}x |")
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()
