"""The data layer: native JSONL round trip, ThinkMorph parquet, VSP dispatch, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import VSP_EXAMPLES, image_bytes, image_cell, pixels, random_image, thinkmorph_table

from visual_opsd.data import (
    NATIVE_FILE,
    DataError,
    dataset_format,
    load_dataset,
    make_command,
    strip_answer,
    thinkmorph_task_name,
    validate_command,
    validate_rows,
    write_dataset,
)
from visual_opsd.sample import Sample


def _samples() -> list[Sample]:
    return [
        Sample(
            id="q1",
            task="custom",
            question="Which way ?",
            answer="R,D",
            problem_images=[random_image(0)],
            vt_images=[random_image(1), random_image(2, size=(8, 8))],
            thoughts=["first", "second", "third"],
            text_only_trace="go right then down",
            metadata={"level": 3, "note": "é"},
        ),
        Sample(
            id="odd/id:2",
            task="custom",
            question="Q2",
            answer="B",
            choices=["x", "y"],
            problem_images=[random_image(3)],
        ),
        Sample(id="q3", task="", question="no images", answer="7", problem_images=[random_image(4, mode="L")]),
    ]


def _same(a: Sample, b: Sample) -> None:
    for name in ("id", "task", "question", "answer", "thoughts", "text_only_trace", "choices", "metadata"):
        assert getattr(a, name) == getattr(b, name), name
    for x, y in [*zip(a.problem_images, b.problem_images, strict=True), *zip(a.vt_images, b.vt_images, strict=True)]:
        assert y.mode == "RGB"
        assert np.array_equal(pixels(x), pixels(y))


# ----------------------------------------------------------------------------- native format


def test_native_round_trip(tmp_path):
    original = _samples()
    out = write_dataset(original, tmp_path / "ds")
    assert dataset_format(out) == "native"
    for path in (out, out / NATIVE_FILE):
        loaded = load_dataset(path)
        assert len(loaded) == 3 and loaded.n_skipped == 0
        for a, b in zip(original, loaded, strict=True):
            _same(a, b)
    rows = [json.loads(line) for line in (out / NATIVE_FILE).read_text().splitlines()]
    assert rows[0]["vt_images"] == ["images/q1_vt_0.png", "images/q1_vt_1.png"]
    assert rows[1]["problem_images"] == ["images/odd_id_2_problem_0.png"]  # ids are sanitised for files
    assert set(rows[0]) == {
        "id", "task", "question", "answer", "problem_images", "vt_images", "thoughts",
        "text_only_trace", "choices", "metadata",
    }  # fmt: skip
    assert validate_rows(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left behind


def test_write_is_atomic(tmp_path):
    out = tmp_path / "ds"
    write_dataset(_samples()[:1], out)
    with pytest.raises(FileExistsError):
        write_dataset(_samples(), out)
    bad = _samples()
    bad[2].metadata = {"x": object()}  # fails only at the last row, after images were written
    with pytest.raises(DataError, match="q3.*metadata"):
        write_dataset(bad, out, overwrite=True)
    assert len(load_dataset(out)) == 1  # the old dataset is untouched
    dup = _samples()
    dup[1].id = "q1"
    with pytest.raises(DataError, match="duplicate"):
        write_dataset(dup, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    write_dataset(_samples(), out, overwrite=True)
    assert len(load_dataset(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dataset"):
        write_dataset(_samples(), tmp_path / "notes", overwrite=True)


def _broken_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """A native dataset with one good row and many bad ones; returns it and {row label: field}."""
    ds = write_dataset([Sample(id="good", task="", question="Q", answer="A", vt_images=[random_image(1)])], root / "ds")
    good_png = "images/good_vt_0.png"
    (ds / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (ds / "images" / "truncated.png").write_bytes(image_bytes(random_image(9, size=(64, 64)))[:300])
    (root / "outside.png").write_bytes(image_bytes(random_image(5)))

    def row(**fields):
        return json.dumps({"question": "Q", "answer": "A", **fields})

    lines = {
        "corrupt": row(id="corrupt", vt_images=["images/corrupt.png"]),
        "truncated": row(id="truncated", problem_images=["images/truncated.png"]),
        "missing": row(id="missing", vt_images=["images/nope.png"]),
        "emptyq": row(id="emptyq", question="   "),
        "noanswer": json.dumps({"id": "noanswer", "question": "Q"}),
        "wrongtype": row(id="wrongtype", thoughts="not a list"),
        "line 9": '{"id": "broken", "question": ',  # malformed JSON
        "toomany": row(id="toomany", vt_images=[good_png] * 3),
        "good": row(id="good"),  # duplicate id
        "escape": row(id="escape", problem_images=["../outside.png"]),
        "absolute": row(id="absolute", problem_images=[str(root / "outside.png")]),
        "thoughts": row(id="thoughts", vt_images=[good_png], thoughts=["only one"]),
        "unknown": row(id="unknown", vt_image=[good_png]),
        "line 16": "[1, 2, 3]",
        "line 17": row(id=7),
        "badjigsaw": row(id="badjigsaw", task="jigsaw", answer="Z", choices=["1 2", "2 1"]),
    }
    fields = {
        "corrupt": "vt_images[0]",
        "truncated": "problem_images[0]",
        "missing": "vt_images[0]",
        "emptyq": "question",
        "noanswer": "answer",
        "wrongtype": "thoughts",
        "line 9": "json",
        "toomany": "vt_images",
        "good": "id",
        "escape": "problem_images[0]",
        "absolute": "problem_images[0]",
        "thoughts": "thoughts",
        "unknown": "vt_image",
        "line 16": "row",
        "line 17": "id",
        "badjigsaw": "answer",
    }
    with (ds / NATIVE_FILE).open("a") as f:
        f.write("\n")  # a blank line is not a row
        for text in lines.values():
            f.write(text + "\n")
    return ds, fields


def test_broken_native_dataset(tmp_path, capsys):
    ds, fields = _broken_dataset(tmp_path)
    errors = validate_rows(ds, max_vts=2)
    found = {}
    for e in errors:
        found.setdefault(e.row_id, set()).add(e.field)
        assert e.file == str(ds / NATIVE_FILE)
    assert set(found) == set(fields)
    for label, field in fields.items():
        assert field in found[label], (label, found[label])
    by_row = {e.row_id: e for e in errors}
    assert "leaves the dataset folder" in by_row["escape"].reason
    assert "absolute" in by_row["absolute"].reason
    assert "cannot decode" in by_row["corrupt"].reason and "cannot decode" in by_row["truncated"].reason
    assert "not found" in by_row["missing"].reason
    assert "first at line 1" in by_row["good"].reason  # where the first "good" was

    assert validate_command(ds, max_vts=2) == 1
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("row ")]) == len(fields)
    assert "row corrupt: vt_images[0]: cannot decode image" in "\n".join(out)
    assert out[-1].endswith("17 rows, 1 valid, 16 invalid")

    with pytest.raises(DataError) as info:
        load_dataset(ds, max_vts=2)
    message = str(info.value)
    assert str(ds / NATIVE_FILE) in message and "row corrupt" in message and "vt_images[0]" in message

    loaded = load_dataset(ds, max_vts=2, skip_invalid=True)
    assert [s.id for s in loaded] == ["good"]
    assert loaded.n_skipped == len(fields)
    assert loaded.skipped_summary().startswith(f"skipped {len(fields)} invalid rows in {ds}: row corrupt:")

    # with paths outside the folder allowed, those two rows become valid
    outside_ok = {e.row_id for e in validate_rows(ds, max_vts=2, allow_outside=True)}
    assert outside_ok == set(fields) - {"escape", "absolute"}


def test_validate_command_exit_codes(tmp_path, capsys):
    ds = write_dataset(_samples(), tmp_path / "ds")
    assert validate_command(ds) == 0
    assert "3 rows, 3 valid, 0 invalid" in capsys.readouterr().out
    assert validate_command(tmp_path / "nowhere") == 2
    (tmp_path / "empty").mkdir()
    assert validate_command(tmp_path / "empty") == 2
    assert "no data.jsonl" in capsys.readouterr().err


def test_make_command(tmp_path, capsys):
    out = tmp_path / "jig"
    assert make_command("jigsaw", out, 6, 1, "val", image_px=16) == 0
    assert "wrote 6 jigsaw samples" in capsys.readouterr().out
    loaded = load_dataset(out)
    assert len(loaded) == 6 and all(s.task == "jigsaw" and s.metadata["split"] == "val" for s in loaded)
    assert validate_command(out) == 0
    assert make_command("jigsaw", out, 3, 1, "val", image_px=16) == 0  # re-making replaces it
    assert len(load_dataset(out)) == 3
    assert make_command("no-such-task", tmp_path / "x", 1, 0) == 2
    assert "unknown task" in capsys.readouterr().err
    assert make_command("jigsaw", tmp_path / "x", 1, 0, image_size=8) == 2
    assert "no option image_size; its options: image_px, pieces, n_choices" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- ThinkMorph parquet

def _thinkmorph_row(i: int, n_vts: int, task: str = "Geometry_Sketch") -> dict:
    row = {
        "pid": f"tm-{i}",
        "question": f"question {i}",
        "answer": "<answer>\\boxed{D,R}</answer>",
        "problem_image_0": image_cell(random_image(100 + i)),
        "task": task,
        "full_text_only_thought": f"text only {i}",
        "resoning_thought_0": "before",
    }
    for k in range(n_vts):
        row[f"reasoning_image_{k}"] = image_cell(random_image(200 + 10 * i + k))
        row[f"resoning_thought_{k + 1}"] = f"after {k}"
    return row


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "train.parquet"
    rows = [_thinkmorph_row(i, n_vts) for i, n_vts in enumerate([1, 8, 3, 0, 1])]
    rows[3]["problem_image_0"] = image_cell(random_image(5, size=(16, 16)), "JPEG")
    pq.write_table(thinkmorph_table(rows), path, row_group_size=2)  # several row groups
    assert dataset_format(path) == "parquet"
    loaded = load_dataset(path)
    assert [s.id for s in loaded] == [f"tm-{i}" for i in range(5)]
    for i, (s, n_vts) in enumerate(zip(loaded, [1, 8, 3, 0, 1], strict=True)):
        assert s.answer == "D,R"
        assert s.task == "Geometry_Sketch"  # not ours: kept as-is
        assert s.question == f"question {i}" and s.text_only_trace == f"text only {i}"
        assert len(s.vt_images) == n_vts and len(s.thoughts) == n_vts + 1
        assert s.thoughts == ["before", *[f"after {k}" for k in range(n_vts)]]
        for k, vt in enumerate(s.vt_images):
            assert vt.mode == "RGB" and np.array_equal(pixels(vt), pixels(random_image(200 + 10 * i + k)))
        assert s.problem_images[0].mode == "RGB"
        assert s.metadata == {"source_file": "train.parquet", "source_row": i}
    assert np.array_equal(pixels(loaded[0].problem_images[0]), pixels(random_image(100)))
    assert loaded[3].problem_images[0].size == (16, 16)  # JPEG decoded too
    # a folder of parquet files (nested, as HF repos lay them out) loads them all, in path order
    (tmp_path / "data").mkdir()
    pq.write_table(thinkmorph_table([_thinkmorph_row(9, 1)]), tmp_path / "data" / "test-0.parquet")
    assert [s.id for s in load_dataset(tmp_path)] == ["tm-9", *[f"tm-{i}" for i in range(5)]]
    # more VTs than allowed is a row error
    assert {e.row_id for e in validate_rows(path, max_vts=4)} == {"tm-1"}


def test_parquet_bad_rows(tmp_path):
    rows = [_thinkmorph_row(i, 1) for i in range(6)]
    rows[0]["reasoning_image_0"] = {"bytes": b"not an image", "path": None}
    rows[1]["question"] = None
    rows[2]["reasoning_image_2"] = image_cell(random_image(1))  # image 2 without image 1
    rows[2]["resoning_thought_3"] = "x"
    rows[3]["pid"] = None
    rows[4]["resoning_thought_1"] = None  # one VT but one thought
    path = tmp_path / "bad.parquet"
    pq.write_table(thinkmorph_table(rows), path)
    found = {(e.row_id, e.field) for e in validate_rows(path)}
    assert ("tm-0", "reasoning_image_0") in found
    assert ("tm-1", "question") in found
    assert ("tm-2", "reasoning_image_1") in found
    assert ("row 3", "pid") in found
    assert ("tm-4", "thoughts") in found
    assert {r for r, _ in found} == {"tm-0", "tm-1", "tm-2", "row 3", "tm-4"}
    loaded = load_dataset(path, skip_invalid=True)
    assert [s.id for s in loaded] == ["tm-5"] and loaded.n_skipped == 5
    with pytest.raises(DataError, match=r"bad\.parquet: row tm-0: reasoning_image_0"):
        load_dataset(path)
    pq.write_table(pa.table({"pid": ["a"], "question": ["q"]}), tmp_path / "noanswer.parquet")
    with pytest.raises(DataError, match="answer"):
        load_dataset(tmp_path / "noanswer.parquet")


def test_thinkmorph_navigation_rows_load_as_maze(tmp_path):
    path = tmp_path / "nav.parquet"
    pq.write_table(thinkmorph_table([_thinkmorph_row(0, 1, task="Spatial_Navigation")]), path)
    (sample,) = load_dataset(path)
    assert sample.task == "maze" and sample.answer == "D,R"


def test_answer_and_task_mapping():
    assert strip_answer("<answer>\\boxed{D,R,D}</answer>") == "D,R,D"
    assert strip_answer(" <answer> B </answer> ") == "B"
    assert strip_answer("\\\\boxed{A}") == "A"
    assert strip_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert strip_answer("plain") == "plain"
    assert strip_answer("\\boxed{A} or \\boxed{B}") == "\\boxed{A} or \\boxed{B}"
    assert thinkmorph_task_name("Spatial_Navigation") == "maze"
    assert thinkmorph_task_name("spatial navigation") == "maze"
    assert thinkmorph_task_name("Chart_Refocus") == "short_answer"
    assert thinkmorph_task_name("Geometry_Sketch") == "Geometry_Sketch"
    assert thinkmorph_task_name(None) == ""


# ----------------------------------------------------------------------------- VSP folders


def test_vsp_dispatch(tmp_path):
    assert dataset_format(VSP_EXAMPLES) == "vsp"
    loaded = load_dataset(VSP_EXAMPLES)
    assert len(loaded) == len(list(VSP_EXAMPLES.glob("level*/table/*.txt")))
    assert all(s.task == "maze" and s.problem_images and s.problem_images[0].mode == "RGB" for s in loaded)
    assert validate_rows(VSP_EXAMPLES) == []


def test_unknown_layouts_fail_clearly(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"x\.csv.*expected \.jsonl, \.parquet or a VLMEvalKit \.tsv"):
        load_dataset(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing")
