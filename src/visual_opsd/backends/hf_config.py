"""Options of the Hugging Face backend, a config's `backend:` section with `kind: hf`.

Kept apart from `hf.py` so that loading a config never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from visual_opsd.backends.base import FRAMING_TEXT, TEXT_FRAMING, TRANSITION_TEXT, word_spaced

HF_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")
TEXT_FAMILIES = ("qwen2",)  # text-only causal LMs: the privileged context is text (hf.py, text-only mode)
# LoRA on the language model's projections only (a plain name list would also catch the Qwen2.5-VL
# vision MLP, whose layers are called gate_proj / up_proj / down_proj too)
DEFAULT_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# a text-only causal LM (no vision MLP to avoid): every attention and MLP projection
TEXT_LORA_TARGET = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# spaced for the tiny models' word-level tokenizer (their texts are the mini model's)
DEFAULT_FRAMING, DEFAULT_TRANSITION = word_spaced(FRAMING_TEXT), word_spaced(TRANSITION_TEXT)
DEFAULT_TEXT_FRAMING = word_spaced(TEXT_FRAMING)


@dataclass
class HFOptions:
    """How to load, adapt and prompt a Hugging Face vision-language model."""

    kind: Literal["hf"] = field(default="hf", metadata={"help": "backend family"})
    tiny: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "qwen2"] | None = field(
        default=None, metadata={"help": "sft without init_from: build a tiny random model of this family (tests/demos; "
                                        "qwen2: a text-only causal LM)"}
    )
    tiny_hidden: int = field(default=64, metadata={"help": "with tiny: width of the language model"})
    tiny_layers: int = field(default=2, metadata={"help": "with tiny: layers of the language model"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "weight dtype when loading (bfloat16 on GPUs)"}
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda:LOCAL_RANK when a GPU is visible, else cpu), cpu, cuda:N"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout (SFT only: Visual-OPSD turns dropout off, on-policy)"}
    )
    lora_target: str = field(default=DEFAULT_LORA_TARGET, metadata={"help": "regex of module names that get LoRA"})
    freeze_vision: bool = field(default=True, metadata={"help": "full fine-tuning: keep the vision tower frozen"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    max_length: int | None = field(
        default=None, metadata={"help": "most tokens of context + completion; completions are cut, never images"}
    )
    max_vt_images: int = field(default=8, metadata={"help": "most VT images in a teacher context"})
    system_prompt: str | None = field(default=None, metadata={"help": "system turn shared by student and teacher"})
    framing_text: str = field(default=DEFAULT_FRAMING, metadata={"help": "teacher text before the VTs"})
    transition_text: str = field(default=DEFAULT_TRANSITION, metadata={"help": "teacher text after the VTs"})
    text_framing: str = field(
        default=DEFAULT_TEXT_FRAMING,
        metadata={"help": "text-only models: teacher text before the privileged reference reasoning"},
    )
    save_merged: bool = field(
        default=True, metadata={"help": "LoRA: also write merged full weights (else the adapter alone)"}
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("backend.lora_r >= 1, backend.lora_alpha > 0 and backend.lora_dropout in [0, 1)")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"backend.max_length must be >= 2 or null, got {self.max_length}")
        if self.tiny_hidden < 8 or self.tiny_hidden % 8 or self.tiny_layers < 1:
            raise ValueError("backend.tiny_hidden must be a multiple of 8 (>= 8) and backend.tiny_layers >= 1")
        if self.max_vt_images < 0:
            raise ValueError(f"backend.max_vt_images must be >= 0, got {self.max_vt_images}")
