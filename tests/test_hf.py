"""The Hugging Face backend on tiny models built in code (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from visual_opsd.backends import backend_kind, hf_compat, open_backend  # noqa: E402
from visual_opsd.backends.hf import HFBackend, merged_state_dict, unwrap  # noqa: E402
from visual_opsd.backends.hf_config import HFOptions  # noqa: E402
from visual_opsd.backends.hf_tiny import FAMILIES, tiny_model  # noqa: E402
from visual_opsd.losses import fused_linear_generalized_jsd, generalized_jsd  # noqa: E402
from visual_opsd.tasks import get_task  # noqa: E402
from visual_opsd.teacher import Teacher  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samples():
    return get_task("maze").generate(6, seed=0, split="train", sizes=(3, 4), cell_px=8)


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request):
    return HFBackend.tiny(request.param)


def completions(backend, samples):
    return [backend.encode_completion(s.text_only_completion())[: 6 + 3 * i] for i, s in enumerate(samples)]


def processor_inputs(backend, ids, pixels):
    """What a user's own forward gets from the processor (the model computes positions itself)."""
    x = torch.tensor([ids])
    extra = {"mm_token_type_ids": (x == backend.image_token_id).int()} if backend.mrope else {}
    return {"input_ids": x, **extra, **pixels}


# --------------------------------------------------------------------------------------------
# the torchvision workaround


def test_compat_is_inactive_with_torchvision(monkeypatch):
    cls = transformers.Qwen2VLProcessor
    monkeypatch.setattr(hf_compat, "HAS_TORCHVISION", True)
    assert hf_compat.processor_class(cls) is cls
    monkeypatch.setattr(hf_compat, "HAS_TORCHVISION", False)
    twin = hf_compat.processor_class(cls)
    assert twin is not cls and issubclass(twin, cls) and twin.__name__ == cls.__name__
    assert "video_processor" not in twin.get_attributes()
    assert hf_compat.processor_class(transformers.LlavaProcessor) is transformers.LlavaProcessor  # no videos


def test_every_torchvision_branch_is_the_plain_transformers_path_with_torchvision(monkeypatch, tmp_path):
    """With torchvision the compat module hands out transformers' own classes and calls: the
    torchvision image processors, the video processor, `AutoProcessor.from_pretrained`."""

    class Recorder:  # a processor class that records what it was built with
        def __init__(self, **parts):
            self.parts = parts

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer", "video_processor"]

    video = object()
    monkeypatch.setattr(hf_compat, "HAS_TORCHVISION", True)
    assert hf_compat.image_processor_class("Qwen2VL") is transformers.Qwen2VLImageProcessor
    assert hf_compat.image_processor_class("CLIP") is transformers.CLIPImageProcessor
    built = hf_compat.build_processor(Recorder, "ip", "tok", "tpl", video_processor=lambda: video)
    assert type(built) is Recorder and built.parts["video_processor"] is video
    calls = []
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda path: calls.append(path) or "auto")
    assert hf_compat.load_processor(tmp_path) == "auto" and calls == [tmp_path]
    monkeypatch.setattr(hf_compat, "HAS_TORCHVISION", False)
    assert hf_compat.image_processor_class("Qwen2VL") is transformers.Qwen2VLImageProcessorPil

    def no_video():
        raise AssertionError("the video processor must not be built without torchvision")

    built = hf_compat.build_processor(Recorder, "ip", "tok", "tpl", video_processor=no_video)
    assert type(built) is not Recorder and "video_processor" not in built.parts


def test_no_module_but_the_compat_one_tests_for_torchvision():
    import re
    from pathlib import Path

    import visual_opsd

    probe = re.compile(r"import torchvision|from torchvision|HAS_TORCHVISION|_torchvision_available")
    hits = [p.name for p in Path(visual_opsd.__file__).parent.rglob("*.py") if probe.search(p.read_text())]
    assert hits == ["hf_compat.py"]


@pytest.mark.skipif(hf_compat.HAS_TORCHVISION, reason="the workaround is only active without torchvision")
def test_processor_round_trip_without_torchvision(tmp_path, samples):
    _, processor = tiny_model("qwen2_5_vl")
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"  # the standard name, loadable elsewhere
    loaded = hf_compat.load_processor(tmp_path)
    assert type(loaded).__name__ == "Qwen2_5_VLProcessor"
    text = "<|vision_start|><|image_pad|><|vision_end|>hi"
    a = processor(text=[text], images=[samples[0].problem_images[0]], return_tensors="pt")
    b = loaded(text=[text], images=[samples[0].problem_images[0]], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="no processor_class"):
        hf_compat.load_processor(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# contexts, scoring, decoding


def test_contexts_differ_only_in_the_user_turn(backend, samples):
    s = samples[0]
    student, teacher = backend.build_context(s), backend.build_context(s, "teacher")
    assert student.role == "student" and teacher.vt_mode == "data"
    kinds = [seg.kind for seg in teacher.segments]
    assert kinds.count("problem_image") == 1 and kinds.count("vt_image") == len(s.vt_images)
    assert teacher.num_tokens == len(teacher.ids) and student.num_tokens == len(student.ids)
    tail = len(
        backend.tokenizer(
            backend.processor.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            ).split("x")[-1],
            add_special_tokens=False,
        )["input_ids"]
    )
    assert student.ids[-tail:] == teacher.ids[-tail:]  # the same generation prompt
    none = backend.build_context(s, "teacher", "none")
    assert [seg.kind for seg in none.segments].count("vt_image") == 0
    with pytest.raises(ValueError, match="role must be"):
        backend.build_context(s, "judge")


def test_noise_vts_are_fresh_normal_pixels_at_the_same_size(backend, samples):
    s = samples[0]
    data = backend.build_context(s, "teacher")
    g = torch.Generator().manual_seed
    a = backend.build_context(s, "teacher", "noise", generator=g(1))
    b = backend.build_context(s, "teacher", "noise", generator=g(1))
    c = backend.build_context(s, "teacher", "noise", generator=g(2))
    assert a.ids == data.ids and a.pixels["pixel_values"].shape == data.pixels["pixel_values"].shape
    assert torch.equal(a.pixels["pixel_values"], b.pixels["pixel_values"])
    assert not torch.equal(a.pixels["pixel_values"], c.pixels["pixel_values"])
    n_problem = (
        data.pixels["pixel_values"].shape[0]
        - (a.pixels["pixel_values"] != data.pixels["pixel_values"]).any(-1 if backend.mrope else (1, 2, 3)).sum()
    )
    assert n_problem > 0  # the problem image is untouched, only the VT is noise


def test_decoder_matches_batched_scoring(backend, samples):
    """KV-cache decoding (left padding, explicit positions) gives the logits of a full forward."""
    contexts = [backend.build_context(s) for s in samples[:2]]
    comps = completions(backend, samples[:4])  # 2 per context, different lengths
    with torch.no_grad():
        scores = backend.score(contexts, comps)
        dec = backend.decoder(contexts, n=2)
        steps = [dec.logits]
        for t in range(scores.mask.shape[1] - 1):
            active = torch.tensor([t < len(c) for c in comps])
            dec.step(torch.tensor([c[t] if t < len(c) else 0 for c in comps]), active)
            steps.append(dec.logits)
    decoded = torch.stack(steps, 1)  # (4, T, V)
    assert scores.logits.shape == decoded.shape and scores.logits.shape[-1] == backend.vocab_size
    assert torch.allclose(decoded[scores.mask], scores.logits[scores.mask], atol=1e-5)
    # each row alone scores the same as in the padded batch
    with torch.no_grad():
        alone = backend.score([contexts[1]], [comps[3]]).logits[0]
    assert torch.allclose(alone, scores.logits[3, : len(comps[3])], atol=1e-5)
    assert scores.mask.sum(1).tolist() == [len(c) for c in comps]


def test_hidden_output_reproduces_logits_and_the_fused_loss(backend, samples):
    contexts = [backend.build_context(s) for s in samples[:2]]
    teacher_ctx = [backend.build_context(s, "teacher") for s in samples[:2]]
    comps = completions(backend, samples[:2])
    s_log, s_hid = backend.score(contexts, comps), backend.score(contexts, comps, output="hidden")
    assert s_hid.logits is None and s_hid.head_weight.shape[0] == backend.vocab_size
    assert torch.allclose(s_hid.hidden @ s_hid.head_weight.T, s_log.logits, atol=1e-5)
    with torch.no_grad():
        t_log, t_hid = backend.score(teacher_ctx, comps), backend.score(teacher_ctx, comps, output="hidden")
    mask = s_log.mask
    ref = generalized_jsd(s_log.logits, t_log.logits, mask=mask, reduction="token_mean", top_k=16)
    fused = fused_linear_generalized_jsd(
        s_hid.hidden[mask],
        t_hid.hidden[mask],
        s_hid.head_weight,
        teacher_weight=t_hid.head_weight.detach(),
        reduction="token_mean",
        top_k=16,
    )
    assert torch.allclose(ref, fused, atol=1e-6)
    g_ref = torch.autograd.grad(ref, backend.model.get_output_embeddings().weight)[0]
    g_fused = torch.autograd.grad(fused, backend.model.get_output_embeddings().weight)[0]
    assert torch.allclose(g_ref, g_fused, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_never_emits_image_placeholders(samples, family):
    backend = HFBackend.tiny(family, seed=1)
    config = backend.model.config
    placeholders = {backend.image_token_id, getattr(config, "video_token_id", None)} - {None}
    assert placeholders <= set(backend.suppressed_ids)
    head = backend.model.get_output_embeddings().weight
    with torch.no_grad():  # make the image placeholders overwhelmingly likely
        for i in placeholders:
            head[i] = backend.model.model.language_model.norm.weight * 50
    contexts = [backend.build_context(s) for s in samples[:2]]
    for temperature in (1.0, 0.0):
        out = backend.sample(
            contexts, n=2, max_new_tokens=8, temperature=temperature, generator=torch.Generator().manual_seed(0)
        )
        assert all(c.ids and not placeholders & set(c.ids) for c in out)
    with torch.no_grad():
        backend.score(contexts, [c.ids for c in out])  # re-scoring works ("image tokens do not match" never)


def test_image_skip_injects_the_end_marker(samples):
    backend = HFBackend.tiny("qwen2_5_vl", seed=2)
    with torch.no_grad():
        head = backend.model.get_output_embeddings().weight
        head[backend.image_start_id] = backend.model.model.language_model.norm.weight * 50
    contexts = [backend.build_context(samples[0])]
    (c,) = backend.sample(contexts, max_new_tokens=5, temperature=0.0, max_image_skips=1)
    assert c.ids[:3] == [backend.image_start_id, backend.image_end_id, backend.image_start_id]
    assert c.sampled[:3] == [True, False, True] and c.image_skips == 1 and not c.finished
    assert "<|vision_start|>" in c.text
    llava = HFBackend.tiny("llava")
    assert llava.image_start_id == -1  # no image marker in LLaVA's chat format: no image skip


def test_padded_output_head_is_cut_to_the_tokenizer(samples):
    model, processor = tiny_model("qwen2_vl", extra_vocab=8)
    backend = HFBackend(model, processor)
    assert model.get_output_embeddings().weight.shape[0] == backend.vocab_size + 8
    contexts = [backend.build_context(samples[0])]
    comps = completions(backend, samples[:1])
    assert backend.score(contexts, comps).logits.shape[-1] == backend.vocab_size
    assert backend.score(contexts, comps, output="hidden").head_weight.shape[0] == backend.vocab_size
    out = backend.sample(contexts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert max(out[0].ids) < backend.vocab_size


def test_max_length_cuts_completions_never_images(samples):
    backend = HFBackend.tiny("qwen2_5_vl")
    ctx = backend.build_context(samples[0])
    backend.options.max_length = len(ctx.ids) + 4
    try:
        comps = completions(backend, samples[:1])
        scores = backend.score([ctx], comps)
        assert scores.mask.sum() == 4 and backend.truncated_tokens == len(comps[0]) - 4
        backend.options.max_length = len(ctx.ids)
        with pytest.raises(ValueError, match="never cut through an image"):
            backend.build_context(samples[0])
        backend.options.max_length = len(ctx.ids) + 20
        row = backend.training_row(samples[0], "interleaved")
        image_ids = [i for i in row.ids[len(ctx.ids) :] if i == backend.image_token_id]
        assert len(row.ids) <= len(ctx.ids) + 20 and not image_ids  # the VT block did not fit: cut before it
    finally:
        backend.options.max_length = None


# --------------------------------------------------------------------------------------------
# training: SFT rows, LoRA teachers


def test_sft_rows_label_only_the_answer(samples):
    backend = HFBackend.tiny("qwen2_5_vl")
    s = samples[0]
    ctx = backend.build_context(s)
    row = backend.training_row(s, "interleaved")
    labelled = [row.ids[j + 1] for j, lab in enumerate(row.labels) if lab != -100]
    assert all(lab == -100 for lab in row.labels[: len(ctx.ids) - 1])  # no loss on the prompt
    assert backend.image_token_id not in labelled and backend.image_end_id not in labelled
    assert backend.image_start_id in labelled and labelled[-1] == backend.eos_id
    n_grid = row.pixels["image_grid_thw"].shape[0]
    assert n_grid == 1 + len(s.vt_images)  # the problem image and the VT inside the answer
    teacher_row = backend.training_row(s, "teacher_context")
    assert len(teacher_row.ids) > len(backend.training_row(s, "text_only").ids)
    opt = torch.optim.AdamW(backend.model.parameters(), lr=2e-3)
    losses = []
    for _ in range(3):
        out = backend.sft_losses([row, teacher_row])
        loss = out["ce_sum"] / out["n_text"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="unknown SFT example kind"):
        backend.training_row(s, "video")


def test_lora_frozen_teacher_is_the_base_model_without_a_copy(samples):
    backend = HFBackend.tiny("qwen2_5_vl", HFOptions(lora=True, lora_r=4))
    model = backend.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # adapters only on the language model
    contexts = [backend.build_context(s) for s in samples[:2]]
    comps = completions(backend, samples[:2])
    with torch.no_grad():
        base = backend.score(contexts, comps).logits
    frozen = Teacher(model, "frozen", base_weights=backend.adapters_disabled)
    ema = Teacher(model, "ema", decay=0.5)
    assert frozen.shadow == {} and set(ema.shadow) == trainable  # ema shadows adapter weights only
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    with torch.no_grad():
        student = backend.score(contexts, comps).logits
    with frozen.weights():
        teacher = backend.score(contexts, comps).logits
    assert not torch.allclose(student, base, atol=1e-4)
    assert torch.allclose(teacher, base, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(backend.score(contexts, comps).logits, student)  # adapters back on


def test_teacher_scoring_runs_without_dropout(samples):
    backend = HFBackend.tiny("qwen2_vl", HFOptions(lora=True, lora_r=4, lora_dropout=0.5))
    backend.model.train()
    contexts, comps = [backend.build_context(samples[0])], completions(backend, samples[:1])
    with torch.no_grad():
        a, b = backend.score(contexts, comps).logits, backend.score(contexts, comps).logits
    assert torch.equal(a, b) and backend.model.training  # no-grad scoring is deterministic; mode restored


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(samples, lora):
    grads = []
    for checkpointing in (False, True):
        backend = HFBackend.tiny("qwen3_vl", HFOptions(lora=lora, lora_r=4, gradient_checkpointing=checkpointing))
        language_model = unwrap(backend.model).model.language_model
        assert language_model.gradient_checkpointing is checkpointing  # really on (or off)
        backend.model.train()
        out = backend.sft_losses([backend.training_row(samples[0], "teacher_context")])
        out["ce_sum"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in backend.model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------------------------
# saving: the standard HF layout, from_pretrained with identical logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_from_pretrained_gives_identical_logits(tmp_path, samples, family):
    backend = HFBackend.tiny(family)
    ctx = backend.build_context(samples[0], "teacher")
    comp = completions(backend, samples[:1])[0]
    with torch.no_grad():
        ref = backend.score([ctx], [comp]).logits[0]
    backend.save(tmp_path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**processor_inputs(backend, ctx.ids + comp, ctx.pixels)).logits[0]
    assert torch.equal(logits[len(ctx.ids) - 1 : -1, : backend.vocab_size], ref)
    assert backend_kind(tmp_path) == "hf"
    reloaded = open_backend(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded.score([ctx], [comp]).logits[0], ref)


def test_pickled_weights_are_refused_without_being_read(tmp_path, monkeypatch):
    HFBackend.tiny("qwen2_vl").save(tmp_path)
    for path in tmp_path.glob("*.safetensors"):
        path.rename(path.with_name("pytorch_model.bin"))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors only"):
        HFBackend.load(tmp_path)


def test_lora_saves_merged_weights_and_the_adapter_and_resumes_exactly(tmp_path, samples):
    HFBackend.tiny("qwen2_5_vl").save(tmp_path / "base")
    options = HFOptions(lora=True, lora_r=4)
    backend = HFBackend.load(tmp_path / "base", options)
    with torch.no_grad():
        for p in backend.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    ctx = backend.build_context(samples[0])
    comp = completions(backend, samples[:1])[0]
    with torch.no_grad():
        ref = backend.score([ctx], [comp]).logits[0]
    assert all("lora_" not in k for k in merged_state_dict(backend.model))
    backend.save(tmp_path / "out")
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = merged(**processor_inputs(backend, ctx.ids + comp, ctx.pixels)).logits[0]
    assert torch.allclose(logits[len(ctx.ids) - 1 : -1], ref, atol=1e-5)  # merged: equal up to fp32 rounding
    from peft import PeftModel

    base = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    adapter = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    with torch.no_grad():
        logits = adapter(**processor_inputs(backend, ctx.ids + comp, ctx.pixels)).logits[0]
    assert torch.allclose(logits[len(ctx.ids) - 1 : -1], ref, atol=1e-6)
    resumed = open_backend(tmp_path / "out", options, resume=True)
    assert resumed.lora and resumed.source == str((tmp_path / "base").resolve())
    with torch.no_grad():
        assert torch.equal(resumed.score([ctx], [comp]).logits[0], ref)  # the adapter itself: exact
    fresh = open_backend(tmp_path / "out", options)  # not a resume: merged weights + new adapters
    with torch.no_grad():
        assert torch.allclose(fresh.score([ctx], [comp]).logits[0], ref, atol=1e-5)


def test_lora_adapter_alone_loads_with_from_pretrained(tmp_path, samples):
    """backend.save_merged=false: the adapter alone (no full weights); transformers' own loader reads it
    (base from adapter_config.json + adapter) with the logits of the trained model."""
    HFBackend.tiny("qwen2_vl").save(tmp_path / "base")
    backend = HFBackend.load(tmp_path / "base", HFOptions(lora=True, lora_r=4, save_merged=False))
    with torch.no_grad():
        for p in backend.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    ctx = backend.build_context(samples[0], "teacher")
    comp = completions(backend, samples[:1])[0]
    with torch.no_grad():
        ref = backend.score([ctx], [comp]).logits[0]
    backend.save(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors")) and not (tmp_path / "out" / "config.json").exists()
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "adapter")
    with torch.no_grad():
        logits = model(**processor_inputs(backend, ctx.ids + comp, ctx.pixels)).logits[0]
    assert torch.allclose(logits[len(ctx.ids) - 1 : -1], ref, atol=1e-6)
    assert backend_kind(tmp_path / "out") == "hf"
    reloaded = open_backend(tmp_path / "out")  # no merged weights: base + adapter, merged on load
    with torch.no_grad():
        assert torch.allclose(reloaded.score([ctx], [comp]).logits[0], ref, atol=1e-5)


def test_open_backend_dispatch_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_backend(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a model folder"):
        backend_kind(tmp_path)
    backend = HFBackend.tiny("llava")
    assert backend.cell_px == 8 and HFBackend.tiny("qwen2_vl").cell_px == 8
    with pytest.raises(NotImplementedError, match="eval.modes"):
        backend.generate_interleaved([])
    with pytest.raises(ValueError, match="tiny_hidden"):
        HFOptions(tiny_hidden=12)


# --------------------------------------------------------------------------------------------
# the commands


@pytest.mark.slow  # sft, then Visual-OPSD from its result: the pipeline through the command line
def test_sft_then_lora_visual_opsd_from_the_command_line(tmp_path):
    from visual_opsd.cli import main

    common = ["threads=1", "progress=false", "data.n_train=64", "data.n_val=4", "data.sizes=[3,3]"]
    assert (
        main(
            [
                "sft",
                "model.backend.tiny=qwen2_5_vl",
                f"out_dir={tmp_path}/sft",
                "optim.steps=3",
                "optim.batch_size=4",
                "eval.every=3",
                "eval.modes=[text,teacher_context]",
                "eval.max_new_tokens=16",
                *common,
            ]
        )
        == 0
    )
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
    assert (
        main(
            [
                "train",
                f"init_from={tmp_path}/sft/final",
                f"out_dir={tmp_path}/opsd",
                "backend.lora=true",
                "backend.lora_r=4",
                "teacher.mode=frozen",
                "optim.steps=2",
                "optim.prompts_per_step=2",
                "rollout.n=2",
                "rollout.max_new_tokens=12",
                "eval.max_new_tokens=12",
                "loss.fused=true",
                "save_every=1",
                *common,
            ]
        )
        == 0
    )
    last = tmp_path / "opsd" / "last"
    assert (last / "model" / "adapter" / "adapter_config.json").is_file()
    assert not (last / "teacher.safetensors").exists()  # frozen LoRA teacher: no shadow weights
    rows = [json.loads(line) for line in (tmp_path / "opsd" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and r["loss"] >= 0 for r in rows)


def test_lora_ema_run_shadows_adapters_only_and_resumes_exactly(tmp_path):
    """A LoRA Visual-OPSD run with an EMA teacher: the teacher state holds the adapter weights only,
    and a run resumed from its step-1 checkpoint ends with the uninterrupted run's adapter and teacher."""
    from safetensors.torch import load_file

    from visual_opsd.cli import main

    HFBackend.tiny("qwen2_5_vl").save(tmp_path / "base")
    common = [
        f"init_from={tmp_path}/base",
        "threads=1",
        "progress=false",
        "data.n_train=8",
        "data.n_val=2",
        "data.sizes=[3,3]",
        "backend.lora=true",
        "backend.lora_r=4",
        "teacher.mode=ema",
        "teacher.ema_decay=0.5",
        "optim.steps=2",
        "optim.prompts_per_step=2",
        "optim.lr=0.01",
        "optim.warmup_steps=1",
        "rollout.n=2",
        "rollout.max_new_tokens=10",
        "eval.every=100",
        "eval.max_new_tokens=10",
        "loss.fused=true",
        "save_every=1",
    ]
    assert main(["train", f"out_dir={tmp_path}/a", *common]) == 0
    assert main(["train", f"out_dir={tmp_path}/b", f"resume={tmp_path}/a/last.prev", *common]) == 0

    def state(run: str) -> tuple[dict, dict]:
        last = tmp_path / run / "last"
        return (
            load_file(str(last / "model" / "adapter" / "adapter_model.safetensors")),
            load_file(str(last / "teacher.safetensors")),
        )

    (adapter_a, teacher_a), (adapter_b, teacher_b) = state("a"), state("b")
    assert teacher_a and all("lora_" in k for k in teacher_a)  # the EMA shadows the adapters, nothing else
    assert len(teacher_a) == len(adapter_a)
    assert json.loads((tmp_path / "a" / "last.prev" / "trainer_state.json").read_text())["step"] == 1
    assert json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())["step"] == 2
    step1 = load_file(str(tmp_path / "a" / "last.prev" / "model" / "adapter" / "adapter_model.safetensors"))
    assert not all(torch.equal(step1[k], adapter_a[k]) for k in step1)  # step 2 did change the adapter
    for a, b in ((adapter_a, adapter_b), (teacher_a, teacher_b)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


REAL_MODEL_CONFIGS = sorted(
    p for p in (Path(__file__).parents[1] / "configs").glob("*_hf_*.yaml") if "tiny" not in p.name
)
SMOKE = {  # sizes only: every hf.*, loss.*, teacher.* and data format setting stays as shipped
    "sft": [
        "optim.steps=1",
        "optim.batch_size=2",
        "optim.warmup_steps=0",
        "eval.every=1",
        "eval.max_new_tokens=8",
        "eval.batch_size=2",
        "data.n_val=2",
    ],
    "train": [
        "optim.steps=1",
        "optim.prompts_per_step=2",
        "optim.grad_accum=2",
        "optim.warmup_steps=0",
        "rollout.n=2",
        "rollout.max_new_tokens=8",
        "eval.every=1",
        "eval.max_new_tokens=8",
        "data.n_val=2",
        "save_every=1",
    ],
}


def test_real_model_configs_are_shipped():
    names = {p.name for p in REAL_MODEL_CONFIGS}
    assert {"sft_hf_qwen25vl_7b_lora.yaml", "train_hf_qwen25vl_7b_lora.yaml", "train_hf_qwen25vl_3b_full.yaml"} <= names


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: p.name)
def test_real_model_config_loads_validates_and_runs_on_a_tiny_model(path, tmp_path, samples):
    """Each example config for a real model: its header holds its launch command, it loads and
    validates as shipped, and it runs one step unchanged but for the model folder (a tiny Qwen2.5-VL
    saved in the HF layout), the data folder (native maze rows) and sizes."""
    from visual_opsd.cli import main
    from visual_opsd.config import load_config
    from visual_opsd.data import write_dataset
    from visual_opsd.sft import SFTConfig
    from visual_opsd.train import TrainConfig

    command = path.stem.split("_")[0]
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"visual-opsd {command} --config configs/{path.name}" in line for line in header), path.name
    cfg = load_config({"sft": SFTConfig, "train": TrainConfig}[command], path)
    hf = cfg.model.backend if command == "sft" else cfg.backend
    assert hf.tiny is None and hf.dtype == "bfloat16" and hf.max_length and hf.gradient_checkpointing
    assert (cfg.model.init_from if command == "sft" else cfg.init_from) and cfg.data.path
    if command == "train":
        assert cfg.loss.fused and cfg.optim.prompts_per_step % cfg.optim.grad_accum == 0

    HFBackend.tiny("qwen2_5_vl").save(tmp_path / "model")
    write_dataset(samples[:4], tmp_path / "data")
    init = "model.init_from" if command == "sft" else "init_from"
    overrides = [
        f"{init}={tmp_path}/model",
        f"data.path={tmp_path}/data",
        f"out_dir={tmp_path}/out",
        "threads=1",
        "progress=false",
        *SMOKE[command],
    ]
    assert main([command, "--config", str(path), *overrides]) == 0
    out = tmp_path / "out" / ("final" if command == "sft" else "last/model")
    lora = (cfg.model.backend if command == "sft" else cfg.backend).lora
    assert (out / "config.json").is_file() and (out / "adapter").is_dir() == lora


def test_diagnose_kl_opens_an_hf_folder_through_the_registry(tmp_path):
    """`diagnose` opens model folders through the backend registry, so an HF folder works there as in
    `train` and `eval`: the KL diagnostic on identical data tokens, with its sanity checks."""
    from visual_opsd.config import load_config
    from visual_opsd.diagnostics.run import DiagnoseConfig, diagnose

    HFBackend.tiny("qwen2_5_vl").save(tmp_path / "model")
    cfg = load_config(DiagnoseConfig, None, [
        "what=kl", f"model={tmp_path / 'model'}", f"out_dir={tmp_path / 'out'}", "threads=1", "progress=false",
        "data.n=3", "data.sizes=[3,3]", "kl.sources=[data]", "kl.sanity_samples=2", "kl.max_new_tokens=8",
    ])
    metrics = diagnose(cfg)["kl"]
    assert metrics["kl/sanity/passed"] == 1.0
    k = [v for key, v in metrics.items() if key.startswith("kl/data/") and key.endswith("/mean")]
    assert k and all(v >= 0 and math.isfinite(v) for v in k)


def test_fsdp_shards_full_fine_tuning_but_not_lora():
    """Full fine-tuning may be sharded by FSDP2 (the 2-process run is in test_distributed.py); a LoRA
    model stops at start pointing to data parallel or ZeRO-3; one process shards nothing."""
    from visual_opsd.distributed import Dist
    from visual_opsd.errors import ConfigError

    full, lora = HFBackend.tiny("qwen2_5_vl"), HFBackend.tiny("qwen2_5_vl", HFOptions(lora=True, lora_r=4))
    assert full.supports_sharding and not lora.supports_sharding
    assert Dist(None).check_engine(full, shard_weights=True) == "torch"
    with pytest.raises(ConfigError, match="HFBackend backend .*deepspeed_zero3.yaml"):
        Dist(None).check_engine(lora, shard_weights=True)
