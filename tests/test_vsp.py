"""VSP maze benchmark: folder format, both scoring rules (edge cases), and `score vsp` end to end."""

import json
import re
import shutil

import pytest
from helpers import VSP_EXAMPLES

from visual_opsd.tasks.maze import path_cells, read_path_cells
from visual_opsd.tasks.vsp_rules import (
    VSP_MAX_STEPS,
    Verdict,
    extract_action_plan,
    extract_boxed_moves,
    parse_table,
    read_table,
    score_strict,
    score_vsp,
)
from visual_opsd.vsp import load_vsp_folder, score_command, score_vsp_answers, scored_path

# Start (0, 0), hole (1, 1), goal (2, 2): the two shortest paths are R,R,D,D and D,D,R,R.
G1 = ["@__", "_#_", "__*"]
# The goal is one step right of the start, so a longer plan passes over it.
G2 = ["@*_", "___", "___"]


# --------------------------------------------------------------------------------------------
# The six example maps


def test_examples_load_with_expected_ids_and_metadata():
    samples = load_vsp_folder(VSP_EXAMPLES)
    assert [s.id for s in samples] == [f"vsp-L{L}-{L + 10}" for L in range(3, 9)]
    for s in samples:
        level = s.metadata["level"]
        assert s.metadata["index"] == level + 10
        assert s.metadata["size"] == level == len(s.metadata["grid"])
        assert s.problem_images[0].size == (64 * level, 64 * level)  # VSP's own image
        assert s.problem_images[0].mode == "RGB"
        assert s.vt_images[0].size == (64 * level, 64 * level)
        assert s.task == "maze" and len(s.thoughts) == 2


def _pure_text_cells(text):
    """Player, goal and holes of a pure_text description (1-indexed there), 0-indexed."""

    def cells(fragment):
        return {(int(r) - 1, int(c) - 1) for r, c in re.findall(r"[Rr]ow (\d+), [Cc]olumn (\d+)", fragment)}

    player = re.search(r"player is at:(.*?);", text).group(1)
    holes = re.search(r"hole\(s\) are at:(.*?)\n", text)
    goal = re.search(r"goal is at:(.*)", text).group(1)
    return cells(player), cells(goal), cells(holes.group(1)) if holes else set()


def test_tables_agree_with_pure_text_descriptions():
    for table in sorted(VSP_EXAMPLES.glob("level*/table/*.txt")):
        grid = read_table(table)
        player, goal, holes = _pure_text_cells((table.parent.parent / "pure_text" / table.name).read_text())
        at = {sym: {(r, c) for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == sym} for sym in "@*#"}
        assert (at["@"], at["*"], at["#"]) == (player, goal, holes), table


def test_example_bfs_paths_are_correct_under_both_rules():
    for s in load_vsp_folder(VSP_EXAMPLES):
        grid, moves = s.metadata["grid"], s.answer.split(",")
        assert score_strict(grid, s.answer_text()).correct
        assert score_strict(grid, s.interleaved_trace()).correct
        assert score_vsp(grid, "Action plan: " + ", ".join(moves)).correct
        # The VT drawn for a VSP map carries exactly its path.
        assert read_path_cells(s.vt_images[0], len(grid), grid) == set(path_cells(grid, moves))


def test_known_example_grid():
    assert read_table(VSP_EXAMPLES / "level4" / "table" / "14.txt") == ["____", "____", "___#", "__@*"]


# --------------------------------------------------------------------------------------------
# Strict rule


@pytest.mark.parametrize(
    "prediction, correct",
    [
        ("\\boxed{R,R,D,D}", True),
        ("\\boxed{D,D,R,R}", True),
        ("<answer>\\boxed{R,R,D,D}</answer>", True),
        ("\\\\boxed{R,R,D,D}", True),  # two backslashes
        ("\x08oxed{R,R,D,D}", True),  # "\boxed" through a JSON string: the reference repairs it
        ("\\boxed{R , R,D ,D}", True),  # spaces around commas are allowed
        ("\\boxed{ R,R,D,D}", False),  # leading space: not an answer
        ("\\boxed{R,R,D,D }", False),  # trailing space: not an answer
        ("\\boxed{R R D D}", False),
        ("\\boxed{RRDD}", False),
        ("\\boxed{R,R,D,D,}", False),
        ("\\boxed{r,r,d,d}", False),  # lowercase moves
        ("\\boxed{}", False),  # empty box
        ("\\boxed{R,R,D,D", False),  # unclosed
        ("R,R,D,D", False),  # no box
        ("Action plan: R, R, D, D", False),
        ("", False),
        ("\\boxed{U,R,R,D,D}", False),  # off the grid fails (no gym no-op)
        ("\\boxed{R,R,D,D,D}", False),  # overshoot off the grid
        ("\\boxed{D,R,R,D}", False),  # hole at (1, 1)
        ("\\boxed{R,R,D}", False),  # stops short
        ("\\boxed{R,R,D,D,L}", False),  # passes over the goal and moves on
        ("\\boxed{R,R,D,D,L,R}", True),  # comes back and ends on the goal
        # Several boxes: the last *valid* box counts; invalid boxes are skipped.
        ("first \\boxed{U} then \\boxed{R,R,D,D}", True),
        ("\\boxed{R,R,D,D} no wait \\boxed{D,D}", False),
        ("\\boxed{R,R,D,D} and \\boxed{ D}", True),
        ("\\boxed{R,R,D,D} \\boxed{}", True),
        ("\\boxed{R,R,D,D} \\boxed{r}", True),
        ("\\boxed{R,R,D,D} \\boxed{D,D,R,R}", True),
    ],
)
def test_strict_rule(prediction, correct):
    verdict = score_strict(G1, prediction)
    assert isinstance(verdict, Verdict)
    assert verdict.correct is correct, verdict.reason


def test_strict_passing_over_goal():
    assert not score_strict(G2, "\\boxed{R,R}").correct
    assert score_strict(G2, "\\boxed{R}").correct


def test_strict_verdict_details():
    v = score_strict(G1, "\\boxed{R , R,D ,D}")
    assert v.moves == ("R", "R", "D", "D")
    assert score_strict(G1, "\\boxed{ R}").moves is None
    assert "hole" in score_strict(G1, "\\boxed{D,R}").reason
    assert "leaves the grid" in score_strict(G1, "\\boxed{U}").reason
    assert "not on the goal" in score_strict(G1, "\\boxed{R}").reason
    assert "no valid" in score_strict(G1, "nothing").reason
    assert extract_boxed_moves("\\boxed{L} x \\boxed{U, D}") == ["U", "D"]


def test_scorers_reject_invalid_grids():
    for grid in (["@_", "__"], ["@__", "___", "___"], ["@*", "_"], ["@*x", "___", "___"]):
        with pytest.raises(ValueError, match="invalid maze grid"):
            score_strict(grid, "\\boxed{R}")
        with pytest.raises(ValueError, match="invalid maze grid"):
            score_vsp(grid, "Action plan: R")


# --------------------------------------------------------------------------------------------
# Original VSP rule


@pytest.mark.parametrize(
    "prediction, correct",
    [
        ("Action plan: R, R, D, D", True),
        ("Action Plan: R, R, D, D", True),  # capitalised marker
        ("I think... Action plan: R,R,D,D", True),
        ("action plan: R, R, D, D", False),  # marker is case sensitive
        ("Action plan:R, R, D, D", False),  # marker includes the space
        ("\\boxed{R,R,D,D}", False),  # no plan
        ("Action plan: ", False),  # empty plan
        ("Action plan: U, R, R, D, D", True),  # off the edge is a no-op, then continue
        ("Action plan: L, L, U, R, R, D, D", True),
        ("Action plan: D, R, R, D", False),  # hole
        ("Action plan: R, R, D", False),  # never reaches the goal
        ("Action plan: R, R, D, D, D, X", True),  # goal reached at move 4, the rest is ignored
        ("Action plan: R, R, D, D, L", True),  # passing over: reaching the goal wins
        ("Action plan: 'R', \"R\", D., D.", True),  # quotes and periods are removed
        ("Action plan: R,\nR,\nD,\nD", True),  # newlines are removed
        ("Action plan: R, R, D, D.", True),
        ("Action plan: R, R, D, D, then stop.", True),  # text after the winning move is ignored
        ("Action plan: R, R, D, D. I hope this helps.", False),  # the 4th part is not a move
        ("Action plan: R, R, D, D\nThat is my plan", False),  # newline removed: "DThat is my plan"
        ("Action plan: r, r, d, d", False),  # lowercase
        ("Action plan: R R D D", False),
        ("Action plan: R, Right, D, D", False),
        ("Action plan: U\nFinal Action plan: R, R, D, D", False),  # only the first marker counts
        ("Action Plan: U, U\nAction plan: R, R, D, D", True),  # lowercase-p marker is looked up first
    ],
)
def test_vsp_rule(prediction, correct):
    verdict = score_vsp(G1, prediction)
    assert verdict.correct is correct, verdict.reason


def test_vsp_passing_over_goal_and_step_limit():
    assert score_vsp(G2, "Action plan: R, R").correct
    # gym's FrozenLake-v1 time limit: the goal must be reached within 100 steps.
    assert score_vsp(G1, "Action plan: " + "U, " * (VSP_MAX_STEPS - 4) + "R, R, D, D").correct
    assert not score_vsp(G1, "Action plan: " + "U, " * (VSP_MAX_STEPS - 3) + "R, R, D, D").correct


def test_vsp_plan_parts():
    assert extract_action_plan("x Action plan: 'R',  D.\n, U") == ["R", "D", "U"]
    assert extract_action_plan("no plan here") is None
    v = score_vsp(G1, "Action plan: R, Q")
    assert "'Q'" in v.reason and v.moves == ("R", "Q")


# --------------------------------------------------------------------------------------------
# Tables and folders: clear errors


def test_parse_table_tolerates_separator_rows():
    text = "| | Col 1 | Col 2 |\n|---|---|---|\n| Row 1 | @ | _ |\n| Row 2 | # | * |\n"
    assert parse_table(text) == ["@_", "#*"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty table"),
        ("| | Col 1 | Col 2 |\n| Row 1 | @ | x |\n| Row 2 | _ | * |", ":2: bad cell 'x'"),
        ("| | Col 1 | Col 2 |\n| Row 1 | @ |\n| Row 2 | _ | * |", ":2: expected 2 cells, got 1"),
        ("| | Col 1 | Col 2 |\n| Row 2 | @ | _ |\n| Row 1 | _ | * |", ":2: expected 'Row 1'"),
        ("| Row 1 | @ | * |", ":1: expected a header"),
        ("| | Col 1 | Col 2 |\n| Row 1 | @ | _ |\n| Row 2 | _ | _ |", "0 goal cells"),
        ("| | Col 1 | Col 2 |\n| Row 1 | @ | * |", "must be square"),
        ("| | Col 1 |\nRow 1 @", ":2: not a markdown table row"),
    ],
)
def test_parse_table_errors_name_source_and_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_table(text, source="maps/level2/table/0.txt")
    assert str(info.value).startswith("maps/level2/table/0.txt")


def _copy_examples(tmp_path):
    root = tmp_path / "maps"
    shutil.copytree(VSP_EXAMPLES, root)
    return root


def test_loader_errors_name_the_file(tmp_path):
    root = _copy_examples(tmp_path)
    (root / "level5" / "img" / "15.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "level5" / "img" / "15.png"))):
        load_vsp_folder(root)

    root = _copy_examples(tmp_path / "b")
    (root / "level4" / "table" / "14.txt").write_text("| | Col 1 |\n| Row 1 | ? |\n")
    with pytest.raises(ValueError, match=re.escape(str(root / "level4" / "table" / "14.txt"))):
        load_vsp_folder(root)

    root = _copy_examples(tmp_path / "c")
    shutil.copy(root / "level3" / "table" / "13.txt", root / "level4" / "table" / "14.txt")
    with pytest.raises(ValueError, match="level 4 map must be 4x4"):
        load_vsp_folder(root)

    root = _copy_examples(tmp_path / "d")
    (root / "level6" / "img" / "16.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_vsp_folder(root)

    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_vsp_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no level"):
        load_vsp_folder(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# `score vsp` end to end


def _bfs_answer(level):
    [sample] = [s for s in load_vsp_folder(VSP_EXAMPLES) if s.metadata["level"] == level]
    return sample.answer


def _write_answers(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_score_command_end_to_end(tmp_path, capsys):
    plan6 = ", ".join(_bfs_answer(6).split(","))
    answers = _write_answers(
        tmp_path / "answers.jsonl",
        [
            json.dumps({"level": 3, "index": 13, "prediction": f"ok <answer>\\boxed{{{_bfs_answer(3)}}}</answer>"}),
            json.dumps({"level": 4, "index": 14, "prediction": "\\boxed{D}"}),
            '{"level": 5, "index": 15, "prediction": ',  # truncated JSON
            "",  # blank lines are skipped
            json.dumps({"level": 5, "index": 15}),
            json.dumps({"level": 9, "index": 1, "prediction": "\\boxed{R}"}),
            json.dumps({"level": 6, "index": 16, "prediction": f"Action plan: {plan6}"}),
            json.dumps({"level": 3, "index": 13, "prediction": "\\boxed{R}"}),
            json.dumps({"level": "7", "index": 17, "prediction": "\\boxed{R}"}),
        ],
    )
    assert score_command(VSP_EXAMPLES, answers, "strict") == 0
    out, err = capsys.readouterr()
    assert "1/8 correct = 12.5%" in out and "95% Wilson CI" in out
    assert "level 3: 1/2" in out and "level 5: 0/1" in out and "level 6: 0/1" in out
    assert "strict 1/8, vsp 1/8" in out
    assert f"{answers}:3: invalid JSON" in err
    assert f'{answers}:5: missing field "prediction"' in err
    assert f"{answers}:6: no map level9/table/1.txt" in err
    assert f"{answers}:8: duplicate answer for level 3 index 13 (first on line 1)" in err
    assert f'{answers}:9: field "level" must be an integer' in err
    assert "Traceback" not in err

    rows = [json.loads(line) for line in scored_path(answers).read_text().splitlines()]
    assert scored_path(answers) == tmp_path / "answers.scored.jsonl"
    assert [r["line"] for r in rows] == [1, 2, 3, 5, 6, 7, 8, 9]
    assert [r["correct"] for r in rows] == [True, False, False, False, False, False, False, False]
    first, second, seventh = rows[0], rows[1], rows[5]
    assert (first["level"], first["index"]) == (3, 13)
    assert first["strict"]["correct"] and not first["vsp"]["correct"]
    assert not second["strict"]["correct"] and "leaves the grid" in second["reason"]
    assert seventh["vsp"]["correct"] and not seventh["strict"]["correct"]
    assert rows[2]["strict"] is None and "invalid JSON" in rows[2]["error"]
    assert (rows[3]["level"], rows[3]["index"]) == (5, 15)  # known although "prediction" is missing

    # The vsp rule decides the headline when asked for.
    summary, items = score_vsp_answers(VSP_EXAMPLES, answers, rule="vsp")
    assert (summary["correct"], summary["n"], summary["malformed"]) == (1, 8, 5)
    assert items[5]["correct"] and summary["per_level"]["6"]["accuracy"] == 1.0
    assert summary["unanswered"] == 3  # levels 5, 7 and 8 have no scorable answer
    lo, hi = summary["ci95"]
    assert 0 < lo < 1 / 8 < hi < 1


def test_score_command_all_correct(tmp_path, capsys):
    lines = [
        json.dumps({"level": L, "index": L + 10, "prediction": f"\\boxed{{{_bfs_answer(L)}}}"}) for L in range(3, 9)
    ]
    answers = _write_answers(tmp_path / "run1.jsonl", lines)
    assert score_command(VSP_EXAMPLES, answers) == 0
    out, err = capsys.readouterr()
    assert "6/6 correct = 100.0%" in out and err == ""
    assert (tmp_path / "run1.scored.jsonl").is_file()


def test_score_command_unusable_inputs(tmp_path, capsys):
    good = _write_answers(tmp_path / "a.jsonl", [json.dumps({"level": 3, "index": 13, "prediction": "x"})])
    empty = _write_answers(tmp_path / "empty.jsonl", ["", "  "])
    cases = [
        (VSP_EXAMPLES, tmp_path / "missing.jsonl", "strict", "answers file not found"),
        (tmp_path / "no-maps", good, "strict", "maps folder not found"),
        (VSP_EXAMPLES, good, "lenient", "unknown rule"),
        (VSP_EXAMPLES, empty, "strict", "no answers"),
    ]
    for maps, answers, rule, message in cases:
        assert score_command(maps, answers, rule) == 2
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err and out == ""
    assert not list(tmp_path.glob("*.scored.jsonl"))  # nothing written for unusable inputs
