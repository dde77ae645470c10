"""Hugging Face vision-language models behind the backend interface (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA).

Contexts are chat messages rendered by the model's own processor and chat template:
    student: [system] user: {problem images} question
    teacher: [system] user: {problem images} question \\n framing {VT images} \\n transition
followed by the generation prompt; the completion (`<think>...</think><answer>...</answer>` and the
end-of-turn id) is appended to either with identical ids, so only the user turn differs. Images are
expanded into their placeholder tokens by the processor; a context longer than `max_length` is an
error (never cut through an image): completions are cut instead, and `truncated_tokens` counts it.
`completion_room` gives the room a context leaves: training cuts each completion once, to the room
of the teacher context (the longer one), so student and teacher score the very same ids
(`rollout.fit_rollout`); `score` cuts only what a caller left too long.

Scoring runs the model's inner network (vision tower + language model) on right-padded
`context + completion` rows with explicit position ids (Qwen's 3-D M-RoPE from `get_rope_index`),
gathers the hidden states that predict the completion tokens, and applies the output head only
there: `output="hidden"` returns them with the head for the chunked loss, so full-vocabulary
logits are never formed over the context. Head rows beyond the tokenizer (padded vocabularies)
are dropped. The teacher (no gradient) encodes each context once for its `n` completions (a KV
cache repeated n times, `_shared_prefix_hidden`); the student, with gradient, runs every
`context + completion` row in full (the same scores; the vision tower reruns).

Sampling decodes with a KV cache, one token per row per step (`HFDecoder`), through
`sample_on_device` (the generic image-skip rule, drawn on the model's device, no full-vocabulary
copy to the host): image placeholder ids (and pad) are never sampled, and where the chat
format has an image marker (`<|vision_start|>` / `<|vision_end|>`) a sampled image start gets the
image-skip injection; LLaVA has no marker, so no image skip there. (Not `model.generate`: the
injection needs control between two tokens; the decoder's logits equal a full forward's, tested.)
Tensors go to the model's device; sampling draws there, seeded from the caller's CPU generator.

Training: full fine-tuning (vision tower frozen by default) or LoRA via peft on the language model.
`lora_dropout` (and any dropout of the model) acts in SFT only: Visual-OPSD calls `disable_dropout`,
so the student is scored, with gradients, by the policy that sampled its completions.
With LoRA, `adapters_disabled` gives the frozen teacher (base model, no copy), and EMA shadows
cover only the trainable adapter weights. Full fine-tuning can be sharded by FSDP2
(`distributed.Dist.shard_model`: a unit per decoder layer and per ViT block, the root holding the
embeddings, the merger and the output head): scoring runs the inner network inside the root's forward
hooks (`distributed.in_forward`), so the root's weights are gathered for it and the output head read
after it, and decoding runs on the weights the train loop gathered before the rollouts.
`save` writes the standard HF layout (merged weights with LoRA) plus, with LoRA, the adapter alone
under `adapter/` (what an exact resume loads).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from visual_opsd.backends.base import (
    Backend,
    Context,
    Decoder,
    Role,
    Scores,
    Segment,
    completions_per_context,
    resolve_device,
    sample_on_device,
)
from visual_opsd.backends.hf_compat import load_processor
from visual_opsd.backends.hf_config import DEFAULT_LORA_TARGET, TEXT_LORA_TARGET, HFOptions
from visual_opsd.distributed import in_forward
from visual_opsd.hub import given_name, resolve_folder
from visual_opsd.sample import Sample
from visual_opsd.vt import NoiseVT, VTMode, pick_vt_images

FORMAT = "visual_opsd.hf"
META_FILE = "visual_opsd.json"
ADAPTER_DIR = "adapter"
IGNORE = -100
_PIXEL_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")
# transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version's outputs carry
_CACHE_KWARG = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class HFContext(Context):
    """A rendered chat prompt: its token ids (images expanded) and the image tensors they need."""

    ids: list[int] = field(default_factory=list)
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values (+ image_grid_thw)
    images: list[Image.Image] = field(default_factory=list)  # its (non-noise) images, for the vLLM engine


@dataclass
class HFExample:
    """One SFT row: ids, next-token labels (IGNORE where no loss) and its image tensors."""

    ids: list[int]
    labels: list[int]
    pixels: dict[str, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The `...ForConditionalGeneration` module under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_text_only(config: Any) -> bool:
    """A causal LM without a vision tower (Qwen2ForCausalLM, ...): its config has no vision part and
    names no image token. The backend then runs in text-only mode (module docstring)."""
    image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    return getattr(config, "vision_config", None) is None and image_token is None


def _auto_model_class(directory: str | Path):
    """transformers' auto class for a saved folder: image-text-to-text, or causal LM for a text-only one."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    return transformers.AutoModelForCausalLM if is_text_only(config) else transformers.AutoModelForImageTextToText


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cat_pixels(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in _PIXEL_KEYS:
        tensors = [p[key] for p in parts if key in p]
        if tensors:
            out[key] = torch.cat(tensors)
    return out


def privileged_text(sample: Sample, vt_mode: VTMode, shuffled_from: Sample | None = None) -> str:
    """What a text-only teacher reads in place of VTs, per `teacher.vt_mode`: the sample's reference
    reasoning (its text-only trace, else its thoughts) for `data`, another sample's for `shuffled`,
    nothing for `none`. There is no text counterpart of `noise`."""
    def reference(s: Sample) -> str:
        return s.text_only_trace if s.text_only_trace is not None else " ".join(s.thoughts)

    if vt_mode == "data":
        return reference(sample)
    if vt_mode == "shuffled":
        if shuffled_from is None or shuffled_from.id == sample.id:
            raise ValueError("vt_mode='shuffled' needs shuffled_from=<another sample>")
        return reference(shuffled_from)
    if vt_mode == "none":
        return ""
    raise ValueError(f"a text-only model's privileged context is text: vt_mode {vt_mode!r} has no text form "
                     "(use data, shuffled or none)")


class HFDecoder(Decoder):
    """Batched decoding over a KV cache with explicit positions (left-padded prompts)."""

    def __init__(self, backend: HFBackend, model: nn.Module, contexts: list[HFContext], n: int):
        self.backend, self.model = backend, model
        rows = [(c.ids, c.pixels) for c in contexts]
        ids, attn, pos, pixels = backend._batch(rows, model, left_pad=True)
        out = backend._inner(model)(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **pixels)
        self.cache = _cache_of(out)
        if n > 1:
            self.cache.batch_repeat_interleave(n)
        self.attn = attn.repeat_interleave(n, 0)  # (B, S)
        self.next_pos = backend._next_positions(pos, attn).repeat_interleave(n)  # (B,)
        # logits stay on the model's device: `sample_on_device` draws there and copies only the ids
        self.logits = backend._logits(model, out.last_hidden_state[:, -1]).float().repeat_interleave(n, 0)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, active: torch.Tensor) -> None:
        device = self.attn.device
        ids, active_dev = ids.to(device), active.to(device)  # no-ops when the sampler runs on the device
        self.attn = torch.cat([self.attn, active_dev[:, None].long()], dim=1)  # (B, S + 1)
        pos = self.next_pos[:, None]  # (B, 1)
        if self.backend.mrope:
            pos = pos[None].expand(3, -1, -1)  # (3, B, 1): text positions are equal in t, h, w
        out = self.backend._inner(self.model)(
            input_ids=ids[:, None], attention_mask=self.attn, position_ids=pos, use_cache=True,
            **{_CACHE_KWARG: self.cache},
        )
        self.cache = _cache_of(out)
        logits = self.backend._logits(self.model, out.last_hidden_state[:, -1]).float()
        self.logits = torch.where(active_dev[:, None], logits, self.logits)
        self.next_pos = self.next_pos + active_dev.long()


class HFBackend(Backend):
    """A Hugging Face image-text-to-text model and its processor (see the module docstring)."""

    def __init__(self, model: nn.Module, processor: Any, options: HFOptions | None = None, source: str | None = None):
        self.model, self.processor = model, processor
        # a text-only causal LM comes with its tokenizer alone (the text OPSD setting, `text_only`)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.options = options or HFOptions()
        self.source = source  # where the weights came from (the base of a LoRA adapter)
        config = unwrap(model).config
        self.family = config.model_type
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        # text-only: a causal LM without a vision tower; its privileged context is text (`_text_context`)
        self.text_only = is_text_only(config)
        if self.image_token_id is None and not self.text_only:
            raise ValueError(f"{self.family}: the model config names no image token id; not a vision-language model")
        self.vocab_size = len(self.tokenizer)
        head_rows = unwrap(model).get_output_embeddings().weight.shape[0]
        if head_rows < self.vocab_size:
            raise ValueError(f"output head has {head_rows} rows for a tokenizer of {self.vocab_size} entries")
        vocab = self.tokenizer.get_vocab()
        self.eos_id = vocab["<|im_end|>"] if "<|im_end|>" in vocab else self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
        if self.text_only:  # a text model trained on interleaved traces still writes the chat format's marker
            start, end = vocab.get("<|vision_start|>"), vocab.get("<|vision_end|>")
        # no image marker (LLaVA): -1 is never sampled, so image skip never triggers
        self.image_start_id = start if start is not None else -1
        self.image_end_id = end if end is not None else -1
        video = getattr(config, "video_token_id", None)
        suppressed = {self.image_token_id, video, self.tokenizer.bos_token_id}
        if self.pad_id != self.eos_id:
            suppressed.add(self.pad_id)
        self.suppressed_ids = tuple(sorted(i for i in suppressed if i is not None and 0 <= i < self.vocab_size))
        self.mrope = hasattr(self._inner(model), "get_rope_index")
        self.truncated_tokens = 0  # completion tokens cut by max_length so far

    # construction ------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, family: str, options: HFOptions | None = None, seed: int = 0, **model_options) -> HFBackend:
        """A tiny random model of `family` (see `hf_tiny`), prepared for training per `options`."""
        from visual_opsd.backends.hf_tiny import tiny_model

        options = options or HFOptions()
        sizes = {"hidden": options.tiny_hidden, "layers": options.tiny_layers}
        model, processor = tiny_model(family, seed=seed, **{**sizes, **model_options})
        return cls.prepare(model, processor, options)

    @classmethod
    def prepare(cls, model: nn.Module, processor: Any, options: HFOptions | None = None, source: str | None = None):
        """Apply the training options (LoRA, frozen vision tower, gradient checkpointing) and wrap."""
        options = options or HFOptions()
        model = model.to(resolve_device(options.device))
        if options.lora:
            from peft import LoraConfig, get_peft_model

            target = options.lora_target
            if target == DEFAULT_LORA_TARGET and is_text_only(model.config):  # no `language_model` in its names
                target = TEXT_LORA_TARGET
            lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                              target_modules=target)
            model = get_peft_model(model, lora)
        elif options.freeze_vision:
            for name, p in model.named_parameters():
                if ".visual." in f".{name}" or "vision_tower" in name:
                    p.requires_grad_(False)
        if options.gradient_checkpointing:
            _checkpointing(model, options.lora)
        return cls(model, processor, options, source)

    @property
    def lora(self) -> bool:
        return unwrap(self.model) is not self.model

    @property
    def supports_sharding(self) -> bool:
        """FSDP2 may shard a fully fine-tuned model (distributed.py): scoring runs inside the root's
        forward hooks (`in_forward`), decoding on the weights the train loop gathered. Not with LoRA
        (a few trainable weights: data parallel holds them whole at little cost)."""
        return not self.lora

    @property
    def adapters_disabled(self):
        """With LoRA: a context manager in which the model is the base model (the frozen teacher)."""
        return self.model.disable_adapter if self.lora else None

    @property
    def cell_px(self) -> int:
        """Maze cell size that gives one image token per cell (Qwen: patch x merge; else 8)."""
        ip = getattr(self.processor, "image_processor", None)  # none for a text-only model
        patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
        return patch * merge if patch and merge else 8

    # model pieces ------------------------------------------------------------------------------

    def _inner(self, model: nn.Module) -> nn.Module:
        return unwrap(model).model

    def _head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = unwrap(model).get_output_embeddings()
        bias = head.bias[: self.vocab_size] if head.bias is not None else None
        return head.weight[: self.vocab_size], bias  # padded head rows dropped

    def _logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self._head(model)
        return F.linear(hidden, weight, bias)

    def decode(self, ids: list[int]) -> str:
        drop = {self.pad_id, self.eos_id, self.tokenizer.bos_token_id}
        return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def encode_completion(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    # contexts ----------------------------------------------------------------------------------

    def build_context(
        self,
        sample: Sample,
        role: Role = "student",
        vt_mode: VTMode = "data",
        shuffled_from: Sample | None = None,
        generator: torch.Generator | None = None,
    ) -> HFContext:
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        if self.text_only:
            return self._text_context(sample, role, vt_mode, shuffled_from)
        o = self.options
        content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.problem_images]
        content.append({"type": "text", "text": sample.question})
        images: list[Image.Image | NoiseVT] = list(sample.problem_images)
        if role == "teacher":
            vts = pick_vt_images(sample, vt_mode, shuffled_from, o.max_vt_images)
            content.append({"type": "text", "text": "\n" + o.framing_text})
            content += [{"type": "image"} for _ in vts]
            content.append({"type": "text", "text": "\n" + o.transition_text})
            images += vts
        messages = [{"role": "user", "content": content}]
        if o.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": o.system_prompt}]})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, pixels = self._encode(text, images, generator)
        if o.max_length is not None and len(ids) >= o.max_length:
            raise ValueError(
                f"sample {sample.id!r}: the {role} context has {len(ids)} tokens (images included), "
                f"backend.max_length={o.max_length} leaves no room for a completion; a prompt is never cut through "
                "an image: raise backend.max_length or use smaller images"
            )
        return HFContext(
            role=role, vt_mode=vt_mode if role == "teacher" else None,
            segments=self._segments(ids, len(sample.problem_images)), ids=ids, pixels=pixels,
            images=[im.convert("RGB") for im in images if not isinstance(im, NoiseVT)],
        )

    def _text_context(self, sample: Sample, role: Role, vt_mode: VTMode, shuffled_from: Sample | None) -> HFContext:
        """A text-only model's context (the text OPSD / SDFT setting): the question alone (a text
        model cannot read the problem images); the teacher's user turn adds the privileged reference
        reasoning as TEXT (`privileged_text`) between `text_framing` and `transition_text`."""
        o = self.options
        text = sample.question
        if role == "teacher":
            reference = privileged_text(sample, vt_mode, shuffled_from)
            text += "\n" + o.text_framing + ("\n" + reference if reference else "") + "\n" + o.transition_text
        messages = [{"role": "user", "content": text}]
        if o.system_prompt:
            messages.insert(0, {"role": "system", "content": o.system_prompt})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if o.max_length is not None and len(ids) >= o.max_length:
            raise ValueError(f"sample {sample.id!r}: the {role} context has {len(ids)} tokens, backend.max_length="
                             f"{o.max_length} leaves no room for a completion: raise backend.max_length")
        return HFContext(role=role, vt_mode=vt_mode if role == "teacher" else None,
                         segments=self._segments(ids, 0), ids=ids)

    def _encode(self, text: str, images: list, generator: torch.Generator | None = None):
        """Token ids (images expanded) and image tensors; a `NoiseVT` becomes N(0, 1) in the image
        processor's normalised space, at the size the processor gives that image."""
        pil = [Image.new("RGB", (im.width, im.height)) if isinstance(im, NoiseVT) else im.convert("RGB")
               for im in images]
        enc = self.processor(text=[text], images=pil or None, return_tensors="pt")
        pixels = {k: enc[k] for k in _PIXEL_KEYS if k in enc}
        noise = [i for i, im in enumerate(images) if isinstance(im, NoiseVT)]
        if noise:
            pv = pixels["pixel_values"].clone()
            if "image_grid_thw" in pixels:  # Qwen: rows of flattened patches, image after image
                sizes = pixels["image_grid_thw"].prod(-1).tolist()
            else:  # one (3, H, W) tensor per image
                sizes = [1] * pv.shape[0]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for i in noise:
                chunk = pv[starts[i] : starts[i] + sizes[i]]
                pv[starts[i] : starts[i] + sizes[i]] = torch.randn(chunk.shape, generator=generator).to(pv.dtype)
            pixels["pixel_values"] = pv
        if images and not bool((enc["input_ids"] == self.image_token_id).any()):
            raise ValueError(f"the chat template placed no image token for {len(images)} images")
        return enc["input_ids"][0].tolist(), pixels

    def _segments(self, ids: list[int], n_problem: int) -> list[Segment]:
        """text / marker / problem_image / vt_image spans; image spans hold only placeholder ids."""
        markers = {self.image_start_id, self.image_end_id}
        segments: list[Segment] = []
        n_images, start = 0, 0
        for i in range(1, len(ids) + 1):
            kind = self._kind(ids[i - 1], markers)
            if i == len(ids) or self._kind(ids[i], markers) != kind:
                if kind == "image":
                    kind = "problem_image" if n_images < n_problem else "vt_image"
                    n_images += 1
                segments.append(Segment(kind, start, i))
                start = i
        return segments

    def _kind(self, token: int, markers: set[int]) -> str:
        return "image" if token == self.image_token_id else "marker" if token in markers else "text"

    # batches -----------------------------------------------------------------------------------

    def _batch(self, rows: list[tuple[list[int], dict]], model: nn.Module, left_pad: bool = False):
        """Padded ids (B, S), attention mask, explicit position ids and the concatenated image tensors."""
        B, S = len(rows), max(len(ids) for ids, _ in rows)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, S, dtype=torch.long)
        for b, (row, _) in enumerate(rows):
            s = slice(S - len(row), S) if left_pad else slice(0, len(row))
            ids[b, s] = torch.tensor(row, dtype=torch.long)
            attn[b, s] = 1
        first = next(unwrap(model).parameters())
        ids, attn = ids.to(first.device), attn.to(first.device)
        pixels = {k: v.to(first.device) for k, v in _cat_pixels([p for _, p in rows]).items()}
        if "pixel_values" in pixels:
            pixels["pixel_values"] = pixels["pixel_values"].to(first.dtype)
        return ids, attn, self._positions(model, ids, attn, pixels.get("image_grid_thw")), pixels

    def _positions(self, model, ids, attn, grid) -> torch.Tensor:
        """(B, S) positions, or (3, B, S) M-RoPE positions for the Qwen families."""
        if self.mrope and grid is not None:
            mm = (ids == self.image_token_id).int() * attn  # token type 1 = image
            pos, _ = self._inner(model).get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                       attention_mask=attn)
            return pos
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, S)
        return pos[None].expand(3, -1, -1) if self.mrope else pos

    def _next_positions(self, pos: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """(B,) the position of each row's next token: one past its largest valid position."""
        if pos.dim() == 3:
            pos = pos.amax(0)
        return torch.where(attn.bool(), pos, torch.zeros_like(pos)).amax(-1) + 1

    def _hidden(self, model: nn.Module, rows: list[tuple[list[int], dict]]) -> torch.Tensor:
        """Last hidden states (B, S, D) of right-padded rows. The inner network runs inside the
        model's forward hooks (`in_forward`): under FSDP2 the embeddings and output head, which sit
        outside the layer units, are gathered for it and the output head read after it, and their
        gradients are reduced."""
        ids, attn, pos, pixels = self._batch(rows, model)
        out = in_forward(model, self._inner(model), input_ids=ids, attention_mask=attn, position_ids=pos,
                         use_cache=False, **pixels)
        return out.last_hidden_state

    # scoring -----------------------------------------------------------------------------------

    def score(
        self,
        contexts: list[HFContext],
        completions: list[list[int]],
        *,
        model: nn.Module | None = None,
        output: Literal["logits", "hidden"] = "logits",
        output_attentions: bool = False,
    ) -> Scores:
        model = model or self.model
        if output_attentions:
            raise NotImplementedError("the HF backend does not return attentions (diagnostics use the mini backend)")
        m, g = len(completions), completions_per_context(contexts, completions)
        rows, keep = [], []
        for i, comp in enumerate(completions):
            ctx = contexts[i // g]
            room = self.completion_room(ctx)
            # a cut position gets a zero hidden state below (mask False): callers that compare two
            # contexts cut first (`fit_rollout`), so that this never cuts one side alone
            n = len(comp) if room is None else min(len(comp), room)
            self.truncated_tokens += len(comp) - n
            rows.append((ctx.ids + list(comp[:n]), ctx.pixels))
            keep.append(n)
        T = max(1, max(len(c) for c in completions))
        training = model.training
        if not torch.is_grad_enabled():
            model.eval()  # a teacher forward: no dropout (LoRA dropout included)
        try:
            if g > 1 and not torch.is_grad_enabled():  # the teacher: each context encoded once
                hidden = self._shared_prefix_hidden(model, contexts, completions, keep, T)  # (m, T, D)
            else:
                h = self._hidden(model, rows)  # (m, S, D)
                # position t predicts completion token t: the context's last position, then tokens 0..T-2
                start = torch.tensor([len(contexts[i // g].ids) - 1 for i in range(m)], device=h.device)
                index = (start[:, None] + torch.arange(T, device=h.device)[None]).clamp(max=h.shape[1] - 1)
                hidden = torch.gather(h, 1, index[..., None].expand(-1, -1, h.shape[-1]))  # (m, T, D)
        finally:
            model.train(training)
        lengths = torch.tensor(keep, device=hidden.device)
        mask = torch.arange(T, device=hidden.device)[None] < lengths[:, None]  # (m, T) from lengths: pad may equal eos
        hidden = hidden * mask[..., None].to(hidden.dtype)
        if output == "hidden":
            weight, bias = self._head(model)
            if bias is not None:
                raise ValueError("output='hidden' needs an output head without bias")
            return Scores(mask=mask, hidden=hidden, head_weight=weight)
        return Scores(mask=mask, logits=self._logits(model, hidden))

    def _shared_prefix_hidden(self, model: nn.Module, contexts: list[HFContext], completions: list[list[int]],
                              keep: list[int], T: int) -> torch.Tensor:
        """(m, T, D) hidden states that predict each completion token, every context encoded ONCE for
        its g = m / len(contexts) completions (as the mini backend scores): the contexts, left-padded,
        fill a KV cache that is repeated g times, then the first `keep[i]` ids of each completion
        (right-padded) run on it, one forward for all. The numbers of full `context + completion`
        rows (tested) for 1/g of the context compute, vision tower included. Used without gradient
        (the teacher); the student, with gradient, keeps full rows, which gradient checkpointing
        (off with a cache) and FSDP2's units handle."""
        g = len(completions) // len(contexts)
        inner = self._inner(model)
        ids, attn, pos, pixels = self._batch([(c.ids, c.pixels) for c in contexts], model, left_pad=True)
        out = in_forward(model, inner, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **pixels)
        last = out.last_hidden_state[:, -1].repeat_interleave(g, 0)[:, None]  # (m, 1, D): predicts token 0
        if T == 1:
            return last
        cache = _cache_of(out)
        cache.batch_repeat_interleave(g)
        device = ids.device
        comp = torch.full((len(completions), T - 1), self.pad_id, dtype=torch.long)  # token T-1 predicts nothing
        for i, (c, n) in enumerate(zip(completions, keep, strict=True)):
            comp[i, : min(n, T - 1)] = torch.tensor(c[: min(n, T - 1)], dtype=torch.long)
        valid = torch.arange(T - 1)[None] < torch.tensor(keep)[:, None]  # (m, T-1)
        step = torch.arange(T - 1, device=device)[None]
        cpos = self._next_positions(pos, attn).repeat_interleave(g)[:, None] + step  # (m, T-1)
        if self.mrope:
            cpos = cpos[None].expand(3, -1, -1)  # text positions are equal in t, h, w
        cattn = torch.cat([attn.repeat_interleave(g, 0), valid.long().to(device)], dim=1)
        out = in_forward(model, inner, input_ids=comp.to(device), attention_mask=cattn, position_ids=cpos,
                         use_cache=True, **{_CACHE_KWARG: cache})
        return torch.cat([last, out.last_hidden_state], dim=1)  # (m, T, D)

    def completion_room(self, context: HFContext) -> int | None:
        """Completion tokens that fit after `context` within `max_length` (None: no limit)."""
        limit = self.options.max_length
        return None if limit is None else limit - len(context.ids)

    def disable_dropout(self) -> None:
        """Dropout off for good, in train mode too: every dropout layer (LoRA's `lora_dropout`
        included) gets p = 0 and every attention-dropout rate 0.0 (the attention modules read a
        float, not a layer). Visual-OPSD calls it at start: the student is then scored, with
        gradients and in train mode, by the same function that sampled its completions in eval mode.
        (Switching to eval mode for the scoring forward alone would not do: the model stays in train
        mode for gradient checkpointing, which is gated on it, and the recomputation in backward runs
        after such a switch is undone, with dropout on again.)"""
        super().disable_dropout()
        for module in self.model.modules():
            for name in ("attention_dropout", "dropout"):  # Qwen attention: attention_dropout; CLIP: dropout
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)

    # decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decoder(self, contexts: list[HFContext], n: int = 1, model: nn.Module | None = None) -> HFDecoder:
        if not contexts:
            raise ValueError("decoder needs at least one context")
        return HFDecoder(self, model or self.model, contexts, n)

    def sample(self, contexts, n=1, max_new_tokens=256, temperature=1.0, max_image_skips=1, generator=None,
               model=None):
        """As `Backend.sample`, drawn on the model's device (`sample_on_device`: one forward per
        step, no per-row Python, ids copied to the host once); with `max_length`, the token budget
        stops where the longest context hits it."""
        if self.options.max_length is not None:
            room = self.options.max_length - max(len(c.ids) for c in contexts)
            max_new_tokens = max(1, min(max_new_tokens, room))
        model = model or self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                dec = self.decoder(contexts, n, model)
                return sample_on_device(self, dec, max_new_tokens, temperature, max_image_skips, generator)
        finally:
            model.train(was_training)

    def generate_interleaved(self, contexts, *args, **kwargs):
        raise NotImplementedError(
            "Hugging Face VLMs do not generate images: evaluate them with eval.modes [text, teacher_context]"
        )

    # supervised fine-tuning --------------------------------------------------------------------

    def training_row(
        self,
        sample: Sample,
        kind: Literal["interleaved", "text_only", "teacher_context"],
        generator: torch.Generator | None = None,
        flow_copies: int = 1,
        edit_weight: float = 1.0,
    ) -> HFExample:
        """One SFT row; cross-entropy on the completion's text (and its image-start markers and end of
        turn), never on the context, the image placeholders or an image's end marker.

        text_only: student context + text-only completion; teacher_context: teacher context (the
        sample's VTs) + text-only completion; interleaved: student context + the interleaved trace
        with each VT inside the answer as an image block. (`flow_copies` / `edit_weight` are for
        image-generating backends and ignored here.)"""
        del flow_copies, edit_weight
        role = "teacher" if kind == "teacher_context" else "student"
        ctx = self.build_context(sample, role, "data")
        ids, labelled, pixels = list(ctx.ids), [False] * len(ctx.ids), [ctx.pixels]
        enc = self.tokenizer

        def text(t: str) -> None:
            piece = enc(t, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labelled.extend([True] * len(piece))

        if kind == "interleaved":
            vts = sample.vt_images[: max(0, len(sample.thoughts) - 1)]
            for i, thought in enumerate(sample.thoughts):
                text(f"<think>{thought}</think>")
                if i < len(vts):
                    block, px = self._image_block(vts[i])
                    ids.extend(block)
                    # the model learns to open an image; the placeholders and the end are given
                    labelled.extend([b == self.image_start_id for b in block])
                    pixels.append(px)
            text(sample.answer_text())
        elif kind in ("text_only", "teacher_context"):
            text(sample.text_only_completion())
        else:
            raise ValueError(f"unknown SFT example kind {kind!r}")
        ids.append(self.eos_id)
        labelled.append(True)
        limit = self.options.max_length
        if limit is not None and len(ids) > limit:
            n = max(len(ctx.ids) + 1, limit)
            blocks = self._image_runs(ids, len(ctx.ids))  # (start, end) of each image inside the answer
            for start, end in blocks:
                if start < n < end:  # never cut through an image: cut before it
                    n = start
            self.truncated_tokens += len(ids) - n
            ids, labelled = ids[:n], labelled[:n]
            pixels = pixels[: 1 + sum(1 for _, end in blocks if end <= n)]
        labels = [ids[j + 1] if labelled[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]
        return HFExample(ids, labels, _cat_pixels(pixels))

    def _image_runs(self, ids: list[int], begin: int) -> list[tuple[int, int]]:
        """[start, end) of each image block after `begin`, its markers included."""
        runs, j = [], begin
        while j < len(ids):
            if ids[j] == self.image_token_id or ids[j] == self.image_start_id:
                k = j
                while k < len(ids) and ids[k] in (self.image_token_id, self.image_start_id):
                    k += 1
                k += int(k < len(ids) and ids[k] == self.image_end_id)
                runs.append((j, k))
                j = k
            else:
                j += 1
        return runs

    def _image_block(self, image: Image.Image) -> tuple[list[int], dict[str, torch.Tensor]]:
        """The ids of one image inside an answer (marker, placeholders, marker) and its tensors."""
        placeholder = self.processor.image_token
        enc = self.processor(text=[placeholder], images=[image.convert("RGB")], return_tensors="pt")
        n = int((enc["input_ids"][0] == self.image_token_id).sum())
        block = [self.image_token_id] * n
        if self.image_start_id >= 0:
            block = [self.image_start_id, *block, self.image_end_id]
        return block, {k: enc[k] for k in _PIXEL_KEYS if k in enc}

    def sft_losses(self, examples: list[HFExample], share_prefix: bool = True) -> dict[str, torch.Tensor]:
        """Summed cross-entropy over labelled positions and their count (the dict `sft.py` reads; the
        flow terms are zero: this backend does not generate images). Logits only where labelled."""
        del share_prefix
        h = self._hidden(self.model, [(e.ids, e.pixels) for e in examples])  # (B, S, D)
        lab = torch.full(h.shape[:2], IGNORE, dtype=torch.long)
        for b, e in enumerate(examples):
            lab[b, : len(e.labels)] = torch.tensor(e.labels)
        lab = lab.to(h.device)
        has = lab != IGNORE
        ce = F.cross_entropy(self._logits(self.model, h[has]).float(), lab[has], reduction="sum")
        zero = torch.zeros((), dtype=torch.float32, device=h.device)
        return {"ce_sum": ce, "n_text": has.sum(), "flow_sum": zero, "flow_weight": zero, "n_patch": has.new_zeros(())}

    # persistence -------------------------------------------------------------------------------

    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """The standard HF layout (config.json, safetensors, processor files); with LoRA the merged
        weights there (unless `save_merged` is off) and the adapter alone under `adapter/`.
        `state`: whole weights to write instead of the module's (gathered from an FSDP2 run)."""
        if state is not None and self.lora:
            raise ValueError("a LoRA model is never sharded (supports_sharding), so it saves its own weights")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = unwrap(self.model)
        if self.lora:
            self.model.save_pretrained(directory / ADAPTER_DIR)
            if self.source is not None:  # the adapter's base, for `PeftModel.from_pretrained` and resume
                cfg_file = directory / ADAPTER_DIR / "adapter_config.json"
                cfg = json.loads(cfg_file.read_text())
                # the Hub id the user gave, when the base came from one, not this machine's cache path
                cfg["base_model_name_or_path"] = given_name(self.source) or str(Path(self.source).resolve())
                cfg_file.write_text(json.dumps(cfg, indent=2))
            if self.options.save_merged:
                base.save_pretrained(directory, state_dict=merged_state_dict(self.model))
        else:
            base.save_pretrained(directory, state_dict=state)
        self.processor.save_pretrained(directory)
        meta = {"format": FORMAT, "family": self.family, "source": given_name(self.source) or self.source,
                "lora": self.lora,
                "options": asdict(self.options)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, options: HFOptions | None = None, resume: bool = False) -> HFBackend:
        """A saved model folder (ours or any HF image-text-to-text checkpoint), prepared per `options`.

        resume=True with a LoRA checkpoint loads its base and continues training its adapter
        (exact resume); otherwise the merged weights are loaded and, with `options.lora`, fresh
        adapters are added (e.g. Visual-OPSD with LoRA on top of an SFT teacher)."""
        directory = Path(directory)
        if not (directory / "config.json").is_file() and not (directory / ADAPTER_DIR).is_dir():
            raise FileNotFoundError(f"{directory}: no config.json; not a Hugging Face model folder")
        options = options or HFOptions()
        # safetensors only (never a pickled .bin), and no code from the model folder is executed
        kwargs = {"dtype": getattr(torch, options.dtype), "attn_implementation": options.attn_implementation,
                  "use_safetensors": True, "trust_remote_code": False}
        adapter = directory / ADAPTER_DIR
        has_weights = any(directory.glob("*.safetensors"))
        if not has_weights and not adapter.is_dir():
            pickled = sorted(p.name for p in directory.glob("*.bin")) or ["no weights file"]
            raise FileNotFoundError(
                f"{directory}: no *.safetensors weights ({', '.join(pickled)}); visual-opsd loads weights from "
                "safetensors only, never from pickles: convert them once with safetensors' save_file"
            )
        processor = load_processor(directory)
        if adapter.is_dir() and (resume or not has_weights):
            from peft import PeftModel

            base_path = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base_path:  # a Hub id (recorded by a run started from one): its snapshot in the Hugging Face cache
                base_path = str(resolve_folder(base_path, "model", key=f"{adapter}: base_model_name_or_path"))
            if not base_path or not Path(base_path).exists():
                raise FileNotFoundError(f"{adapter}: the adapter's base model {base_path!r} is not on disk")
            base = _auto_model_class(base_path).from_pretrained(base_path, **kwargs).to(resolve_device(options.device))
            if options.lora:
                model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
                backend = cls(model, processor, options, source=base_path)
                if options.gradient_checkpointing:
                    _checkpointing(model, lora=True)
                return backend
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            return cls.prepare(model, processor, options, source=base_path)
        model = _auto_model_class(directory).from_pretrained(directory, **kwargs)
        return cls.prepare(model, processor, options, source=str(directory))


def _checkpointing(model: nn.Module, lora: bool) -> None:
    """Recompute activations in backward (non-reentrant); with LoRA the frozen embeddings' outputs
    must require grad, or no gradient reaches the adapters."""
    base = unwrap(model)
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.2x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        base.enable_input_require_grads()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a peft LoRA model with every adapter folded into its base weight, under the
    base model's own parameter names, without touching the model (no in-place merge / unmerge)."""
    from peft.tuners.lora import LoraLayer

    base = unwrap(model)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and getattr(module, "base_layer", None) is not None:
                weight = module.base_layer.weight
                delta = sum((module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A),
                            torch.zeros_like(weight))
                merged[f"{name}.weight"] = (weight + delta.to(weight.dtype)).detach().contiguous()
        state = {}
        for key, value in base.state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            state[key] = merged.get(key, value).detach().contiguous()
    return state


def open_folder(path: Path, options: HFOptions, resume: bool = False) -> HFBackend:
    """The registry's entry (`backends/__init__.py`): `resume` continues a LoRA checkpoint's own adapter."""
    return HFBackend.load(path, options, resume=resume)
