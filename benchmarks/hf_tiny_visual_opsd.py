"""Visual-OPSD on a tiny Qwen2.5-VL built in code: SFT with VTs in context, then distillation to a
text-only student, with the noise control beside it; text-only accuracy on the test split.

Stages (each skipped when its output folder exists, so the script resumes):
1. `visual-opsd sft --config configs/sft_hf_tiny_qwen25vl.yaml`   -> <out>/sft/final
2. `visual-opsd train --config configs/train_hf_tiny_qwen25vl.yaml` -> <out>/opsd_data  (VTs in the teacher)
3. the same with `teacher.vt_mode=noise`                           -> <out>/opsd_noise (control)
4. greedy accuracy on `--n-test` test mazes: text-only (student context) and teacher context,
   95% Wilson intervals; then the final model reloaded with `from_pretrained` against the
   backend's own scoring (max |logit difference|).

    python benchmarks/hf_tiny_visual_opsd.py --out runs/hf_tiny_show                  # EMA teacher, 60 steps
    python benchmarks/hf_tiny_visual_opsd.py --out runs/hf_tiny_show --teacher-mode frozen --train-steps 120
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from visual_opsd.backends import load_backend
from visual_opsd.config import load_config
from visual_opsd.sft import SFTConfig, accuracy, predict, run_sft
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks import get_task
from visual_opsd.train import TrainConfig, run_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def evaluate(folder: Path, samples, task, mode: str, max_new_tokens: int) -> dict:
    backend = load_backend(folder)
    preds = predict(backend, samples, mode, max_new_tokens, batch_size=50)
    k = round(accuracy(task, samples, preds) * len(samples))
    lo, hi = wilson_interval(k, len(samples))
    return {"accuracy": 100 * k / len(samples), "ci95": (100 * lo, 100 * hi), "n": len(samples)}


def round_trip(folder: Path, sample) -> float:
    """Max |logit difference| between `from_pretrained` + the processor's inputs and our scoring."""
    from transformers import AutoModelForImageTextToText

    backend = load_backend(folder)
    ctx = backend.build_context(sample, "teacher")
    comp = backend.encode_completion(sample.text_only_completion())
    model = AutoModelForImageTextToText.from_pretrained(folder)
    ids = torch.tensor([ctx.ids + comp])
    with torch.no_grad():
        ours = backend.score([ctx], [comp]).logits[0]
        theirs = model(input_ids=ids, mm_token_type_ids=(ids == backend.image_token_id).int(), **ctx.pixels).logits[0]
    return float((theirs[len(ctx.ids) - 1 : -1, : backend.vocab_size] - ours).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/hf_tiny_show")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=None, help="override optim.steps of the train config")
    ap.add_argument("--teacher-mode", choices=["ema", "frozen", "live"], default=None, help="override teacher.mode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"threads={args.threads}", "progress=false"]
    sft_final = out / "sft" / "final"
    if not sft_final.exists():
        run_sft(load_config(SFTConfig, CONFIGS / "sft_hf_tiny_qwen25vl.yaml", [f"out_dir={out}/sft", *common]))
    runs = {}
    for vt in ("data", "noise"):
        mode = args.teacher_mode or "config"
        run = out / (f"opsd_{vt}" if mode == "config" else f"opsd_{mode}_{vt}")
        if not (run / "last" / "model").exists():
            extra = [f"optim.steps={args.train_steps}"] if args.train_steps else []
            extra += [f"teacher.mode={args.teacher_mode}"] if args.teacher_mode else []
            cfg = load_config(TrainConfig, CONFIGS / "train_hf_tiny_qwen25vl.yaml",
                              [f"init_from={sft_final}", f"out_dir={run}", f"teacher.vt_mode={vt}", *common, *extra])
            run_train(cfg)
        runs[vt] = run / "last" / "model"
    cfg = load_config(TrainConfig, CONFIGS / "train_hf_tiny_qwen25vl.yaml")
    task = get_task("maze")
    test = task.generate(args.n_test, seed=123, split="test", sizes=tuple(cfg.data.sizes), cell_px=8)
    tokens = cfg.eval.max_new_tokens
    rows = {
        "SFT teacher, text-only (before)": evaluate(sft_final, test, task, "text", tokens),
        "SFT teacher, VT in context": evaluate(sft_final, test, task, "teacher_context", tokens),
        "Visual-OPSD (VT teacher), text-only": evaluate(runs["data"], test, task, "text", tokens),
        "Visual-OPSD (noise control), text-only": evaluate(runs["noise"], test, task, "text", tokens),
    }
    teacher = args.teacher_mode or cfg.teacher.mode
    print(f"tiny Qwen2.5-VL, maze {cfg.data.sizes}, teacher {teacher}, {args.n_test} test samples, greedy")
    for name, r in rows.items():
        print(f"  {name:<42} {r['accuracy']:5.1f}%  [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]")
    diff = round_trip(runs["data"], test[0])
    print(f"  from_pretrained(opsd_data/last/model) vs backend scoring: max |logit diff| = {diff:.3g}")
    (out / "summary.json").write_text(json.dumps({"accuracy": rows, "from_pretrained_max_abs_diff": diff}, indent=2))


if __name__ == "__main__":
    main()
