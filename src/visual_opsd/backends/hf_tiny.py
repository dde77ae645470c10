"""Tiny Hugging Face vision-language models built in code: random weights, a tokenizer trained here.

One builder per family the HF backend supports: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA (a
CLIP vision tower in front of a Llama), and a text-only Qwen2 causal LM (`tiny_text_qwen2`, the
backend's text-only mode and the vLLM rollout engine's test model). Each returns
`(model, processor)` with the family's real classes, so `save_pretrained` / `from_pretrained` /
the processor's chat template behave as for the released checkpoints, only small (well under a
million parameters; a forward takes milliseconds on a CPU). Tests, demos and benchmarks share
these builders; nothing is downloaded.

The tokenizer is a byte-level BPE trained on the maze task's texts (so any text round-trips
exactly), with the family's chat specials and the trace markers (`<think>`, `<answer>`, ...) as
whole tokens. Qwen images: patch 4 px, 2x2 merge, so an 8 px maze cell is one image token.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from visual_opsd.backends.hf_compat import build_processor, image_processor_class
from visual_opsd.sample import MARKERS

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")
TEXT_FAMILIES = ("qwen2",)  # text-only causal LMs (their processor is the tokenizer)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
CELL_PX = 8  # maze cell size that gives one image token per cell (Qwen: patch 4 x merge 2)

# ChatML as the Qwen-VL templates write it (no default system prompt); `content` is a string or a
# list of {"type": "image"} / {"type": "text", "text": ...} items.
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
LLAVA_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}"
    "{{ ' ' }}{%- else -%}"
    "{{ m['role'].upper() + ': ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<image>\n' }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}{{ ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@functools.cache
def _corpus() -> tuple[str, ...]:
    from visual_opsd.backends.mini import DEFAULT_FRAMING, DEFAULT_TRANSITION
    from visual_opsd.tasks import get_task
    from visual_opsd.tokenizer import sample_texts

    samples = get_task("maze").generate(200, seed=0, split="train", sizes=(3, 6), cell_px=CELL_PX)
    return (DEFAULT_FRAMING, DEFAULT_TRANSITION, *sample_texts(samples))


def train_tokenizer(specials: tuple[str, ...], vocab_size: int = 512):
    """A byte-level BPE trained on the maze texts; `specials` are special tokens, markers whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens(list(MARKERS))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@functools.cache
def _qwen_tokenizer_files() -> Any:
    tok = train_tokenizer(QWEN_SPECIALS)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return tok


@functools.cache
def _llava_tokenizer() -> Any:
    tok = train_tokenizer(LLAVA_SPECIALS)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    return tok


def _copy_tokenizer(tok):
    import copy

    return copy.deepcopy(tok)


def tiny_qwen(family: str = "qwen2_5_vl", seed: int = 0, hidden: int = 64, layers: int = 2, extra_vocab: int = 0):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL `(model, processor)`. `extra_vocab` pads the output
    head beyond the tokenizer (as Qwen's real heads are padded)."""
    import transformers as tf

    tok = _copy_tokenizer(_qwen_tokenizer_files())
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    vocab = len(tok) + extra_vocab
    heads, kv = 4, 2
    head_dim = hidden // heads
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim, family)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    special = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    vision: dict[str, Any] = dict(depth=1, num_heads=2, in_channels=3, patch_size=4, spatial_merge_size=2,
                                  temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=hidden, mlp_ratio=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        model_cls, proc_cls, image_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, "Qwen2VL"
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=16,
                      fullatt_block_indexes=[0])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        model_cls, proc_cls, image_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, "Qwen2VL"
    elif family == "qwen3_vl":
        text["head_dim"] = head_dim
        vision.update(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        model_cls, proc_cls, image_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, "Qwen2VL"
    else:
        raise ValueError(f"unknown Qwen family {family!r}; expected one of qwen2_vl, qwen2_5_vl, qwen3_vl")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    size = {"shortest_edge": 8 * 8, "longest_edge": 8 * 8 * 64}  # 1..64 image tokens of 8x8 px
    image_processor = image_processor_class(image_cls)(patch_size=4, merge_size=2, temporal_patch_size=2, size=size)

    def video_processor():  # built only where torchvision is present (see hf_compat)
        video_cls = getattr(tf, "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor")
        return video_cls(patch_size=4, merge_size=2, temporal_patch_size=2)

    processor = build_processor(proc_cls, image_processor, tok, QWEN_CHAT_TEMPLATE, video_processor=video_processor)
    return model, processor


def _mrope(head_dim: int, family: str) -> list[int]:
    """Rotary pairs given to (time, height, width): they must add up to head_dim / 2."""
    half = head_dim // 2
    t = half - 2 * (half * 3 // 8)
    return [t, half * 3 // 8, half * 3 // 8]


def tiny_llava(seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 32):
    """A tiny LLaVA `(model, processor)`: CLIP vision tower (8 px patches), 2-layer MLP projector, Llama."""
    import transformers as tf

    tok = _copy_tokenizer(_llava_tokenizer())
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    patch = 8
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=image_size, patch_size=patch, projection_dim=32)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                          pad_token_id=ids["<pad>"])
    n_image = (image_size // patch) ** 2
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                            image_seq_length=n_image, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["<pad>"]
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    image_processor = image_processor_class("CLIP")(size=size, crop_size=crop, do_center_crop=True)
    processor = build_processor(tf.LlavaProcessor, image_processor, tok, LLAVA_CHAT_TEMPLATE, patch_size=patch,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def tiny_text_qwen2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab_size: int | None = None):
    """A tiny text-only Qwen2 causal LM `(model, tokenizer)` with the Qwen chat template. Heads have
    32 dimensions (64 from hidden 128 on): vLLM's CPU attention refuses 16. `vocab_size` pads the
    tokenizer with `<extra_i>` tokens up to that size (benchmarks want a real vocabulary's output head;
    the backend only samples ids the tokenizer has)."""
    import transformers as tf

    tok = _copy_tokenizer(_qwen_tokenizer_files())
    tok.chat_template = QWEN_CHAT_TEMPLATE
    if vocab_size is not None and vocab_size > len(tok):
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tok))])
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = 64 if hidden >= 128 else 32
    heads = max(1, hidden // head_dim)
    config = tf.Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = tf.Qwen2ForCausalLM(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, _as_saved(tok, config)


def _as_saved(tok, config):
    """`tok` as a saved folder of this model reloads it: transformers picks the tokenizer class from
    the model type (Qwen2Tokenizer, which splits digits), so the tiny model uses that one throughout."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        config.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def tiny_model(family: str, seed: int = 0, **options):
    """`(model, processor)` of a tiny model of `family` (one of FAMILIES, or TEXT_FAMILIES: then the
    processor is the tokenizer)."""
    if family == "qwen2":
        return tiny_text_qwen2(seed=seed, **options)
    if family == "llava":
        return tiny_llava(seed=seed, **options)
    if family in FAMILIES:
        return tiny_qwen(family, seed=seed, **options)
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(FAMILIES + TEXT_FAMILIES)}")
