"""VLMEvalKit benchmark TSV files (written here, in their layout) as datasets, and the generic
multiple-choice and short-answer tasks that score them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import image_cell, random_image, save_tiny_mini, thinkmorph_table

from visual_opsd.cli import main
from visual_opsd.data import dataset_format, load_dataset, validate_command, validate_rows
from visual_opsd.errors import DataError
from visual_opsd.tasks import get_task
from visual_opsd.tasks.choice import answer_letter, options_in_question
from visual_opsd.vlmeval import headline

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
    # asked as VLMEvalKit's ImageMCQDataset asks; a short-answer row by its question alone
    assert first.question == ("Hint: Look left.\nQuestion: Which is red?\nOptions:\nA. cat\nB. dog\nC. car\nD. cup\n"
                              "Please select the correct answer from the options above. \n")
    assert first.metadata["vlmeval_row"] == {k: str(v) for k, v in good_rows()[0].items() if k != "image"}
    assert first.metadata["category"] == "color" and first.metadata["l2-category"] == "perception"
    assert first.metadata["benchmark"] == "MMVP"
    assert [im.size for im in pair.problem_images] == [(16, 12), (8, 8)] and pair.choices == ["yes", "no"]
    assert (np.asarray(reused.problem_images[0]) == np.asarray(first.problem_images[0])).all()
    assert short.task == "short_answer" and short.choices is None and short.answer == "12"
    assert short.question == "How many bars?"
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
        ("It is a dog.", True),  # a short answer naming one option's text (VLMEvalKit's can_infer_text)
        ("A cat and a dog.", False),  # two options named
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


def _records(verdicts, **columns):
    """Records as `evaluate` writes them: "correct", plus per-row columns (index, source, ...)."""
    return [{"correct": v, **{k: col[i] for k, col in columns.items()}} for i, v in enumerate(verdicts)]


def test_circular_sets_count_a_question_only_when_every_rotation_is_right():
    # questions 0 and 1, each with two rotated copies (index + k * 1e6); question 1 misses one rotation
    index = [0, 1_000_000, 2_000_000, 1, 1_000_001, 2_000_001]
    out = headline("SAT_circular", _records([True, True, True, True, False, True], index=index))
    assert out["accuracy"] == 50.0 and out["n"] == 2 and out["rule"].startswith("circular")
    assert out["per_row"]["accuracy"] == pytest.approx(500 / 6) and out["per_row"]["n"] == 6
    # a rotation whose question's own row is missing is left out, as VLMEvalKit does
    out = headline("SAT_circular", _records([True, True, False], index=[0, 1_000_000, 1_000_007]))
    assert out["n"] == 1 and out["accuracy"] == 100.0
    # no rotated copies: rows pooled
    assert headline("SAT", _records([True, False], index=[0, 1]))["rule"] == "pooled over rows"


def test_mmvp_is_per_question_with_pair_accuracy_beside():
    out = headline("MMVP", _records([True, True, True, False], index=[3, 4, 1, 2]))
    assert out["accuracy"] == 75.0 and out["rule"] == "per question (MMVP)"
    assert out["pairs"]["accuracy"] == 50.0 and out["pairs"]["n"] == 2  # pairs by index: (1, 2) and (3, 4)


def test_cv_bench_2d_averages_its_sources_and_3d_pools():
    verdicts = [True, True, True, False, False, False, False, False]  # ADE20K 3 of 4, COCO 0 of 4
    source = ["ADE20K", "ADE20K", "ADE20K", "ADE20K", "COCO", "COCO", "COCO", "COCO"]
    out = headline("CV-Bench-2D", _records(verdicts, source=source))
    assert out["accuracy"] == pytest.approx((75.0 + 0.0) / 2) and set(out["sources"]) == {"ADE20K", "COCO"}
    lo, hi = out["ci95"]
    assert 0 <= lo < out["accuracy"] < hi <= 100
    unequal = headline("CV-Bench-2D", _records([True, False, False, False], source=["a", "b", "b", "b"]))
    assert unequal["accuracy"] == 50.0  # the mean of 100% and 0%, not the pooled 25%
    pooled = headline("CV-Bench-3D", _records([True, False, False, False], source=["a", "b", "b", "b"]))
    assert pooled["accuracy"] == 25.0


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("Which piece fits?\n(A) 1 2 3\n(B) 3 2 1\n(C) 2 1 3", ["1 2 3", "3 2 1", "2 1 3"]),
        ("What colour is the cup? (A) red (B) blue", ["red", "blue"]),
        ("Pick one. (B) is wrong (A) cat (B) dog", ["cat", "dog"]),  # a "(B)" before "(A)" is text
        ("No options here (A) only one", None),
        ("Nothing at all", None),
    ],
)
def test_options_written_into_the_question(question, options):
    assert options_in_question(question) == options


def test_answer_letter_of_a_reference_answer():
    choices = ["red", "blue"]
    assert [answer_letter(a, choices) for a in ("B", "(B)", "B.", "blue", "Blue ", "green", "C")] == \
        ["B", "B", "B", "B", None, None, None]


def _four_task_rows():
    """One row of each of ThinkMorph's four tasks, in its parquet layout (one VT each)."""
    common = {"problem_image_0": image_cell(random_image(1, (16, 12))),
              "reasoning_image_0": image_cell(random_image(2, (16, 12))),
              "resoning_thought_0": "look", "resoning_thought_1": "so"}
    return [
        {**common, "pid": "nav", "task": "Spatial_Navigation", "answer": "<answer>D,R</answer>",
         "question": "Find a safe path. (2x2 grid)"},
        {**common, "pid": "search", "task": "Visual_Search", "answer": "<answer>(B)</answer>",
         "question": "What colour is the cup?\n(A) red\n(B) blue"},
        {**common, "pid": "jig", "task": "Jigsaw_Assembly", "answer": "2 1 3",
         "question": "Which order restores the image?\n(A) 1 2 3\n(B) 2 1 3"},
        {**common, "pid": "chart", "task": "Chart_Refocus", "answer": "<answer>41.5</answer>",
         "question": "What is the value of the tallest bar?"},
    ]


def test_thinkmorph_four_tasks_map_to_scorable_tasks(tmp_path):
    path = tmp_path / "four.parquet"
    pq.write_table(thinkmorph_table(_four_task_rows()), path)
    by_id = {s.id: s for s in load_dataset(path)}
    assert {k: v.task for k, v in by_id.items()} == {"nav": "maze", "search": "multiple_choice",
                                                     "jig": "multiple_choice", "chart": "short_answer"}
    assert by_id["search"].choices == ["red", "blue"] and by_id["search"].answer == "B"
    assert by_id["jig"].answer == "B"  # the option's text, as a letter
    assert get_task("multiple_choice").is_correct(by_id["search"], "<answer>B</answer>")
    assert get_task("short_answer").is_correct(by_id["chart"], "\\boxed{42}")  # within 5%

    rows = _four_task_rows()[1:]
    rows[0]["question"] = "What colour is the cup?"  # options missing
    rows[1]["answer"] = "(C)"  # not an option
    pq.write_table(thinkmorph_table(rows), path)
    errors = {(e.row_id, e.field): e.reason for e in validate_rows(path)}
    assert set(errors) == {("search", "question"), ("jig", "answer")}
    assert "lists no options" in errors[("search", "question")]
    assert errors[("jig", "answer")] == "'(C)' is neither an option letter nor an option's text (options: 1 2 3, 2 1 3)"


def _mixed_files(root):
    """A small file per format: MMVP pairs, a circular SAT set, ChartQA short answers, and a ThinkMorph
    parquet mixing two tasks."""
    write_tsv(root / "MMVP.tsv", [
        {"index": i, "image": b64(i), "question": f"Is the dog facing left? ({i // 2})", "A": "yes", "B": "no",
         "answer": "AB"[i % 2], "category": ["orientation", "color"][i // 2]} for i in range(4)])
    write_tsv(root / "SAT_circular.tsv", [
        {"index": idx, "image": b64(5), "question": "Which is closer?", "A": a, "B": b, "answer": ans}
        for idx, a, b, ans in ((0, "chair", "table", "A"), (1_000_000, "table", "chair", "B"))])
    write_tsv(root / "ChartQA.tsv", [{"index": 0, "image": b64(6), "question": "How many bars?", "answer": "12"}],
              header=["index", "image", "question", "answer"])
    pq.write_table(thinkmorph_table(_four_task_rows()[1:]), root / "ThinkMorph.parquet")
    return [root / "MMVP.tsv", root / "SAT_circular.tsv", root / "ChartQA.tsv", root / "ThinkMorph.parquet"]


def test_eval_over_a_mixed_set_of_files(tmp_path):
    """`visual-opsd eval --data A --data B ...` with the miniature model: a column per file, named by it,
    each scored by its benchmark's rule; per-category and per-task tables; predictions in VLMEvalKit's
    layout for the TSV files."""
    model = save_tiny_mini(tmp_path / "model")
    files = _mixed_files(tmp_path)
    out = tmp_path / "eval"
    argv = ["eval", "--system", f"m={model}:text", "--out", str(out), "max_new_tokens=6", "warmup=0", "latency_n=1",
            "--no-progress"]
    for f in files:
        argv += ["--data", str(f)]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())["m"]
    tasks = result["tasks"]
    assert set(tasks) == {"MMVP", "SAT_circular", "ChartQA", "ThinkMorph"}
    assert tasks["MMVP"]["n"] == 4 and tasks["MMVP"]["pairs"]["n"] == 2 and set(tasks["MMVP"]["by_category"]) == \
        {"orientation", "color"}
    assert tasks["SAT_circular"]["n"] == 1 and tasks["SAT_circular"]["per_row"]["n"] == 2
    assert tasks["ChartQA"]["rule"] == "pooled over rows" and tasks["ChartQA"]["n"] == 1
    assert "rule" not in tasks["ThinkMorph"] and set(tasks["ThinkMorph"]["by_task"]) == \
        {"multiple_choice", "short_answer"}
    assert result["accuracy"] == pytest.approx(sum(t["accuracy"] for t in tasks.values()) / 4)
    records = [json.loads(line) for line in (out / "records" / "m_ThinkMorph.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["multiple_choice", "multiple_choice", "short_answer"]
    # VLMEvalKit's prediction layout: the TSV's columns without the image, then the prediction
    rows = [json.loads(line) for line in (out / "predictions" / "m_MMVP.jsonl").read_text().splitlines()]
    assert list(rows[0])[:4] == ["index", "question", "hint", "A"] and "image" not in rows[0]
    assert all(isinstance(r["prediction"], str) for r in rows) and len(rows) == 4
    assert not (out / "predictions" / "m_ThinkMorph.jsonl").exists()
    md = (out / "results.md").read_text()
    assert "## MMVP: accuracy per category" in md and "## ThinkMorph: accuracy per task" in md
    assert "| orientation | 2 | " in md  # a row per category, a column per system
    assert "| m | SAT_circular | circular: a question counts if all its rotations are right |" in md


def test_eval_refuses_an_unknown_task_in_one_line(tmp_path, capsys):
    model = save_tiny_mini(tmp_path / "model")
    rows = _four_task_rows()[1:2]
    rows[0]["task"] = "Geometry_Sketch"
    pq.write_table(thinkmorph_table(rows), tmp_path / "odd.parquet")
    out = tmp_path / "eval"
    assert main(["eval", "--system", f"m={model}", "--data", str(tmp_path / "odd.parquet"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row search: task: task 'Geometry_Sketch' is unknown; known tasks:" in err
    assert "multiple_choice" in err and not out.exists()
