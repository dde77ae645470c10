"""Peak memory of one LoRA Visual-OPSD step by teacher mode, against a plain LoRA SFT step.

Peers, each in a fresh process on the same tiny Qwen2.5-VL (built in code, same seed, same batch):
- `sft`: a LoRA SFT step (cross-entropy on the student rows): the reference, 1.0x;
- `frozen`: a LoRA Visual-OPSD step whose teacher is the base model with adapters disabled (no copy);
- `ema`: the same with an EMA teacher over the adapter weights only (one adapter copy);
- `copy`: the same with a separate frozen teacher model in memory (what a second model costs).
The OPSD steps score the same completion ids under the teacher context (VT in the user turn, no
grad) and the student context (grad), generalized JSD, backward, AdamW step, teacher update, as
`train.distill_loss` does: by default the fused loss from hidden states and the output head
(`loss.fused=true`, as in every shipped HF config), `--loss logits` for the full-logit form.

Memory is the process's peak resident set (VmHWM) during model construction and the steps, minus
its resident set just before the model was built (so imports and data are left out). The workers
run with MALLOC_MMAP_THRESHOLD_=64 KiB so that freed tensors leave the resident set at once (glibc
otherwise keeps freed heap pages, and the peak would depend on allocation order). On a GPU
machine, `--device cuda` reports torch.cuda.max_memory_allocated instead.

Where the peak sits depends on weights versus activations. The default (8 rows, no checkpointing)
is activation-bound, where a teacher copy is cheap; a 7B LoRA run with gradient checkpointing is
weight-bound (bf16 weights ~15 GB, checkpointed activations a few GB), where a teacher copy costs
a whole second model. `--checkpointing` with a wider model and fewer rows reproduces that regime;
the table prints the weights beside the peaks.

    python benchmarks/bench_hf_lora_memory.py                                            # activation-bound
    python benchmarks/bench_hf_lora_memory.py --hidden 1024 --layers 8 --rows 2 --checkpointing   # weight-bound
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = ("sft", "frozen", "ema", "copy")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from visual_opsd.backends.hf import HFBackend
    from visual_opsd.backends.hf_config import HFOptions
    from visual_opsd.backends.hf_tiny import tiny_model
    from visual_opsd.losses import fused_linear_generalized_jsd, generalized_jsd
    from visual_opsd.tasks import get_task
    from visual_opsd.teacher import Teacher

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    samples = get_task("maze").generate(args.rows, seed=0, split="train", sizes=(5, 5), cell_px=8)
    tiny_model("qwen2_5_vl", hidden=64, layers=1)  # tokenizer training and lazy imports, outside the measure
    base_kb = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    options = HFOptions(lora=True, lora_r=args.rank, device=args.device, gradient_checkpointing=args.checkpointing)
    backend = HFBackend.tiny("qwen2_5_vl", options, hidden=args.hidden, layers=args.layers)
    model = backend.model
    teacher_model = None
    if args.mode == "copy":
        teacher_model, _ = tiny_model("qwen2_5_vl", hidden=args.hidden, layers=args.layers)
        teacher_model.to(model.device).requires_grad_(False)
    teacher = None
    if args.mode in ("frozen", "ema"):
        teacher = Teacher(model, args.mode, 0.99, base_weights=backend.adapters_disabled)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    s_ctx = [backend.build_context(s) for s in samples]
    t_ctx = [backend.build_context(s, "teacher") for s in samples]
    comps = [backend.encode_completion(s.text_only_completion()) for s in samples]
    model.train()
    output = "hidden" if args.loss == "fused" else "logits"
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        if args.mode == "sft":
            out = backend.sft_losses([backend.training_row(s, "text_only") for s in samples])
            loss = out["ce_sum"] / out["n_text"]
        else:
            if teacher_model is not None:
                with torch.no_grad():
                    t = backend.score(t_ctx, comps, model=teacher_model, output=output)
            else:
                with teacher.weights():
                    t = backend.score(t_ctx, comps, output=output)
            s = backend.score(s_ctx, comps, output=output)
            if args.loss == "fused":  # as train.distill_loss with loss.fused=true
                loss = fused_linear_generalized_jsd(s.hidden[s.mask], t.hidden[s.mask], s.head_weight,
                                                    teacher_weight=t.head_weight.detach(), reduction="token_mean",
                                                    top_k=64)
            else:
                loss = generalized_jsd(s.logits, t.logits, mask=s.mask, reduction="token_mean", top_k=64)
            del t
        loss.backward()
        opt.step()
        if teacher is not None:
            teacher.update()
    peak = torch.cuda.max_memory_allocated() if cuda else (_rss_kb("VmHWM") - base_kb) * 1024
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": args.mode, "peak_bytes": peak, "params": n_params, "trainable": n_train,
            "weight_bytes": weight_bytes,
            "tokens": sum(len(c.ids) + len(x) for c, x in zip(t_ctx, comps, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="language model width")
    ap.add_argument("--layers", type=int, default=8, help="language model layers")
    ap.add_argument("--rows", type=int, default=8, help="completions per step (one per prompt)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per peer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--loss", choices=["fused", "logits"], default="fused",
                    help="fused: loss from hidden states + head (loss.fused=true); logits: full logits")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "checkpointing")
        ] + (["--checkpointing"] if args.checkpointing else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    ref = results["sft"]["peak_bytes"]
    r = results["sft"]
    print(f"tiny Qwen2.5-VL: {r['params'] / 1e6:.1f}M params ({r['weight_bytes'] / 2**20:.1f} MiB of weights), "
          f"LoRA r={args.rank}: {r['trainable'] / 1e6:.2f}M trainable; {args.rows} rows, {r['tokens']} teacher "
          f"tokens per step, loss {args.loss}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{args.device}; peak memory over the pre-model baseline")
    print(f"{'step':<34}{'peak MiB':>10}{'x LoRA SFT':>12}")
    names = {"sft": "LoRA SFT (reference)", "frozen": "OPSD, teacher frozen (adapters off)",
             "ema": "OPSD, teacher ema (adapters)", "copy": "OPSD, separate teacher copy"}
    for mode in MODES:
        peak = results[mode]["peak_bytes"]
        print(f"{names[mode]:<34}{peak / 2**20:>10.1f}{peak / ref:>12.2f}")


if __name__ == "__main__":
    main()
