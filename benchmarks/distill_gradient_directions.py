"""Which way does a Visual-OPSD step point? The expected gradient of the distillation loss at a
checkpoint with the data's VTs, with shuffled VTs (another maze's) and with noise VTs, beside the
text-only SFT gradient of the same model on the data's text traces.

    PYTHONPATH=src python benchmarks/distill_gradient_directions.py --init demo_out/sft_teacher/final

Each of `--batches` K steps draws its own prompts and on-policy samples as `visual-opsd train` does
with `--config` (default configs/train_demo.yaml; a run's config.json works too). The three teacher
contexts score the very same samples, so their differences are paired. Printed per kind:
- |E g|: the norm of the expected gradient (unbiased: |mean|^2 minus the noise's share of it);
- SNR: |E g|^2 over the per-step noise power E|g - E g|^2 (below 1: one step is mostly noise);
- cosines between expected gradients, from independent halves of the K batches and divided by each
  side's own split-half agreement, so that estimation noise does not read as disagreement.
"content" is g(data VTs) - g(shuffled VTs): what the VTs' content, not the image slot, asks for.
A negative cosine with the SFT gradient means the distillation step raises the text traces'
cross-entropy. About 6 minutes for K = 32 on 2 cores at the demo's scale, 30 on one core at
`--preset full`'s.
Results: docs/miniature.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from visual_opsd.config import load_config
from visual_opsd.sft import load_samples, open_model
from visual_opsd.tasks import get_task
from visual_opsd.train import (
    TrainConfig,
    batch_indices,
    distill_backward,
    loss_denominator,
    open_run,
    rollouts,
    step_seed,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_demo.yaml"


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def distill_gradients(config: Path, init: str, vt_mode: str, k: int, out: Path) -> torch.Tensor:
    """(K, P) gradients of K distillation steps' losses at `init` (no optimizer step between them);
    prompts and samples depend on the step only, not on `vt_mode`."""
    cfg = load_config(TrainConfig, config, [f"init_from={init}", f"out_dir={out / vt_mode}", "progress=false",
                                            f"teacher.vt_mode={vt_mode}", "data.n_val=0"])
    run = open_run(cfg)
    params = [p for p in run.backend.model.parameters() if p.requires_grad]
    grads = []
    try:
        for step in range(k):
            idx = batch_indices(len(run.train), step, cfg.optim.prompts_per_step, cfg.seed)
            windows = rollouts(run, idx, step_seed(cfg.seed, step, 0), step_seed(cfg.seed, step, 1), {})
            normalizer, _, _ = loss_denominator(run, windows)
            distill_backward(run, windows, normalizer, {})
            grads.append(flat_grad(params))
    finally:
        run.close(True)
    return torch.stack(grads)


def sft_gradients(config: Path, init: str, k: int, batch_size: int) -> torch.Tensor:
    """(K, P) gradients of the text-only cross-entropy on K batches of the data's text traces (the
    training prompts of `config`)."""
    cfg = load_config(TrainConfig, config, ["data.n_val=0"])
    backend = open_model("init", init)
    backend.disable_dropout()
    train = load_samples(cfg.data, get_task(cfg.data.task), "train", backend.cell_px)
    params = [p for p in backend.model.parameters() if p.requires_grad]
    backend.model.train()
    grads = []
    for step in range(k):
        rows = [backend.training_row(train[i], "text_only") for i in batch_indices(len(train), step, batch_size, 0)]
        losses = backend.sft_losses(rows)
        backend.model.zero_grad(set_to_none=True)
        (losses["ce_sum"] / losses["n_text"].clamp(min=1)).backward()
        grads.append(flat_grad(params))
    return torch.stack(grads)


def signal_and_noise(g: torch.Tensor) -> tuple[float, float]:
    """(|E g|, per-step noise power E|g - E g|^2) from K draws."""
    mean = g.mean(0)
    noise = ((g - mean) ** 2).sum(1).mean()
    signal = (mean.pow(2).sum() - noise / len(g)).clamp(min=0)
    return signal.sqrt().item(), noise.item()


def corrected_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(raw, corrected) cosine of E a and E b: cross-half cosines, divided by the geometric mean of
    each side's split-half self-agreement (NaN where a side has none)."""
    cos = torch.nn.functional.cosine_similarity
    a1, a2, b1, b2 = a[0::2].mean(0), a[1::2].mean(0), b[0::2].mean(0), b[1::2].mean(0)
    raw = ((cos(a1, b2, dim=0) + cos(a2, b1, dim=0)) / 2).item()
    sa, sb = cos(a1, a2, dim=0).item(), cos(b1, b2, dim=0).item()
    return raw, raw / (sa * sb) ** 0.5 if sa > 0 and sb > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="the checkpoint distillation starts from (an SFT teacher)")
    ap.add_argument("--config", type=Path, default=CONFIG,
                    help="the Visual-OPSD config whose data and sampling are used (default configs/train_demo.yaml; "
                         "a run's config.json works too)")
    ap.add_argument("--batches", type=int, default=32, help="K independent steps per kind (even)")
    ap.add_argument("--work", default="runs/gradient_directions", help="scratch folder for the runs' logs")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(args.work)
    grads = {}
    for vt_mode in ("data", "shuffled", "noise"):
        grads[vt_mode] = distill_gradients(args.config, args.init, vt_mode, args.batches, work)
    grads["content"] = grads["data"] - grads["shuffled"]
    grads["sft"] = sft_gradients(args.config, args.init, args.batches, batch_size=16)
    result: dict = {"kinds": {}, "cosines": {}}
    print("| kind | abs E g | SNR per step |\n|---|---|---|")
    for name, g in grads.items():
        signal, noise = signal_and_noise(g)
        result["kinds"][name] = {"expected_norm": signal, "snr": signal**2 / noise}
        print(f"| {name} | {signal:.4f} | {signal**2 / noise:.3f} |")
    print("\n| pair | cosine (raw) | cosine (corrected) |\n|---|---|---|")
    for a, b in (("data", "shuffled"), ("data", "noise"), ("data", "sft"), ("shuffled", "sft"),
                 ("noise", "sft"), ("content", "sft")):
        raw, corrected = corrected_cosine(grads[a], grads[b])
        result["cosines"][f"{a}/{b}"] = {"raw": raw, "corrected": corrected}
        print(f"| {a} vs {b} | {raw:+.3f} | {corrected:+.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
