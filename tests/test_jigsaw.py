"""The jigsaw task and multiple-choice answer extraction."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from helpers import pixels

from visual_opsd.sample import Sample
from visual_opsd.tasks import get_task
from visual_opsd.tasks.choice import extract_choice, format_choices, letter, letter_index
from visual_opsd.tasks.jigsaw import SPLITS, assemble, parse_order, split_of_image, split_row


@pytest.fixture(scope="module")
def task():
    return get_task("jigsaw")


@pytest.fixture(scope="module")
def samples(task) -> list[Sample]:
    return task.generate(40, seed=7, split="train", image_px=32)


def _digest(img) -> str:
    return hashlib.sha256(pixels(img).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- generator


def test_registered(task):
    assert task.name == "jigsaw"


def test_deterministic(task):
    a = task.generate(12, seed=3, split="val", image_px=16)
    b = task.generate(12, seed=3, split="val", image_px=16)
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.question, x.answer, x.thoughts, x.text_only_trace, x.choices, x.metadata) == (
            y.id,
            y.question,
            y.answer,
            y.thoughts,
            y.text_only_trace,
            y.choices,
            y.metadata,
        )
        assert np.array_equal(pixels(x.problem_images[0]), pixels(y.problem_images[0]))
        assert np.array_equal(pixels(x.vt_images[0]), pixels(y.vt_images[0]))
    # a longer run starts with the same samples; another seed gives other pictures
    assert [s.question for s in task.generate(14, seed=3, split="val", image_px=16)[:12]] == [s.question for s in a]
    other = task.generate(12, seed=4, split="val", image_px=16)
    assert {_digest(s.vt_images[0]) for s in other}.isdisjoint({_digest(s.vt_images[0]) for s in a})


def test_splits_never_share_a_picture(task):
    digests = {}
    for split in SPLITS:
        batch = task.generate(60, seed=0, split=split, image_px=16, pieces=4)
        assert all(split_of_image(pixels(s.vt_images[0])) == split for s in batch)
        digests[split] = [_digest(s.vt_images[0]) for s in batch]
        assert len(set(digests[split])) == len(batch)  # no repeats inside a split either
    assert not set(digests["train"]) & set(digests["val"])
    assert not set(digests["train"]) & set(digests["test"])
    assert not set(digests["val"]) & set(digests["test"])


def test_unknown_split_and_bad_options_fail(task):
    with pytest.raises(ValueError, match="split"):
        task.generate(1, 0, "dev")
    with pytest.raises(ValueError, match="image_px"):
        task.generate(1, 0, image_px=15)
    with pytest.raises(ValueError, match="pieces"):
        task.generate(1, 0, pieces=3)


def test_correct_option_reassembles_the_picture_exactly(samples):
    for s in samples:
        layout, k, gap = s.metadata["layout"], s.metadata["pieces"], s.metadata["gap_px"]
        shown = split_row(pixels(s.problem_images[0]), k, gap)
        original = pixels(s.vt_images[0])
        assert original.shape == (32, 32, 3)
        for i, option in enumerate(s.choices):
            rebuilt = assemble([shown[p - 1] for p in parse_order(option)], layout)
            assert np.array_equal(rebuilt, original) == (letter(i) == s.answer), (s.id, option)


def test_piece_counts_and_options(task, samples):
    assert {s.metadata["layout"] for s in samples} == {"1x2", "2x1", "2x2"}
    for s in samples:
        k = s.metadata["pieces"]
        assert len(s.choices) == (2 if k == 2 else 4)
        assert len(set(s.choices)) == len(s.choices)
        assert all(sorted(parse_order(c)) == list(range(1, k + 1)) for c in s.choices)
    two = task.generate(5, seed=1, pieces=2, image_px=16)
    assert all(s.metadata["pieces"] == 2 and len(s.choices) == 2 for s in two)
    six = task.generate(5, seed=1, pieces="4", n_choices=6, image_px=16)
    assert all(len(s.choices) == 6 for s in six)
    # the correct letter is spread over the options, not always the same one
    assert len({s.answer for s in samples if s.metadata["pieces"] == 4}) > 1


_TOKEN = re.compile(r"^(?:[A-Za-z]+|[0-9]+|[.,?:]|\([A-Z]\))$")


def test_texts_are_templated_and_space_separated(samples):
    for s in samples:
        for text in [s.question, *s.thoughts, s.text_only_trace]:
            bad = [t for t in text.split(" ") if not _TOKEN.match(t)]
            assert not bad, (text, bad)
        order = s.choices[letter_index(s.answer)]
        assert s.thoughts[0] == f"Let me try assembling the pieces in order {order} ."
        assert s.thoughts[1] == f"The assembled picture is continuous , so the answer is {s.answer} ."
        assert s.text_only_trace.endswith(f"The order is {order} , so the answer is {s.answer} .")
        assert "edge of piece" in s.text_only_trace
        assert format_choices(s.choices) in s.question
        assert len(s.thoughts) == len(s.vt_images) + 1 == 2


def test_validate_and_scoring(task, samples):
    s = samples[0]
    assert all(task.validate(x) == [] for x in samples)
    assert task.is_correct(s, s.answer_text())
    assert task.is_correct(s, s.interleaved_trace())
    assert task.is_correct(s, s.text_only_completion())
    wrong = letter((letter_index(s.answer) + 1) % len(s.choices))
    assert not task.is_correct(s, f"<answer>\\boxed{{{wrong}}}</answer>")
    assert not task.is_correct(s, "no idea")
    assert task.extract_answer(s.answer_text()) == s.answer

    def fields(**changes):
        bad = Sample(**{**s.__dict__, **changes})
        return {f for f, _ in task.validate(bad)}

    assert fields(answer="Z") == {"answer"}
    assert fields(answer=wrong) == {"answer"}  # not the order stored in metadata
    assert fields(choices=None) == {"choices"}
    assert "choices" in fields(choices=[s.choices[0], s.choices[0]])
    assert "choices" in fields(choices=["1 1", "1 2"], answer="B", metadata={})
    assert fields(problem_images=[]) == {"problem_images"}


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>hmm</think><answer>\\boxed{C}</answer>", "C"),
        ("<answer>B</answer>", "B"),
        ("<answer>(D) 3 1 4 2</answer>", "D"),
        ("<answer> \\boxed{A} </answer> and later the answer is C", "A"),  # the answer block wins
        ("<answer>B", "B"),  # unclosed (truncated) block still counts
        ("first \\boxed{A} then \\boxed{B}", "B"),  # the last box
        ("\\\\boxed{C}", "C"),  # two backslashes
        ("\\boxed{\\text{D}}", "D"),
        ("I think the answer is (B).", "B"),
        ("Answer: C", "C"),
        ("so the answer is B .", "B"),
        ("The correct option is D", "D"),
        ("Final answer - A", "A"),
        ("I compared the edges.\nB", "B"),
        ("reasoning ...\n(C)\n\n", "C"),
        ("reasoning ...\nD.", "D"),
    ],
)
def test_extract_forms(text, expected):
    assert extract_choice(text, 4) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Apple Banana Cherry",  # capital letters inside words
        "Bob answered quickly",
        "the answer is Apple",
        "answer: b",  # lowercase is not a letter option
        "the answer is E",  # out of range for 4 options
        "\\boxed{E}",
        "A line ending in A\nand another line",  # a letter, but not alone on the last line
        "<answer>I do not know</answer> the answer is B",  # the answer block has no letter: no fallback
        "\\boxed{AB}",
    ],
)
def test_extract_rejects(text):
    assert extract_choice(text, 4) is None


def test_extract_uses_option_texts_and_range():
    choices = ["1 2 3 4", "3 1 4 2", "2 1 4 3", "4 3 2 1"]
    assert extract_choice("<answer>\\boxed{3 1 4 2}</answer>", choices=choices) == "B"
    assert extract_choice("\\boxed{3,1,4,2}", choices=choices) == "B"
    assert extract_choice("\\boxed{5 5}", choices=choices) is None
    assert extract_choice("the answer is I think B", 4) is None  # "I" is out of range, not B's phrase
    assert extract_choice("the answer is F") == "F"  # 26 letters by default


def test_format_choices_and_letters():
    assert format_choices(["2 1", "1 2"]) == "(A) 2 1 (B) 1 2"
    assert letter(0) == "A" and letter_index("D") == 3
    with pytest.raises(ValueError):
        letter_index("a")
    with pytest.raises(ValueError):
        format_choices(["x"] * 27)
