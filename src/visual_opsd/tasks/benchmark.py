"""Generic tasks for benchmark files (VLMEvalKit TSV): multiple choice and short answer.

They score samples that come from files; they have no generator. Multiple choice reads the
option letter a model commits to (`choice.extract_choice`: an answer block, a box, "Answer: B",
"(B)", the option's text, and as VLMEvalKit a short answer naming one option's text) and compares
it with the sample's answer letter (docs/benchmarks.md compares the verdicts with VLMEvalKit's). Short answer takes the
last `\\boxed{...}`, else the content of the last answer block, else the last non-empty line,
and counts it right when it equals the answer (case and surrounding punctuation aside) or, when
both are numbers, when it is within 5% of the answer (ChartQA's relaxed accuracy).
"""

from __future__ import annotations

import re

from visual_opsd.sample import Sample
from visual_opsd.tasks.base import Task, register
from visual_opsd.tasks.choice import _ANSWER_BLOCK, LETTERS, _boxed_contents, extract_choice

RELAXED_TOLERANCE = 0.05
_NUMBER = re.compile(r"^[-+]?\d[\d,]*(?:\.\d+)?%?$|^[-+]?\.\d+%?$")


class _FromFiles(Task):
    def generate(self, n: int, seed: int, split: str = "train", **options) -> list[Sample]:
        raise ValueError(f"task {self.name!r} has no generator: its samples come from benchmark files "
                         "(`visual-opsd eval --data FILE.tsv`)")


@register
class MultipleChoice(_FromFiles):
    name = "multiple_choice"

    def extract_answer(self, text: str) -> str | None:
        return extract_choice(text)

    def is_correct(self, sample: Sample, prediction: str) -> bool:
        return extract_choice(prediction, choices=sample.choices, text_match=True) == sample.answer.strip()

    def validate(self, sample: Sample) -> list[tuple[str, str]]:
        if not sample.choices:
            return [("choices", "a multiple-choice sample needs options")]
        if sample.answer.strip() not in set(LETTERS[: len(sample.choices)]):
            return [("answer", f"{sample.answer!r} is not an option letter of this sample")]
        return []


def _number(text: str) -> float | None:
    text = text.strip()
    if not _NUMBER.match(text):
        return None
    value = float(text.rstrip("%").replace(",", ""))
    return value / 100 if text.endswith("%") else value


def _clean(text: str) -> str:
    return text.strip().strip(".").strip().lower()


@register
class ShortAnswer(_FromFiles):
    name = "short_answer"

    def extract_answer(self, text: str) -> str | None:
        boxes = _boxed_contents(text)
        if boxes:
            return boxes[-1].strip()
        blocks = _ANSWER_BLOCK.findall(text)
        if blocks and blocks[-1].strip():
            return blocks[-1].strip()
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else None

    def is_correct(self, sample: Sample, prediction: str) -> bool:
        got = self.extract_answer(prediction)
        if got is None:
            return False
        want = sample.answer
        g, w = _number(_clean(got)), _number(_clean(want))
        if g is not None and w is not None:
            return g == w if w == 0 else abs(g - w) / abs(w) <= RELAXED_TOLERANCE
        return _clean(got) == _clean(want)
