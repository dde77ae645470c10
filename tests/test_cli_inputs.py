"""Bad inputs at start-up: a missing model folder, a task name with a typo or a missing dataset ends
`train`, `sft` and `diagnose` with one line on stderr and exit status 2 (docs/failure-modes.md),
and leaves no output folder behind: the inputs are checked before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli

from visual_opsd.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# (command line with {model} / {missing} / {out} to fill, config key the message names)
CASES = {
    "train-init_from": (["train", "init_from={missing}", "out_dir={out}"], "init_from: no model folder at"),
    "train-not-a-model": (["train", "init_from={empty}", "out_dir={out}"], "init_from: "),
    "train-task": (["train", "init_from={model}", "data.task=mazee", "out_dir={out}"], "data.task: 'mazee'"),
    "train-data": (["train", "init_from={model}", "data.path={missing}", "out_dir={out}"], "(data.path)"),
    "train-resume": (["train", "init_from={model}", "resume={missing}", "out_dir={out}"], "no such checkpoint folder"),
    "sft-init_from": (["sft", "model.init_from={missing}", "out_dir={out}"], "model.init_from: no model folder at"),
    "sft-task": (["sft", "data.task=mazee", "out_dir={out}"], "data.task: 'mazee'"),
    "sft-data": (["sft", "model.init_from={model}", "data.path={missing}", "out_dir={out}"], "(data.path)"),
    "diagnose-model": (["diagnose", "kl", "--model", "{missing}", "out_dir={out}"], "no model here"),
    "diagnose-task": (["diagnose", "kl", "--model", "{model}", "data.tasks=[mazee]", "out_dir={out}"],
                      "data.tasks: 'mazee'"),
}
EXIT = {"train-resume": 3}  # no usable checkpoint: a RunError (CheckpointError), exit 3


def fill(argv: list[str], tiny_model: Path, tmp_path: Path) -> tuple[list[str], Path]:
    out = tmp_path / "runs" / "out"
    (tmp_path / "empty").mkdir(exist_ok=True)
    values = {"model": tiny_model, "missing": tmp_path / "no_such_folder", "out": out, "empty": tmp_path / "empty"}
    return [a.format(**values) for a in argv], out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model, tmp_path, capsys):
    argv, out = fill(CASES[case][0], tiny_model, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT.get(case, 2), err
    assert len(lines) == 1 and CASES[case][1] in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not out.parent.exists()  # nothing written, not even the folder


def test_did_you_mean_names_the_closest_task(tiny_model, tmp_path, capsys):
    argv, _ = fill(CASES["train-task"][0], tiny_model, tmp_path)
    assert main(argv) == 2
    assert "did you mean 'maze'?" in capsys.readouterr().err


@pytest.mark.slow  # a child process: the real command line, no traceback on stderr
@pytest.mark.parametrize("case", ["train-init_from", "sft-task"])
def test_bad_input_from_the_command_line(case, tiny_model, tmp_path):
    argv, out = fill(CASES[case][0], tiny_model, tmp_path)
    proc = cli(argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and CASES[case][1] in lines[0], proc.stderr
    assert lines[0].startswith("visual-opsd: config error: ")
    assert not out.parent.exists()
