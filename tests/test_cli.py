"""The command line answers --help for every command and reports bad configs without a traceback."""

from __future__ import annotations

import pytest

from visual_opsd.cli import CONFIG_COMMANDS, main


@pytest.mark.parametrize("argv", [[], ["data"], ["data", "make"], ["data", "validate"], ["score", "vsp"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: visual-opsd" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_config_command_help_lists_keys(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "config keys (default, meaning):" in out and " = " in out


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_unknown_key_is_a_clean_error(command, capsys):
    assert main([command, "no_such_key=1", "--print-config"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


def test_task_options_may_follow_flags(tmp_path, capsys):
    out = tmp_path / "jig"
    assert main(["data", "make", "jigsaw", "--out", str(out), "--n", "3", "image_px=16"]) == 0
    assert main(["data", "validate", str(out)]) == 0
    assert "3 valid" in capsys.readouterr().out


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "make", "jigsaw", "--out", "x", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
