"""`visual-opsd demo --quick` end to end: every stage runs, the report has the contracted shape,
and a second run skips the finished stages."""

from __future__ import annotations

import json

import pytest

from visual_opsd.cli import main
from visual_opsd.demo import PRIVILEGED, SYSTEMS


@pytest.mark.slow  # the whole miniature study (--quick), twice
def test_quick_demo_end_to_end_and_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    # the privileged-context evaluation is the premise's, not a system one can deploy
    assert set(report["systems"]) == {name for name, _, _ in SYSTEMS} - {PRIVILEGED}
    premise = report["premise"]
    assert set(premise) >= {"interleaved", "text_only", "teacher_context", "k_pre"}
    for mode, name in (("interleaved", "teacher_interleaved"), ("text_only", "teacher_text_only")):
        assert premise[mode]["accuracy"] == report["systems"][name]["tasks"]["maze"]["accuracy"]
    for mode in ("interleaved", "text_only", "teacher_context"):
        r = premise[mode]
        assert r["n"] == 8 and sum(b["n"] for b in r["by_size"].values()) == 8
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 100
    assert premise["k_pre"] == report["kl"]["closure"]["k_pre"]
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 7 and all(isinstance(t["met"], bool) for t in report["targets"])
    assert set(report["decomposition"]) == {"start_vs_text_sft", "opsd_vs_start", "noise_vs_start",
                                            "headroom_vs_text_sft"}
    assert "## Where Visual-OPSD - text-only SFT comes from" in (out / "report.md").read_text()
    assert "## The premise" in (out / "report.md").read_text() and "## Targets" in (out / "report.md").read_text()
    for system in report["systems"].values():
        assert {"accuracy", "latency_s", "tokens", "tasks"} <= set(system)
        maze = system["tasks"]["maze"]
        assert 0 <= maze["ci95"][0] <= maze["accuracy"] <= maze["ci95"][1] <= 100 and maze["n"] == 8
        assert system["latency_s"] > 0 and system["tokens"] >= 1
    assert set(report["interventions"]) == {"interleaved", "text_only", "noise", "shuffled", "oracle"}
    kl = report["kl"]  # both gap closures, identical tokens (the data's traces) the headline
    assert kl["headline"] == "closure"
    for key, completions in (("closure", "data"), ("closure_student_samples", "student")):
        entry = kl[key]
        assert entry["completions"] == completions and entry["teacher_side"] == "base" and entry["k_pre"] >= 0
        assert set(entry["k_post"]) == set(entry["per_model"]) == {"opsd", "opsd_noise"}
    assert kl["closure"]["same_tokens"] is True
    stages = {"data", "pretrain", "sft_teacher", "sft_text", "opsd", "opsd_noise", "diagnose", "eval_base", "eval"}
    assert stages <= set(report["timing_s"])
    for name in ("report.md", "pareto.png", "training_curves.png", "eval/records/opsd_maze.jsonl", "eval/results.md"):
        assert (out / name).is_file(), name
    assert "| teacher_interleaved |" in (out / "report.md").read_text()
    capsys.readouterr()

    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 9 and "| opsd |" in printed


def test_demo_stages_use_the_shipped_configs(tmp_path):
    """The full demo runs configs/*_demo.yaml unchanged except for where it writes (and the noise control)."""
    from visual_opsd.config import load_config, to_dict
    from visual_opsd.demo import DEFAULT_CONFIG_DIR, DEMO_CONFIGS, stage_configs

    configs = stage_configs("default", tmp_path)
    for stage, cfg in configs.items():
        shipped = to_dict(load_config(type(cfg), DEFAULT_CONFIG_DIR / DEMO_CONFIGS[stage]))
        resolved = to_dict(cfg)
        changed = {k for k in shipped if shipped[k] != resolved[k]}
        allowed = {"out_dir", "init_from", "model", "what", "teacher", "data"}
        assert changed <= allowed, f"{stage}: demo changes {changed - allowed}"
        if stage == "opsd_noise":
            assert resolved["teacher"]["vt_mode"] == "noise"
        elif "teacher" in resolved:
            assert resolved["teacher"] == shipped["teacher"]
        if stage != "diagnose":
            assert resolved["data"] == shipped["data"]


def test_full_preset_resolves_and_unknown_presets_fail(tmp_path):
    from visual_opsd.demo import run_demo, stage_configs

    full = stage_configs("full", tmp_path)
    assert full["pretrain"].model.d_model == 192 and full["sft_teacher"].data.sizes == (3, 8)
    for stage in ("sft_teacher", "sft_text"):  # both start from the pretraining
        assert full[stage].model.init_from == str(tmp_path / "pretrain" / "final")
    assert full["sft_text"].data.trace == "text_only" and full["opsd_noise"].teacher.vt_mode == "noise"
    assert full["diagnose"].data.sizes == (3, 8)
    with pytest.raises(ValueError, match="unknown demo preset 'huge'"):
        run_demo(tmp_path, preset="huge")


@pytest.mark.slow
def test_stage_graph_runs_each_stage_after_what_it_needs_and_reports_failures(tmp_path):
    """`_run_graph` starts a stage only once the stages it needs are done, at most two at a time, and
    a failing stage stops what depends on it with an error that names both."""
    from helpers import fail_stage, write_after

    from visual_opsd.demo import _run_graph

    ended: list[str] = []

    def done(name: str) -> bool:
        return name in ended

    def record(name: str, seconds: float) -> None:
        assert seconds >= 0
        ended.append(name)

    f = {n: str(tmp_path / n) for n in "abcd"}
    _run_graph([("a", (write_after, (f["a"],)), ()), ("b", (write_after, (f["b"],)), ()),
                ("c", (write_after, (f["c"], f["a"], f["b"])), ("a", "b")),
                ("d", (write_after, (f["d"], f["c"])), ("c",))], done, record, t_start=0.0)
    assert set(ended[:2]) == {"a", "b"} and ended[2:] == ["c", "d"]
    with pytest.raises(RuntimeError, match=r"failed: x \(exit code 1\); not run: y"):
        _run_graph([("x", (fail_stage, ()), ()), ("y", (write_after, (str(tmp_path / "y"),)), ("x",))],
                   done, record, t_start=0.0)
    assert not (tmp_path / "y").exists()


def test_decomposition_splits_the_headline_into_start_and_distillation():
    """Visual-OPSD - text SFT = (start - text SFT) + (Visual-OPSD - start); the headroom is the
    privileged context against text SFT; report.md shows the parts with their signs."""
    from visual_opsd.demo import decomposition_of
    from visual_opsd.report import decomposition_section

    def system(acc):
        return {"tasks": {"maze": {"accuracy": acc}}}

    systems = {"teacher_text_only": system(74.0), "text_sft": system(78.0), "opsd": system(77.0),
               "opsd_noise": system(73.5)}
    parts = decomposition_of(systems, {"teacher_context": {"accuracy": 85.0}})
    assert parts == {"start_vs_text_sft": -4.0, "opsd_vs_start": 3.0, "noise_vs_start": -0.5,
                     "headroom_vs_text_sft": 7.0}
    assert parts["start_vs_text_sft"] + parts["opsd_vs_start"] == 77.0 - 78.0
    md = "\n".join(decomposition_section(parts))
    assert "| Visual-OPSD - its start (what distillation added) | +3.0 |" in md and "| -4.0 |" in md
    assert "headroom (+7.0 pp) is below the +10 pp target" in md
    assert "below the +10" not in "\n".join(decomposition_section({**parts, "headroom_vs_text_sft": 12.0}))
    # without the systems it splits, nothing is claimed
    assert decomposition_of({"opsd": system(77.0)}, {}) == {} and decomposition_section({}) == []
