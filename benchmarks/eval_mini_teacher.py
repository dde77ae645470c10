"""Held-out maze accuracy of the SFT'd mini models, by maze size, strict scorer, greedy decoding.

    PYTHONPATH=src python benchmarks/eval_mini_teacher.py \\
        --teacher runs/sft_demo/final --baseline runs/sft_text_demo/final --n-per-size 50

Conditions (the rows of the table):
- teacher/interleaved: the teacher generates its own VT (`--vt-steps`, default 50) and reads it;
- teacher/given_vt: the same decoding, but the ground-truth VT is inserted at `<image_start>`;
- teacher/teacher_context: the ground-truth VT in the privileged teacher context (what the
  Visual-OPSD teacher sees), then text-only decoding;
- teacher/text_image_skip: the teacher decodes text-only, an `<image_start>` answered by an injected
  `<image_end>` (at most once);
- baseline/text: the text-only SFT baseline, text-only decoding.
VT fidelity: per generated VT, the fraction of grid cells whose path-mark reading
(`read_path_cells`, given the true map) agrees with the ground-truth path cells; mean over samples.
For scale, the fidelity of a VT with no path drawn at all is printed beside it.
Test mazes come from the task's `test` split (disjoint from train / val by construction).
Accuracies carry 95% Wilson intervals. Writes a JSON report with `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.sample import Sample
from visual_opsd.sft import predict
from visual_opsd.tasks import get_task
from visual_opsd.tasks.maze import path_cells, read_path_cells


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def vt_fidelity(sample: Sample, image) -> float:
    """Fraction of cells where the generated VT's path marks agree with the ground-truth path."""
    grid, size = sample.metadata["grid"], sample.metadata["size"]
    truth = set(path_cells(grid, sample.answer.split(",")))
    read = read_path_cells(image, size, grid=grid)
    return sum(((r, c) in truth) == ((r, c) in read) for r in range(size) for c in range(size)) / size**2


def evaluate(
    teacher: MiniBackend | None,
    baseline: MiniBackend | None,
    samples: list[Sample],
    vt_steps: int = 50,
    max_new_tokens: int = 320,
    batch_size: int = 32,
    conditions: tuple[str, ...] = ("interleaved", "given_vt", "teacher_context", "text_image_skip", "baseline"),
    show: int = 0,
) -> dict:
    """Accuracy per condition and maze size, and VT fidelity of the teacher's own VTs."""
    task = get_task("maze")
    report: dict = {"n": len(samples), "vt_steps": vt_steps, "conditions": {}}
    for cond in conditions:
        model = baseline if cond == "baseline" else teacher
        if model is None:
            continue
        mode = {"baseline": "text", "text_image_skip": "text"}.get(cond, cond)
        t0 = time.perf_counter()
        if cond == "interleaved":  # keep the images for VT fidelity
            texts, fid = [], []
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                outs = model.generate_interleaved(
                    [model.build_context(s) for s in chunk],
                    max_new_tokens=max_new_tokens,
                    vt_steps=vt_steps,
                    generator=torch.Generator().manual_seed(i),
                )
                texts += [o.text for o in outs]
                fid += [vt_fidelity(s, o.images[0]) for s, o in zip(chunk, outs, strict=True) if o.images]
            report["vt_fidelity"] = sum(fid) / max(1, len(fid))
            report["vt_generated"] = len(fid)
            # reference: a VT with no path drawn at all agrees on every cell off the true path
            report["vt_fidelity_blank"] = sum(
                1 - len(set(path_cells(s.metadata["grid"], s.answer.split(",")))) / s.metadata["size"] ** 2
                for s in samples
            ) / len(samples)
        else:
            texts = predict(model, samples, mode, max_new_tokens, vt_steps, batch_size)
        correct = [task.is_correct(s, t) for s, t in zip(samples, texts, strict=True)]
        by_size: dict[int, list[bool]] = {}
        for s, ok in zip(samples, correct, strict=True):
            by_size.setdefault(s.metadata["size"], []).append(ok)
        k, n = sum(correct), len(correct)
        report["conditions"][cond] = {
            "accuracy": k / n,
            "ci95": wilson(k, n),
            "by_size": {str(sz): sum(v) / len(v) for sz, v in sorted(by_size.items())},
            "seconds": time.perf_counter() - t0,
        }
        for s, t in list(zip(samples, texts, strict=True))[:show]:
            print(f"[{cond}] size {s.metadata['size']} answer {s.answer}\n  {t}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="interleaved teacher model folder")
    ap.add_argument("--baseline", help="text-only SFT baseline model folder")
    ap.add_argument("--sizes", type=int, nargs=2, default=(3, 6))
    ap.add_argument("--n-per-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vt-steps", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--conditions", nargs="*", default=["interleaved", "given_vt", "teacher_context", "text_image_skip", "baseline"]
    )
    ap.add_argument("--show", type=int, default=0, help="print the first N outputs of each condition")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = MiniBackend.load(args.teacher) if args.teacher else None
    baseline = MiniBackend.load(args.baseline) if args.baseline else None
    patch = (teacher or baseline).cfg.patch_size
    task = get_task("maze")
    samples = []
    for size in range(args.sizes[0], args.sizes[1] + 1):  # equal numbers per size
        samples += task.generate(args.n_per_size, seed=args.seed, split="test", sizes=(size, size), cell_px=patch)
    report = evaluate(
        teacher,
        baseline,
        samples,
        args.vt_steps,
        args.max_new_tokens,
        args.batch_size,
        tuple(args.conditions),
        args.show,
    )
    report.update(
        teacher=args.teacher, baseline=args.baseline, sizes=args.sizes, n_per_size=args.n_per_size, seed=args.seed
    )
    print(f"held-out mazes: {report['n']} (sizes {args.sizes[0]}..{args.sizes[1]}, test split, strict scorer)")
    for cond, r in report["conditions"].items():
        lo, hi = r["ci95"]
        sizes = "  ".join(f"{k}:{v:.2f}" for k, v in r["by_size"].items())
        print(f"  {cond:18s} {r['accuracy']:.3f}  [{lo:.3f}, {hi:.3f}]  by size {sizes}  ({r['seconds']:.0f} s)")
    if "vt_fidelity" in report:
        print(
            f"  VT fidelity (cells agreeing with the true path): {report['vt_fidelity']:.3f} over "
            f"{report['vt_generated']} generated VTs (a VT with no path drawn scores {report['vt_fidelity_blank']:.3f})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
