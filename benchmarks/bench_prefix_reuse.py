"""Teacher-stage time with n completions per prompt: prefix encoded once vs once per completion.

The teacher context (question + problem image + framing + VT images) is the long part; with n
samples per prompt, `Backend.score` encodes it once and reuses its KV cache for all n completions.
The peer is the same call with each context repeated n times (the prefix recomputed per sample).
Both run side by side in one process on the same model and inputs; the script prints the ratio.

    python benchmarks/bench_prefix_reuse.py            # n=4, VT prefix >= 4x the completion
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.sample import Sample
from visual_opsd.tokenizer import build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    ap.add_argument("--grid", type=int, default=12, help="image side in patches (VT and problem image)")
    ap.add_argument("--vts", type=int, default=2, help="VT images in the teacher context")
    ap.add_argument("--completion", type=int, default=48, help="completion length in tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    words = [f"w{i}" for i in range(200)]
    tok = build_tokenizer([" ".join(words)])
    backend = MiniBackend.new(tok, seed=0, d_model=128, n_layers=4, n_heads=4, patch_size=4, max_grid=args.grid)
    backend.model.eval()
    px = 4 * args.grid
    gen = torch.Generator().manual_seed(0)

    def image() -> Image.Image:
        return Image.fromarray(torch.randint(0, 256, (px, px, 3), generator=gen, dtype=torch.uint8).numpy())

    samples = [
        Sample(id=f"s{i}", task="bench", question=" ".join(words[:20]), answer="x",
               problem_images=[image()], vt_images=[image() for _ in range(args.vts)], thoughts=["a"] * (args.vts + 1))
        for i in range(args.prompts)
    ]
    contexts = [backend.build_context(s, "teacher") for s in samples]
    completions = [torch.randint(5, len(tok), (args.completion,), generator=gen).tolist()
                   for _ in range(args.prompts * args.n)]
    repeated = [c for c in contexts for _ in range(args.n)]
    prefix = contexts[0].num_tokens

    def once(reuse: bool) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            backend.score(contexts if reuse else repeated, completions)
        return time.perf_counter() - t0

    with torch.no_grad():  # same logits either way
        a = backend.score(contexts, completions).logits
        b = backend.score(repeated, completions).logits
    max_diff = float((a - b).abs().max())
    times = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for reuse in (True, False):
            times[reuse].append(once(reuse))
    reuse_t, recompute_t = statistics.median(times[True]), statistics.median(times[False])
    print(f"teacher prefix {prefix} tokens, completion {args.completion} tokens "
          f"(prefix/completion = {prefix / args.completion:.1f}x), n = {args.n}, {args.prompts} prompts")
    print(f"max |logit difference| reuse vs recompute: {max_diff:.2e}")
    print(f"prefix encoded once      : {reuse_t * 1000:8.1f} ms (median of {args.repeats})")
    print(f"prefix recomputed per row: {recompute_t * 1000:8.1f} ms")
    print(f"speed-up from prefix reuse: {recompute_t / reuse_t:.2f}x")


if __name__ == "__main__":
    main()
