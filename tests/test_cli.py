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
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "config keys (default, meaning):" in out and " = " in out


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_unknown_key_is_a_clean_error(command, capsys):
    assert main([command, "no_such_key=1", "--print-config"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err
