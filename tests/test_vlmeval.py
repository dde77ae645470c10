"""VLMEvalKit benchmark TSV files (written here, in their layout) as datasets, and the generic
multiple-choice and short-answer tasks that score them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from helpers import random_image, save_tiny_mini

from visual_opsd.cli import main
from visual_opsd.data import dataset_format, load_dataset, validate_command, validate_rows
from visual_opsd.errors import DataError
from visual_opsd.tasks import get_task

HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category"]


def b64(seed: int, size=(16, 12)) -> str:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows, header=HEADER):
    lines = ["\t".join(header)] + ["\t".join(str(row.get(c, "")) for c in header) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_rows():
    return [
        # single image, four options, a hint
        {"index": 0, "image": b64(0), "question": "Which is red?", "hint": "Look left.", "A": "cat", "B": "dog",
         "C": "car", "D": "cup", "answer": "B", "category": "color", "l2-category": "perception"},
        # two images as a JSON list, two options
        {"index": 1, "image": json.dumps([b64(1), b64(2, (8, 8))]), "question": "Same object?", "A": "yes",
         "B": "no", "answer": "A", "category": "multi-view"},
        # the image of row 0, by its index (VLMEvalKit stores repeated images once)
        {"index": 2, "image": "0", "question": "Which is blue?", "A": "sky", "B": "sun", "answer": "A",
         "category": "color"},
        # no options: a short-answer question
        {"index": 3, "image": b64(3), "question": "How many bars?", "answer": "12", "category": "count"},
    ]


def test_tsv_rows_become_samples(tmp_path):
    path = write_tsv(tmp_path / "MMVP.tsv", good_rows())
    assert dataset_format(path) == "tsv"
    samples = load_dataset(path)
    assert [s.id for s in samples] == ["MMVP-0", "MMVP-1", "MMVP-2", "MMVP-3"]
    first, pair, reused, short = samples
    assert first.task == "multiple_choice" and first.choices == ["cat", "dog", "car", "cup"] and first.answer == "B"
    assert first.question == "Hint: Look left.\nWhich is red?"
    assert first.metadata["category"] == "color" and first.metadata["l2-category"] == "perception"
    assert first.metadata["benchmark"] == "MMVP"
    assert [im.size for im in pair.problem_images] == [(16, 12), (8, 8)] and pair.choices == ["yes", "no"]
    assert (np.asarray(reused.problem_images[0]) == np.asarray(first.problem_images[0])).all()
    assert short.task == "short_answer" and short.choices is None and short.answer == "12"
    assert validate_rows(path) == []


def test_tsv_images_by_path_stay_inside_the_folder(tmp_path):
    random_image(5).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    random_image(6).save(tmp_path / "sub" / "b.png")
    header = ["index", "image_path", "question", "A", "B", "answer"]
    rows = [{"index": "x", "image_path": "a.png", "question": "q", "A": "1", "B": "2", "answer": "A"},
            {"index": "y", "image_path": "['a.png', 'sub/b.png']", "question": "q", "A": "1", "B": "2", "answer": "B"},
            {"index": "z", "image_path": "../a.png", "question": "q", "A": "1", "B": "2", "answer": "B"}]
    path = write_tsv(tmp_path / "paths.tsv", rows, header)
    errors = validate_rows(path)
    assert [(e.row_id, e.field) for e in errors] == [("z", "image_path")]
    assert "leaves the dataset folder" in errors[0].reason
    samples = load_dataset(path, skip_invalid=True)
    assert [len(s.problem_images) for s in samples] == [1, 2]


def test_bad_tsv_rows_are_named_one_by_one(tmp_path, capsys):
    rows = good_rows() + [
        {"index": 4, "image": "not base64 at all, and longer than an index reference is allowed to be" * 2,
         "question": "q", "A": "a", "B": "b", "answer": "A"},
        {"index": 5, "image": b64(7), "question": "q", "A": "a", "B": "b", "answer": "C"},  # no option C
        {"index": 6, "image": "", "question": "q", "A": "a", "B": "b", "answer": "A"},
        {"index": 7, "image": "99", "question": "q", "A": "a", "B": "b", "answer": "A"},  # no row 99
        {"index": 8, "image": b64(8), "question": "  ", "A": "a", "B": "b", "answer": "A"},
        {"index": 2, "image": b64(9), "question": "q", "A": "a", "B": "b", "answer": "A"},  # duplicate index
    ]
    path = write_tsv(tmp_path / "bad.tsv", rows)
    found = {(e.row_id, e.field) for e in validate_rows(path)}
    assert found == {("4", "image"), ("5", "answer"), ("6", "image"), ("7", "image"), ("8", "question"),
                     ("2", "id")}
    with pytest.raises(DataError, match="row 4: image: not base64"):
        load_dataset(path)
    assert len(load_dataset(path, skip_invalid=True)) == 4
    assert validate_command(path) == 1
    printed = capsys.readouterr().out
    assert "bad.tsv: 10 rows, 4 valid, 6 invalid" in printed and "row 5: answer: 'C' is not one of" in printed


def test_a_tsv_without_the_columns_is_not_a_dataset(tmp_path):
    path = write_tsv(tmp_path / "other.tsv", [{"id": 1, "text": "x"}], header=["id", "text"])
    assert validate_command(path) == 2
    with pytest.raises(ValueError, match="not a VLMEvalKit TSV: no index, question, answer column"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("output", "verdict"),
    [
        ("<answer>\\boxed{B}</answer>", True),
        ("The answer is (B).", True),
        ("Answer: B", True),
        ("B.", True),
        ("(B)", True),
        ("I think it is the dog.\n<answer>dog</answer>", True),  # the option's text
        ("<answer>A</answer>", False),
        ("Both A and B look plausible.", False),  # no commitment
        ("", False),
    ],
)
def test_multiple_choice_scoring(tmp_path, output, verdict):
    sample = load_dataset(write_tsv(tmp_path / "m.tsv", good_rows()[:1]))[0]
    assert get_task("multiple_choice").is_correct(sample, output) is verdict


@pytest.mark.parametrize(
    ("answer", "output", "verdict"),
    [
        ("12", "\\boxed{12}", True),
        ("12", "<answer>12.5</answer>", True),  # within 5%
        ("12", "\\boxed{13}", False),  # 8% off
        ("40%", "The share is\n0.41", True),  # percentages as fractions, last line
        ("0", "\\boxed{0}", True),
        ("0", "\\boxed{0.01}", False),
        ("Paris", "<answer>paris.</answer>", True),
        ("Paris", "\\boxed{London}", False),
    ],
)
def test_short_answer_relaxed_accuracy(answer, output, verdict):
    from visual_opsd.sample import Sample

    sample = Sample(id="s", task="short_answer", question="q", answer=answer)
    assert get_task("short_answer").is_correct(sample, output) is verdict


def test_benchmark_tasks_have_no_generator():
    with pytest.raises(ValueError, match="has no generator"):
        get_task("multiple_choice").generate(2, seed=0)


def test_eval_runs_on_a_tsv_file(tmp_path):
    """`visual-opsd eval --data FILE.tsv` with the miniature model: every row decoded and scored."""
    model = save_tiny_mini(tmp_path / "model")
    data = write_tsv(tmp_path / "MMVP.tsv", good_rows())
    out = tmp_path / "eval"
    argv = ["eval", "--system", f"m={model}:text", "--data", str(data), "--out", str(out),
            "max_new_tokens=6", "warmup=0", "latency_n=1", "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())["m"]
    assert set(result["tasks"]) == {"multiple_choice", "short_answer"}
    assert result["tasks"]["multiple_choice"]["n"] == 3 and result["tasks"]["short_answer"]["n"] == 1
