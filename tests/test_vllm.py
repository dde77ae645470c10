"""The vLLM rollout engine (`rollout_engines.VLLMEngine`) on a tiny text-only Qwen2 (head dim 64).

Its own lane: `make test-vllm` installs the `vllm` extra into .venv-vllm and runs these with
VISUAL_OPSD_TEST_VLLM=1; everywhere else (`make test`) the module is skipped before vllm is
imported. Checked:
- vLLM's log-prob of each id it sampled agrees with the training backend's score of the same id
  (`Backend.score`, then log-softmax without the suppressed ids: the sampling distribution) within
  LOGPROB_TOL, before and AFTER a weight update (weights changed, synced, sampled again), and the
  update mattered (the old weights' scores no longer agree);
- image skip by stop-and-continue: the injected `<image_end>` is in the ids, flagged not sampled,
  with a NaN log-prob, and greedy ids equal the native engine's;
- LoRA: the merged weights reach vLLM;
- a few Visual-OPSD steps with `rollout.engine=vllm`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

if os.environ.get("VISUAL_OPSD_TEST_VLLM") != "1":
    pytest.skip("vLLM lane only (make test-vllm sets VISUAL_OPSD_TEST_VLLM=1)", allow_module_level=True)
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed: pip install 'visual-opsd[vllm]' (make test-vllm)", allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("peft")

from visual_opsd.backends.base import token_logprobs  # noqa: E402
from visual_opsd.backends.hf import HFBackend  # noqa: E402
from visual_opsd.backends.hf_config import HFOptions  # noqa: E402
from visual_opsd.rollout import collect_rollout  # noqa: E402
from visual_opsd.rollout_engines import NativeEngine, VLLMEngine  # noqa: E402
from visual_opsd.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.vllm
# fp32 on both sides; measured max |difference| ~1e-6 (vLLM's CPU kernels vs transformers' sdpa)
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def samples():
    return get_task("maze").generate(4, seed=0, split="train", sizes=(3, 4), cell_px=8)


def tiny(**options) -> HFBackend:
    return HFBackend.tiny("qwen2", HFOptions(device="cpu", tiny_hidden=128, **options), seed=0)


def logprob_gap(backend, contexts, rollout) -> float:
    """Largest |vLLM's log-prob - the backend's score| over the sampled ids of `rollout`."""
    with torch.no_grad():
        scores = backend.score(contexts, rollout.ids)
    gap = 0.0
    for r, (ids, flags, lps) in enumerate(zip(rollout.ids, rollout.sampled, rollout.logprobs, strict=True)):
        ref = token_logprobs(scores.logits[r, : len(ids)], torch.tensor(ids), 1.0, backend.suppressed_ids)
        for lp, want, sampled in zip(lps, ref.tolist(), flags, strict=True):
            assert math.isnan(lp) != sampled
            if sampled:
                gap = max(gap, abs(lp - want))
    return gap


def test_vllm_logprobs_agree_with_the_training_scores_after_a_weight_update(samples):
    backend = tiny()
    contexts = [backend.build_context(s) for s in samples[:2]]
    engine = VLLMEngine(backend)
    try:
        def rollout(seed):
            return collect_rollout(backend, samples[:2], contexts, n=2, max_new_tokens=24,
                                   generator=torch.Generator().manual_seed(seed), engine=engine)

        before = rollout(0)
        assert all(len(i) > 0 for i in before.ids) and len(before.ids) == 4
        gap_before = logprob_gap(backend, contexts, before)
        old = {k: v.clone() for k, v in backend.model.state_dict().items()}
        with torch.no_grad():  # an "optimizer step": every weight moves
            for p in backend.model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        engine.weights_changed()
        after = rollout(1)
        gap_after = logprob_gap(backend, contexts, after)
        new = {k: v.clone() for k, v in backend.model.state_dict().items()}
        backend.model.load_state_dict(old)  # the old weights no longer explain vLLM's samples
        gap_old = logprob_gap(backend, contexts, after)
        backend.model.load_state_dict(new)
        print(f"\nvLLM vs training scores, max |d logprob|: before update {gap_before:.2e}, after update "
              f"{gap_after:.2e}; against the stale weights {gap_old:.2e}")
        assert gap_before < LOGPROB_TOL and gap_after < LOGPROB_TOL
        assert gap_old > 100 * LOGPROB_TOL
    finally:
        engine.close()


def test_vllm_image_skip_by_stop_and_continue_matches_the_native_engine(samples):
    backend = tiny()
    with torch.no_grad():  # <image_start> overwhelmingly likely after the context and after <image_end>
        head = backend.model.get_output_embeddings().weight
        head[backend.image_start_id] = backend.model.model.norm.weight * 50
    contexts = [backend.build_context(samples[0])]
    engine = VLLMEngine(backend)
    try:
        (v,) = engine.sample(contexts, max_new_tokens=8, temperature=0.0, max_image_skips=1)
    finally:
        engine.close()
    (n,) = NativeEngine(backend).sample(contexts, max_new_tokens=8, temperature=0.0, max_image_skips=1)
    start, end = backend.image_start_id, backend.image_end_id
    i = v.ids.index(start)  # the first round stops there; <image_end> is injected; the second round
    assert v.ids[i + 1] == end and v.sampled[i : i + 2] == [True, False] and math.isnan(v.logprobs[i + 1])
    assert v.ids.count(start) == 2 and v.ids[-1] == start  # ... ends at the next image start (no skip left)
    assert v.image_skips == 1 and not v.finished and v.sampled.count(False) == 1
    assert (v.ids, v.sampled, v.image_skips, v.finished) == (n.ids, n.sampled, n.image_skips, n.finished)
    assert all(math.isnan(a) == math.isnan(b) and (math.isnan(a) or abs(a - b) < LOGPROB_TOL)
               for a, b in zip(v.logprobs, n.logprobs, strict=True))


def test_vllm_gets_lora_weights_merged(samples):
    backend = tiny(lora=True, lora_r=4)
    with torch.no_grad():  # non-zero adapters: the merged weights differ from the base
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    contexts = [backend.build_context(s) for s in samples[:2]]
    engine = VLLMEngine(backend)
    try:
        ro = collect_rollout(backend, samples[:2], contexts, n=1, max_new_tokens=16,
                             generator=torch.Generator().manual_seed(0), engine=engine)
    finally:
        engine.close()
    assert logprob_gap(backend, contexts, ro) < LOGPROB_TOL


def test_visual_opsd_runs_a_few_steps_with_the_vllm_engine(tmp_path, capsys):
    from visual_opsd.config import load_config
    from visual_opsd.train import TrainConfig, run_train

    tiny().save(tmp_path / "base")
    args = {"init_from": tmp_path / "base", "out_dir": tmp_path / "run", "threads": 1, "progress": "false",
            "data.sizes": "[3,3]", "data.n_train": 8, "data.n_val": 0, "optim.steps": 3, "optim.prompts_per_step": 2,
            "optim.warmup_steps": 0, "optim.lr": 1e-3, "rollout.n": 2, "rollout.max_new_tokens": 24,
            "rollout.engine": "vllm", "teacher.mode": "ema", "backend.kind": "hf", "backend.device": "cpu"}
    run_train(load_config(TrainConfig, None, [f"{k}={v}" for k, v in args.items()]))
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    with capsys.disabled():
        for s in steps:
            print(f"step {s['step']}: loss {s['loss']:.4f} grad_norm {s['grad_norm']:.3f} "
                  f"rollout/length {s['rollout/length']:.1f} tokens {s['tokens']}")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) and s["tokens"] > 0 for s in steps)
