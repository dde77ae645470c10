"""Multiple-choice helpers: option letters, the options as prompt text, and answer extraction.

Extraction follows what common evaluation harnesses do, in order of preference; the first stage
that yields a letter within range wins:

1. the content of the last `<answer>...</answer>` block (an unclosed `<answer>` runs to the end of
   the text). When such a block exists it is the model's commitment: its content is parsed with the
   stages below and, if it holds no valid letter, the result is None (no fallback to the rest of
   the text, which would be more lenient than the format asks for);
2. the last `\\boxed{X}` (one or two backslashes);
3. phrases such as "answer is (B)", "Answer: B", "the correct option is B" (last one wins);
4. a bare letter alone on the last non-empty line ("B", "(B)", "B.").

5. (`text_match`, the benchmark files' multiple choice, as VLMEvalKit) a short answer containing
   exactly one option's text ("It is a dog.").

Letters are uppercase only and must stand alone: the "A" in "Apple" or the "I" in "I think" (when
I is not an option) never count. When the option texts are given, an answer that repeats one of
them verbatim (e.g. `\\boxed{3 1 4 2}`) maps to its letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)
_BOXED_START = re.compile(r"\\{1,2}boxed\{")
_TEXT_WRAP = re.compile(r"^\\{1,2}text(?:bf)?\{(.*)\}$", re.DOTALL)
# "answer is (B)", "Answer: B", "final answer - B", "option B", "choice is B". Keywords are
# case-insensitive, the letter is not; (?!\w) stops "answer is Apple" from giving "A".
_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)\b(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:=\-]?\s*"
    r"\(?([A-Z])\)?(?!\w)"
)
# A span that starts with its letter: "B", "(B)", "B.", "B) 3 1 4 2", "Option B: ..."
_LEADING_LETTER = re.compile(r"^(?:(?i:option|choice)\s+)?\(?([A-Z])\)?(?:[.:)]|\s|$)")
_BARE_LINE = re.compile(r"^\s*\(?([A-Z])\)?\s*[.)]?\s*$")


def letter(index: int) -> str:
    """The option letter of a 0-based index: 0 -> "A"."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} out of range 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def letter_index(value: str) -> int:
    """The 0-based index of an option letter: "A" -> 0."""
    if len(value) != 1 or value not in LETTERS:
        raise ValueError(f"not an option letter: {value!r}")
    return LETTERS.index(value)


def format_choices(choices: Sequence[str]) -> str:
    """The options as prompt text: `(A) first (B) second ...` (space-separated, one line)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(choices)}")
    return " ".join(f"({letter(i)}) {text}" for i, text in enumerate(choices))


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}`, braces balanced, in order of appearance."""
    found = []
    for match in _BOXED_START.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
    return found


def _normalise(text: str) -> str:
    return " ".join(text.replace(",", " ").split())


def _letter_of_span(span: str, n: int, choices: Sequence[str] | None) -> str | None:
    """A letter read from a short span that should *be* the answer (a box or an answer block)."""
    span = span.strip()
    wrapped = _TEXT_WRAP.match(span)
    if wrapped:
        span = wrapped.group(1).strip()
    match = _LEADING_LETTER.match(span)
    if match and letter_index(match.group(1)) < n:
        return match.group(1)
    if choices:
        wanted = _normalise(span).rstrip(" .")
        for i, option in enumerate(choices):
            if wanted and wanted == _normalise(option):
                return letter(i)
    return None


def _extract_free(text: str, n: int, choices: Sequence[str] | None) -> str | None:
    """Stages 2-4 (box, phrase, bare last line) on free text."""
    for content in reversed(_boxed_contents(text)):
        found = _letter_of_span(content, n, choices)
        if found:
            return found
    for match in reversed(list(_PHRASE.finditer(text))):
        if letter_index(match.group(1)) < n:
            return match.group(1)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        match = _BARE_LINE.match(lines[-1])
        if match and letter_index(match.group(1)) < n:
            return match.group(1)
    return None


def extract_choice(
    text: str, n_choices: int | None = None, choices: Sequence[str] | None = None, text_match: bool = False
) -> str | None:
    """The option letter `text` commits to, or None.

    `n_choices` limits the letters (A.. the n-th); it defaults to `len(choices)` when the option
    texts are given, else to all 26 letters. See the module docstring for the rules. `text_match`
    adds VLMEvalKit's last resort (`can_infer_text`): a short answer (at most twice the options'
    total length) that contains exactly one option's text names that option ("It is a dog.").
    """
    n = n_choices if n_choices is not None else (len(choices) if choices else len(LETTERS))
    n = min(n, len(LETTERS))
    blocks = _ANSWER_BLOCK.findall(text)
    span = blocks[-1] if blocks else text
    found = (_letter_of_span(span, n, choices) if blocks else None) or _extract_free(span, n, choices)
    if found is None and text_match and choices:
        found = _contained_option(span, choices[:n])
    return found


def _contained_option(text: str, choices: Sequence[str]) -> str | None:
    text = text.lower()
    if not text.strip() or len(text) > 2 * sum(len(c) for c in choices):
        return None
    hits = [i for i, c in enumerate(choices) if c.strip() and c.lower() in text]
    return letter(hits[0]) if len(hits) == 1 else None


_OPTION_MARK = re.compile(r"\(([A-Z])\)[ \t]*")


def options_in_question(question: str) -> list[str] | None:
    """The options a question spells out as "(A) text (B) text" (inline or one per line, as
    ThinkMorph's Visual_Search and Jigsaw_Assembly questions do), in letter order from A; None when
    it lists fewer than two. An option's text runs to the next mark or the end of its line."""
    marks = []
    for m in _OPTION_MARK.finditer(question):
        if letter_index(m.group(1)) == len(marks):  # A, then B, ...: other "(X)" are part of the text
            marks.append(m)
    options = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(question)
        text = question[m.end() : end].split("\n")[0].strip()
        if not text:
            return None
        options.append(text)
    return options if len(options) >= 2 else None


def answer_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The option letter a reference answer names: "B", "(B)", "B." or the option's own text."""
    return _letter_of_span(answer, len(choices), choices)
