"""Rollout engines and the native sampler (`rollout_engines.py`, `backends/base.py`), without vLLM.

- the device sampler (`sample_on_device`) keeps the image-skip rule and the record of the per-row
  loop (`sample_with_image_skip`): the same completions from the same logits;
- `sample_tokens` is an exact sampler (frequencies, never a suppressed or impossible id) and its
  log-probs are `token_logprobs`;
- every engine's `Rollout` carries per-token sampling log-probs; the native ones are the training
  backend's own scores of the same ids (mini, HF vision-language and HF text-only);
- the HF teacher encodes each context once for its n completions, with the scores of full rows;
- the HF backend's text-only mode (the text OPSD setting): contexts, save and reopen, a short
  Visual-OPSD run through the engine interface;
- the engine factory's errors. vLLM itself: tests/test_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import math

import pytest
import torch

from visual_opsd.backends.base import (
    Decoder,
    sample_on_device,
    sample_tokens,
    sample_with_image_skip,
    token_logprobs,
)
from visual_opsd.errors import ConfigError
from visual_opsd.rollout import collect_rollout
from visual_opsd.rollout_engines import NativeEngine, make_rollout_engine
from visual_opsd.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def samples():
    return get_task("maze").generate(6, seed=0, split="train", sizes=(3, 4), cell_px=8)


class ScriptedDecoder(Decoder):
    """Logits that make greedy decoding follow a script per row (one id per step and row)."""

    def __init__(self, script: list[list[int]], vocab: int = 12):
        self.script, self.vocab, self.t = script, vocab, 0
        self.fed: list[torch.Tensor] = []
        self.logits = self._at(0)

    def _at(self, t: int) -> torch.Tensor:
        logits = torch.zeros(len(self.script), self.vocab)
        for b, row in enumerate(self.script):
            logits[b, row[min(t, len(row) - 1)]] = 5.0
        return logits

    def step(self, ids, active):
        self.fed.append(ids.clone())
        self.t += 1
        self.logits = torch.where(active[:, None], self._at(self.t), self.logits)


class Markers:
    """The ids a sampler reads off a backend."""

    eos_id, image_start_id, image_end_id, suppressed_ids = 1, 2, 3, (0,)

    def decode(self, ids):
        return " ".join(map(str, ids))


# rows: plain to eos; image start, skip, text, eos; two image starts (second ends the row); budget
SCRIPT = [[5, 6, 1], [2, 7, 8, 1], [2, 4, 2, 9], [4, 5, 6, 7, 8, 9, 10, 11, 4, 5]]


@pytest.mark.parametrize("skips", [0, 1, 2])
def test_device_sampler_keeps_the_image_skip_rule_and_record_of_the_row_loop(skips):
    looped = sample_with_image_skip(Markers(), ScriptedDecoder(SCRIPT), 7, 0.0, skips)
    on_device = sample_on_device(Markers(), ScriptedDecoder(SCRIPT), 7, 0.0, skips)
    for a, b in zip(looped, on_device, strict=True):
        assert (a.ids, a.sampled, a.finished, a.image_skips, a.text) == (b.ids, b.sampled, b.finished,
                                                                          b.image_skips, b.text)
        assert len(a.logprobs) == len(b.logprobs) == len(a.ids)
        for x, y, s in zip(a.logprobs, b.logprobs, a.sampled, strict=True):
            assert (math.isnan(x) and math.isnan(y) and not s) or (s and x == pytest.approx(y, abs=1e-6))
    if skips == 1:  # row 1: <image_start> <image_end> (injected) then the script goes on
        assert on_device[1].ids[:2] == [2, 3] and on_device[1].sampled[:2] == [True, False]
        assert on_device[1].image_skips == 1 and not on_device[0].image_skips


def test_sample_tokens_is_exact_and_its_logprobs_are_token_logprobs():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0, 0.5]]).repeat(40_000, 1)
    logits[:, 5] = float("-inf")  # impossible
    gen = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        ids, lp = sample_tokens(logits, temperature, gen, suppressed_ids=(3,))
        probs = torch.softmax(logits[0].index_fill(0, torch.tensor([3]), float("-inf")) / temperature, -1)
        freq = torch.bincount(ids, minlength=6).float() / len(ids)
        assert freq[3] == 0 and freq[5] == 0
        assert torch.allclose(freq, probs, atol=0.01)  # 40,000 draws: binomial sd < 0.0025
        assert torch.allclose(lp, token_logprobs(logits, ids, temperature, (3,)), atol=1e-6)
        assert torch.allclose(lp, probs.log()[ids], atol=1e-5)
    ids, lp = sample_tokens(logits[:2], 0.0, gen, (0,))
    assert ids.tolist() == [3, 3] and torch.allclose(lp, torch.log_softmax(logits[0].index_fill(0, torch.tensor([0]),
                                                                                                 float("-inf")), -1)[3])


def assert_logprobs_are_the_scores(backend, contexts, rollout):
    """Each sampled id's recorded log-prob is the backend's own score of it (suppressed ids removed,
    temperature 1); injected ids carry NaN."""
    with torch.no_grad():
        scores = backend.score(contexts, rollout.ids)
    for r, (ids, flags, lps) in enumerate(zip(rollout.ids, rollout.sampled, rollout.logprobs, strict=True)):
        assert len(lps) == len(ids)
        ref = token_logprobs(scores.logits[r, : len(ids)], torch.tensor(ids), 1.0, backend.suppressed_ids)
        for lp, want, sampled in zip(lps, ref.tolist(), flags, strict=True):
            assert math.isnan(lp) if not sampled else lp == pytest.approx(want, abs=1e-4)


def test_native_rollouts_of_the_mini_backend_record_their_scores(samples):
    from visual_opsd.backends.mini import MiniBackend
    from visual_opsd.tokenizer import build_tokenizer, sample_texts

    backend = MiniBackend.new(build_tokenizer(sample_texts(samples)), seed=0, d_model=32, n_layers=2, n_heads=2)
    contexts = [backend.build_context(s) for s in samples[:2]]
    ro = collect_rollout(backend, samples[:2], contexts, n=2, max_new_tokens=12,
                         generator=torch.Generator().manual_seed(0))
    assert_logprobs_are_the_scores(backend, contexts, ro)
    data = collect_rollout(backend, samples[:2], contexts, n=2, source="data")
    assert data.logprobs is None and data.cut([3, None, 1, 0]).logprobs is None
    cut = ro.cut([3, None, 1, 0])
    assert [len(x) for x in cut.logprobs] == [len(x) for x in cut.ids]


hf = pytest.importorskip  # the HF tests below need transformers (and peft for the backend module)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen2"])
def test_native_hf_rollouts_record_their_scores_and_the_teacher_shares_its_prefix(samples, family):
    hf("transformers")
    hf("peft")
    from visual_opsd.backends.hf import HFBackend

    backend = HFBackend.tiny(family, seed=1)
    contexts = [backend.build_context(s) for s in samples[:2]]
    ro = collect_rollout(backend, samples[:2], contexts, n=3, max_new_tokens=10,
                         generator=torch.Generator().manual_seed(0), engine=NativeEngine(backend))
    assert_logprobs_are_the_scores(backend, contexts, ro)
    # teacher scoring (no gradient) encodes each context once for its 3 completions: the scores of
    # full context + completion rows (what the student, with gradient, runs)
    teacher = [backend.build_context(s, "teacher") for s in samples[:2]]
    full = backend.score(teacher, ro.ids).logits.detach()
    with torch.no_grad():
        shared = backend.score(teacher, ro.ids)
    mask = shared.mask
    assert torch.allclose(shared.logits[mask], full[mask], atol=1e-5)
    assert mask.sum(1).tolist() == [len(i) for i in ro.ids]


def test_hf_text_only_mode_contexts_and_round_trip(samples, tmp_path):
    hf("transformers")
    hf("peft")
    from visual_opsd.backends import open_backend
    from visual_opsd.backends.hf import HFBackend
    from visual_opsd.backends.hf_config import HFOptions

    backend = HFBackend.tiny("qwen2")
    assert backend.text_only and backend.image_start_id >= 0 and not backend.mrope
    s = samples[0]
    student, teacher = backend.build_context(s, "student"), backend.build_context(s, "teacher")
    s_text, t_text = backend.tokenizer.decode(student.ids), backend.tokenizer.decode(teacher.ids)
    reference = backend.tokenizer.decode(backend.tokenizer(s.text_only_trace, add_special_tokens=False)["input_ids"])
    assert reference in t_text and reference not in s_text and backend.options.text_framing in t_text
    none = backend.tokenizer.decode(backend.build_context(s, "teacher", "none").ids)
    assert reference not in none and backend.options.text_framing in none
    with pytest.raises(ValueError, match="no text form"):
        backend.build_context(s, "teacher", "noise")
    backend.save(tmp_path / "m")
    again = open_backend(tmp_path / "m")
    assert again.text_only and again.build_context(s, "teacher").ids == teacher.ids
    with torch.no_grad():
        assert torch.equal(again.score([student], [[5, 6, 7]]).logits, backend.score([student], [[5, 6, 7]]).logits)
    lora = HFBackend.tiny("qwen2", HFOptions(lora=True, lora_r=4))  # the default target names a VLM's modules
    assert any("lora_A" in n for n, _ in lora.model.named_parameters())


def test_text_only_visual_opsd_runs_through_the_engine_interface(tmp_path):
    hf("transformers")
    hf("peft")
    import json

    from visual_opsd.backends.hf import HFBackend
    from visual_opsd.config import load_config
    from visual_opsd.train import TrainConfig, run_train

    HFBackend.tiny("qwen2").save(tmp_path / "base")
    args = {"init_from": tmp_path / "base", "out_dir": tmp_path / "run", "threads": 1, "progress": "false",
            "data.sizes": "[3,3]", "data.n_train": 4, "data.n_val": 0, "optim.steps": 2, "optim.prompts_per_step": 2,
            "optim.warmup_steps": 0, "rollout.n": 2, "rollout.max_new_tokens": 12, "rollout.engine": "native",
            "teacher.mode": "ema"}
    run_train(load_config(TrainConfig, None, [f"{k}={v}" for k, v in args.items()]))
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["tokens"] > 0 for s in steps if "loss" in s)


def test_engine_factory_names_what_is_wrong(samples):
    from visual_opsd.backends.mini import MiniBackend
    from visual_opsd.tokenizer import build_tokenizer, sample_texts

    mini = MiniBackend.new(build_tokenizer(sample_texts(samples)), seed=0, d_model=32, n_layers=1, n_heads=2)
    assert isinstance(make_rollout_engine("native", mini), NativeEngine)
    with pytest.raises(ConfigError, match="not one of"):
        make_rollout_engine("sglang", mini)
    with pytest.raises(ConfigError, match="one process"):
        make_rollout_engine("vllm", mini, world=2)
    with pytest.raises(ConfigError, match="Hugging Face backend"):
        make_rollout_engine("vllm", mini)
