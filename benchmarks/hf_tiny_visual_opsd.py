"""Visual-OPSD on a tiny Qwen2.5-VL built in code: SFT with VTs in context, then distillation to a
text-only student, with the noise control beside it; text-only accuracy on the test split.

Stages (each skipped when done, so the script resumes; a Visual-OPSD run cut short resumes from
its last checkpoint, exactly):
1. `visual-opsd sft --config configs/sft_hf_tiny_qwen25vl.yaml`   -> <out>/sft/final
2. `visual-opsd train --config configs/train_hf_tiny_qwen25vl.yaml` -> <out>/opsd_data  (VTs in the teacher)
3. the same with `teacher.vt_mode=noise`                           -> <out>/opsd_noise (control)
4. greedy accuracy on `--n-test` test mazes: text-only (student context) and teacher context,
   95% Wilson intervals; then the final model reloaded with `from_pretrained` against the
   backend's own scoring (max |logit difference|).

    python benchmarks/hf_tiny_visual_opsd.py --out runs/hf_tiny_show                  # EMA teacher, 60 steps
    python benchmarks/hf_tiny_visual_opsd.py --out runs/hf_tiny_show --teacher-mode frozen --train-steps 120
    # on a busy machine, one stage per command: sft, then data, noise, eval (a call cut short, e.g.
    # by `timeout`, loses its SFT stage but resumes a Visual-OPSD stage from its last checkpoint)
    python benchmarks/hf_tiny_visual_opsd.py --out runs/hf_tiny_show --sft-steps 700 --stop-after sft
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from visual_opsd.backends import open_backend
from visual_opsd.config import load_config
from visual_opsd.sft import SFTConfig, accuracy, predict, run_sft
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks import get_task
from visual_opsd.train import TrainConfig, run_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def evaluate(folder: Path, samples, task, mode: str, max_new_tokens: int) -> dict:
    backend = open_backend(folder)
    preds = predict(backend, samples, mode, max_new_tokens, batch_size=50)
    k = round(accuracy(task, samples, preds) * len(samples))
    lo, hi = wilson_interval(k, len(samples))
    return {"accuracy": 100 * k / len(samples), "ci95": (100 * lo, 100 * hi), "n": len(samples)}


def round_trip(folder: Path, sample) -> float:
    """Max |logit difference| between `from_pretrained` + the processor's inputs and our scoring."""
    from transformers import AutoModelForImageTextToText

    backend = open_backend(folder)
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
    ap.add_argument("--sft-steps", type=int, default=None, help="override optim.steps of the SFT config")
    ap.add_argument("--stop-after", choices=["sft", "data", "noise"], default=None,
                    help="end after this stage (a later call resumes with the next one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"threads={args.threads}", "progress=false"]
    sft_final = out / "sft" / "final"
    walls_file = out / "wall_times.json"
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}

    def timed_stage(name: str, fn) -> None:  # wall time, summed over the calls a stage took
        t0 = time.perf_counter()
        fn()
        walls[name] = round(walls.get(name, 0.0) + time.perf_counter() - t0, 1)
        out.mkdir(parents=True, exist_ok=True)
        walls_file.write_text(json.dumps(walls, indent=2))
        print(f"stage {name}: {walls[name]:.0f} s", flush=True)

    if not sft_final.exists():
        extra = [f"optim.steps={args.sft_steps}"] if args.sft_steps else []
        timed_stage("sft", lambda: run_sft(load_config(SFTConfig, CONFIGS / "sft_hf_tiny_qwen25vl.yaml",
                                                       [f"out_dir={out}/sft", *common, *extra])))
    if args.stop_after == "sft":
        return
    runs = {}
    for vt in ("data", "noise"):
        mode = args.teacher_mode or "config"
        run = out / (f"opsd_{vt}" if mode == "config" else f"opsd_{mode}_{vt}")
        extra = [f"optim.steps={args.train_steps}"] if args.train_steps else []
        extra += [f"teacher.mode={args.teacher_mode}"] if args.teacher_mode else []
        state = run / "last" / "trainer_state.json"
        extra += [f"resume={run / 'last'}"] if state.exists() else []  # a run cut short resumes exactly
        cfg = load_config(TrainConfig, CONFIGS / "train_hf_tiny_qwen25vl.yaml",
                          [f"init_from={sft_final}", f"out_dir={run}", f"teacher.vt_mode={vt}", *common, *extra])
        if not state.exists() or json.loads(state.read_text())["step"] < cfg.optim.steps:
            timed_stage(run.name, lambda cfg=cfg: run_train(cfg))
        runs[vt] = run / "last" / "model"
        if args.stop_after == vt:
            return
    cfg = load_config(TrainConfig, CONFIGS / "train_hf_tiny_qwen25vl.yaml")
    task = get_task("maze")
    test = task.generate(args.n_test, seed=123, split="test", sizes=tuple(cfg.data.sizes), cell_px=8)
    tokens = cfg.eval.max_new_tokens
    t_eval = time.perf_counter()
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
    name = runs["data"].parent.parent.name
    print(f"  from_pretrained({name}/last/model) vs backend scoring: max |logit diff| = {diff:.3g}")
    walls["eval"] = round(time.perf_counter() - t_eval, 1)
    print("  wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    summary = {"accuracy": rows, "from_pretrained_max_abs_diff": diff, "wall_s": walls,
               "sft_steps": args.sft_steps, "train_steps": args.train_steps, "teacher_mode": teacher}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
