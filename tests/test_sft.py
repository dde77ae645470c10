"""The SFT loop on a tiny config: schedule, shipped configs, an end-to-end run of each trace kind,
outputs (metrics.jsonl, last/ best/ final/), and that training lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.config import load_config
from visual_opsd.errors import ConfigError
from visual_opsd.sft import OptimConfig, SFTConfig, lr_at, run_sft

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("sft_*.yaml"))

TINY = [
    "progress=false",
    "threads=1",
    "data.n_train=24",
    "data.n_val=3",
    "data.sizes=[3,3]",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.mlp_ratio=2.0",
    "model.patch_size=4",
    "model.tokenizer_tasks=[maze]",
    "optim.steps=4",
    "optim.batch_size=4",
    "optim.warmup_steps=1",
    "eval.every=2",
    "eval.vt_steps=2",
    "eval.max_new_tokens=12",
]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(SFTConfig, path)
    assert f"visual-opsd sft --config configs/{path.name}" in path.read_text().split("\n\n")[0]
    assert cfg.model.patch_size >= 1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="optim.stepz"):
        load_config(SFTConfig, None, ["optim.stepz=3"])
    with pytest.raises(ConfigError, match="teacher_context_fraction"):
        load_config(SFTConfig, None, ["data.teacher_context_fraction=2"])


@pytest.mark.parametrize("trace", ["interleaved", "text_only"])
def test_run_sft_end_to_end(tmp_path, trace):
    cfg = load_config(SFTConfig, None, TINY + [f"data.trace={trace}", f"out_dir={tmp_path}"])
    final = run_sft(cfg)
    assert final == tmp_path / "final"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    mode = "interleaved" if trace == "interleaved" else "text"
    assert [f"val/accuracy/{mode}" in r for r in lines] == [False, True, False, True]
    assert (lines[0]["tokens/vt_patches"] > 0) == (trace == "interleaved")
    for name in ("last", "best"):
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert state["step"] in (2, 4)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave nothing behind
    backend = MiniBackend.load(final)
    assert backend.cfg.d_model == 32
    # continue from the saved model
    more = load_config(
        SFTConfig,
        None,
        TINY + [f"model.init_from={final}", f"out_dir={tmp_path / 'more'}", "optim.steps=1", "eval.every=5"],
    )
    assert run_sft(more).is_dir()


@pytest.mark.slow  # a 40-step run
def test_sft_lowers_the_loss(tmp_path):
    cfg = load_config(
        SFTConfig,
        None,
        TINY
        + [
            f"out_dir={tmp_path}",
            "data.n_train=4",
            "optim.steps=40",
            "optim.lr=0.01",
            "eval.every=1000",
            "data.n_val=0",
        ],
    )
    torch.manual_seed(0)
    run_sft(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss/ce"] for r in lines[:3]) / 3
    last = sum(r["loss/ce"] for r in lines[-3:]) / 3
    assert last < 0.6 * first


def test_split_by_task_validates_every_task_of_a_mix():
    from visual_opsd.errors import DataError
    from visual_opsd.sample import Sample
    from visual_opsd.sft import split_by_task

    samples = [Sample(id=f"{t}{i}", task=t, question="q", answer="a") for t in ("a", "b", "c") for i in range(4)]
    samples += [Sample(id="lone", task="d", question="q", answer="a")]
    train, val = split_by_task(samples, 5, seed=0)
    assert sorted(s.task for s in val) == ["a", "a", "b", "c", "d"]  # a turn each, then again
    assert {s.id for s in train} | {s.id for s in val} == {s.id for s in samples} and len(train) == 8
    assert [s.id for s in val] == [s.id for s in samples if s in val]  # the dataset's order
    assert split_by_task(samples, 5, seed=0) == (train, val)  # seeded
    assert split_by_task(samples, 0, seed=0) == (samples, [])
    with pytest.raises(DataError, match="data.n_val=13 would leave no training samples"):
        split_by_task(samples, 13, seed=0)


def test_sft_on_a_dataset_mixing_tasks_validates_per_task(tmp_path):
    """A dataset without a val_path gives validation samples of each of its tasks; the log has the
    accuracy per task beside the overall one."""
    from visual_opsd.data import write_dataset
    from visual_opsd.tasks import get_task

    mazes = get_task("maze").generate(12, seed=3, split="train", sizes=(3, 3), cell_px=4)
    for s in mazes[6:]:
        s.task = "short_answer"  # scored as a plain answer string: two tasks in one file
    write_dataset(mazes, tmp_path / "mix")
    cfg = load_config(SFTConfig, None, TINY + ["data.trace=text_only", f"data.path={tmp_path / 'mix'}", "data.n_val=4",
                                               f"out_dir={tmp_path / 'run'}"])
    run_sft(cfg)
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val/accuracy/text", "val/accuracy/text/maze", "val/accuracy/text/short_answer"} <= set(last)
    both = (last["val/accuracy/text/maze"] + last["val/accuracy/text/short_answer"]) / 2  # 2 of each
    assert last["val/accuracy/text"] == pytest.approx(both)


def test_a_sample_of_an_unknown_task_stops_the_run_in_one_line_before_writing(tmp_path, capsys):
    from visual_opsd.cli import main
    from visual_opsd.data import write_dataset
    from visual_opsd.tasks import get_task

    mazes = get_task("maze").generate(6, seed=3, split="train", sizes=(3, 3), cell_px=4)
    mazes[4].task = "Geometry_Sketch"
    write_dataset(mazes, tmp_path / "odd")
    out = tmp_path / "run"
    argv = ["sft", *TINY, "data.trace=text_only", f"data.path={tmp_path / 'odd'}", "data.n_val=2", f"out_dir={out}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists()
    assert f"row {mazes[4].id}: task: unknown task 'Geometry_Sketch'; known tasks: jigsaw, maze" in err


def test_vt_options_trace_the_same_maps_another_way():
    """`data.vt_options` gives the examples with a VT their own generator options on the same maps:
    here the text-only traces follow the first shortest path and the VTs a random one (docs/miniature.md)."""
    from visual_opsd.sft import _vt_variants, load_samples
    from visual_opsd.tasks import get_task

    cfg = load_config(SFTConfig, None, [*TINY, "data.n_train=60", "data.sizes=[4,5]", "data.options.path=first",
                                        "data.vt_options.path=random"])
    task = get_task("maze")
    train = load_samples(cfg.data, task, "train", 4)
    variants = _vt_variants(cfg.data, task, 4, train)
    assert [s.id for s in variants] == [s.id for s in train]
    assert all(a.metadata["grid"] == b.metadata["grid"] for a, b in zip(train, variants, strict=True))
    differ = sum(a.answer != b.answer for a, b in zip(train, variants, strict=True))
    assert 0 < differ < len(train)  # a random route is often, not always, another than the first one
    assert all(task.is_correct(s, f"\\boxed{{{s.answer}}}") for s in variants)
    plain = load_config(SFTConfig, None, [*TINY, "data.options.path=first"])
    assert _vt_variants(plain.data, task, 4, train) is train  # unset: the same samples
    with pytest.raises(ConfigError, match="vt_options"):
        load_config(SFTConfig, None, [*TINY, "data.trace=text_only", "data.vt_options.path=random"])
