"""`visual-opsd eval` on a tiny mini model: the files and their shapes, accuracies recounted from the
per-sample records with the scorers applied independently, VSP maps per level with both rules, the
demo's evaluation stage through the same code, and clear errors for bad systems and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visual_opsd import evaluate as ev
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.cli import main
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks import get_task
from visual_opsd.tasks.maze import shortest_path
from visual_opsd.tokenizer import build_tokenizer_for_tasks
from visual_opsd.vsp import read_table, score_strict, score_vsp

VSP_EXAMPLES = Path(__file__).parent / "data" / "vsp-examples"
FAST = ["--warmup", "1", "--max-new-tokens", "6", "--vt-steps", "2", "--no-progress", "threads=1"]
TASK_KEYS = {"accuracy", "ci95", "n", "latency_s", "tokens"}
RECORD_KEYS = {"id", "mode", "prediction", "parsed", "answer", "correct", "latency_s", "tokens"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer_for_tasks(["maze"], n_per_task=20)
    path = tmp_path_factory.mktemp("tiny") / "final"
    MiniBackend.new(tokenizer, seed=0, d_model=32, n_layers=1, n_heads=2, patch_size=4, max_grid=8).save(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_summary(entry: dict, records: list[dict]) -> None:
    """The summary numbers are those of the records, recounted here."""
    k, n = sum(r["correct"] for r in records), len(records)
    lo, hi = wilson_interval(k, n)
    assert entry["n"] == n and entry["accuracy"] == pytest.approx(100 * k / n)
    assert entry["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert entry["latency_s"] == pytest.approx(sum(r["latency_s"] for r in records) / n)
    assert entry["tokens"] == pytest.approx(sum(r["tokens"] for r in records) / n)


def test_eval_on_generated_mazes(model, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--system", f"fast={model}", "--system", f"slow={model}:interleaved",
            "--n", "4", "--sizes", "3", "4", "--seed", "5", "--out", str(out), *FAST]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["fast", "slow"]
    mazes = {s.id: s for s in get_task("maze").generate(4, seed=5, split="test", sizes=(3, 4), cell_px=4)}
    for name, mode in (("fast", "text"), ("slow", "interleaved")):
        system = results[name]
        assert {"accuracy", "latency_s", "tokens", "tasks"} <= set(system) and system["mode"] == mode
        assert set(system["tasks"]) == {"maze"} and set(system["tasks"]["maze"]) == TASK_KEYS
        records = read_jsonl(out / "records" / f"{name}_maze.jsonl")
        assert [r["id"] for r in records] == list(mazes)  # the held-out test split, as generated
        for r in records:
            assert RECORD_KEYS <= set(r) and r["mode"] == mode and r["latency_s"] > 0 and r["tokens"] >= 1
            # the verdict, recomputed from the prediction with the strict scorer on the true map
            assert r["correct"] == score_strict(mazes[r["id"]].metadata["grid"], r["prediction"]).correct
        check_summary(system["tasks"]["maze"], records)
        assert system["accuracy"] == system["tasks"]["maze"]["accuracy"]
    md = (out / "results.md").read_text()
    assert "| fast |" in md and "| slow |" in md and "latency of `slow`" in md  # speed-up vs the interleaved one
    assert (out / "pareto.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["data"]["sizes"] == [3, 4]
    assert "results:" in capsys.readouterr().out


def test_eval_on_a_dataset_folder(model, tmp_path):
    from visual_opsd.data import write_dataset

    write_dataset(get_task("maze").generate(3, seed=1, split="val", sizes=(3, 3), cell_px=4), tmp_path / "d")
    out = tmp_path / "eval"
    argv = ["eval", "--system", f"m={model}", "--data", str(tmp_path / "d"), "--n", "2", "--out", str(out)]
    assert main(argv + FAST) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    assert set(system["tasks"]) == {"maze"} and system["tasks"]["maze"]["n"] == 2
    assert [r["id"] for r in read_jsonl(out / "records" / "m_maze.jsonl")] == ["maze-val-0", "maze-val-1"]


def test_eval_on_vsp_maps_per_level(model, tmp_path):
    out = tmp_path / "vsp"
    argv = ["eval", "--system", f"m={model}:text", "--vsp", str(VSP_EXAMPLES), "--out", str(out), "vsp_per_level=1"]
    assert main(argv + FAST) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    assert set(system["tasks"]) == {"vsp"}  # --vsp alone: no generated mazes
    records = read_jsonl(out / "records" / "m_vsp.jsonl")
    grids = {(lv, i): read_table(VSP_EXAMPLES / f"level{lv}" / "table" / f"{i}.txt") for lv, i in
             ((int(p.parts[-3][5:]), int(p.stem)) for p in VSP_EXAMPLES.glob("level*/table/*.txt"))}
    assert sorted((r["level"], r["index"]) for r in records) == sorted(grids)
    for r in records:
        grid = grids[(r["level"], r["index"])]
        assert r["verdicts"]["strict"]["correct"] == score_strict(grid, r["prediction"]).correct
        assert r["verdicts"]["vsp"]["correct"] == score_vsp(grid, r["prediction"]).correct
        assert r["correct"] == r["verdicts"]["strict"]["correct"]  # the default headline rule
    check_summary(system["tasks"]["vsp"], records)
    vsp = system["vsp"]
    assert vsp["rule"] == "strict" and set(vsp["levels"]) == {"3", "4", "5", "6", "7", "8"}
    for block in vsp["levels"].values():
        assert block["n"] == 1 and set(block) == {"n", "latency_s", "tokens", "strict", "vsp"}
        assert {"accuracy", "ci95"} == set(block["strict"]) == set(block["vsp"])
    assert "## VSP maze maps, per level" in (out / "results.md").read_text()


def test_vsp_rules_reported_side_by_side(model, tmp_path, monkeypatch):
    """Scripted answers whose verdicts differ by rule: the per-level and overall numbers of both rules,
    and --rule choosing the headline."""
    def scripted(backend, samples, mode, *args, **kwargs):
        (s,) = samples
        moves = ", ".join(shortest_path(s.metadata["grid"]))
        level = s.metadata["level"]
        if level in (3, 4):
            return [f"\\boxed{{{moves}}}"]  # strict only
        if level == 5:
            return [f"Action plan: {moves}"]  # vsp rule only
        if level == 6:
            return [f"\\boxed{{{moves}}}\nAction plan: {moves}"]  # both (the plan runs to the end)
        return ["no idea"]

    monkeypatch.setattr(ev, "predict", scripted)
    out = tmp_path / "rules"
    argv = ["eval", "--system", f"m={model}", "--vsp", str(VSP_EXAMPLES), "--rule", "vsp", "--out", str(out), *FAST]
    assert main(argv) == 0
    system = json.loads((out / "results.json").read_text())["m"]
    vsp = system["vsp"]
    assert vsp["rule"] == "vsp"
    assert vsp["strict"]["accuracy"] == pytest.approx(100 * 3 / 6)
    assert vsp["vsp"]["accuracy"] == pytest.approx(100 * 2 / 6)
    assert system["tasks"]["vsp"]["accuracy"] == pytest.approx(100 * 2 / 6)  # the headline rule
    expected = {"3": (100, 0), "4": (100, 0), "5": (0, 100), "6": (100, 100), "7": (0, 0), "8": (0, 0)}
    got = {lv: (b["strict"]["accuracy"], b["vsp"]["accuracy"]) for lv, b in vsp["levels"].items()}
    assert got == expected


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no training curves here
def test_demo_evaluation_stage_uses_the_shared_code(model, tmp_path):
    from visual_opsd.data import write_dataset
    from visual_opsd.demo import SYSTEMS, _evaluate_systems, _write_report

    out = tmp_path / "demo"
    write_dataset(get_task("maze").generate(3, seed=2, split="test", sizes=(3, 3), cell_px=4), out / "data" / "test")
    backend = MiniBackend.load(model)
    for folder in ("sft_teacher/final", "sft_text/final", "opsd/best/model", "opsd_noise/last/model"):
        backend.save(out / folder)
    _evaluate_systems(out, {"warmup": 0, "max_new_tokens": 6}, progress=False)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results) == [name for name, _, _ in SYSTEMS]
    for name, r in results.items():
        check_summary(r["tasks"]["maze"], read_jsonl(out / "eval" / "records" / f"{name}_maze.jsonl"))
    _write_report(out, {}, {"eval": 1.0})
    report = json.loads((out / "report.json").read_text())
    assert report["systems"]["opsd"]["tasks"]["maze"] == results["opsd"]["tasks"]["maze"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{model}", "is not NAME=MODEL_DIR[:MODE]"),
        ("a={model}:txt", "unknown mode 'txt'; did you mean 'text'?"),
        ("a={model}/nowhere:text", "system 'a': no model folder at"),
        ("a={empty}", "not a model folder this package can load"),
        ("a b={model}", "name 'a b' may hold only"),
    ],
)
def test_bad_system_spec_is_a_clear_error(model, tmp_path, capsys, spec, message):
    (tmp_path / "empty").mkdir()
    spec = spec.format(model=model, empty=tmp_path / "empty")
    assert main(["eval", "--system", spec, "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visual-opsd: config error:") and message in err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_duplicate_names_missing_systems_and_empty_data(model, tmp_path, capsys):
    assert main(["eval", "--system", f"a={model}", "--system", f"a={model}:interleaved", *FAST]) == 2
    assert "repeated: a" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no systems" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--system", f"a={model}", "--data", str(tmp_path / "empty"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "empty" in err
    assert main(["eval", "--system", f"a={model}", "--vsp", str(tmp_path / "empty"), *FAST]) == 2
    assert "not a VSP folder" in capsys.readouterr().err
