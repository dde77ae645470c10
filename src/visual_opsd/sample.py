"""The one record every part of visual-opsd speaks: a `Sample`, and the text markers of a trace.

A sample is a question with its problem image(s), the privileged visual thoughts (VT images, in
order), the text thoughts that surround them in an interleaved trace, an optional text-only trace,
and the answer. Loaders (`data.py`) produce samples; tasks (`tasks/`) generate and score them;
backends turn them into student and teacher contexts.

Interleaved trace layout (ThinkMorph's, with n VTs there are n + 1 text thoughts):

    <think> thoughts[0] </think><image_start>[VT 0]<image_end><think> thoughts[1] </think>
    ... <answer> answer </answer>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# Markers of a trace. Backends with their own tokenizer map these to single tokens.
THINK_START = "<think>"
THINK_END = "</think>"
IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
MARKERS = (THINK_START, THINK_END, IMAGE_START, IMAGE_END, ANSWER_START, ANSWER_END)


@dataclass
class Sample:
    """One problem. Images are decoded PIL images (RGB); paths live only in the on-disk formats."""

    id: str
    task: str
    question: str
    answer: str  # the bare answer, e.g. "R,D,D" for a maze or "B" for multiple choice
    problem_images: list[Image.Image] = field(default_factory=list)
    vt_images: list[Image.Image] = field(default_factory=list)  # privileged visual thoughts, in order
    thoughts: list[str] = field(default_factory=list)  # interleaved text thoughts: len(vt_images) + 1
    text_only_trace: str | None = None  # a reasoning trace that needs no image
    choices: list[str] | None = None  # options of a multiple-choice question, in letter order
    metadata: dict[str, Any] = field(default_factory=dict)

    def answer_text(self) -> str:
        """The answer as every trace ends it: `<answer>\\boxed{...}</answer>` (ThinkMorph's form)."""
        return f"{ANSWER_START}\\boxed{{{self.answer}}}{ANSWER_END}"

    def interleaved_trace(self, image_token: str = "") -> str:
        """The interleaved trace as text; each VT becomes `<image_start>{image_token}<image_end>`."""
        parts = []
        for i, thought in enumerate(self.thoughts):
            parts.append(f"{THINK_START}{thought}{THINK_END}")
            if i < len(self.vt_images):
                parts.append(f"{IMAGE_START}{image_token}{IMAGE_END}")
        return "".join(parts) + self.answer_text()

    def text_only_completion(self) -> str:
        """The text-only trace as a completion: `<think>trace</think><answer>...</answer>`."""
        trace = self.text_only_trace if self.text_only_trace is not None else " ".join(self.thoughts)
        return f"{THINK_START}{trace}{THINK_END}{self.answer_text()}"
