"""Config loading: YAML + overrides into typed dataclasses, loud errors, and every shipped config valid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from visual_opsd.cli import CONFIG_COMMANDS
from visual_opsd.config import config_help, load_config, to_dict
from visual_opsd.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Optim:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Top:
    name: str = "run"
    steps: int = 10
    mode: Literal["ema", "live", "frozen"] = "ema"
    out: str | None = None
    sizes: list[int] = field(default_factory=lambda: [3, 6])
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(Top, path, ["optim.betas=[0.8, 0.9]", "mode=frozen", "out=/tmp/x", "steps=30"])
    assert cfg.steps == 30 and cfg.optim.lr == 0.01 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.mode == "frozen" and cfg.out == "/tmp/x" and cfg.name == "run"
    assert to_dict(cfg)["optim"]["betas"] == (0.8, 0.9)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(Top, None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(Top, None, ["optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(Top, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Top, None, ["steps=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean optim.lr?"),
        ("stpes=3", "did you mean steps?"),
        ("mode=emaa", "did you mean 'ema'"),
        ("optim.lr=-1", "lr must be > 0"),
        ("sizes=3", "sizes: expected a list"),
        ("optim.betas=[0.9]", "expected 2 values"),
        ("steps", "not of the form key.sub=value"),
        ("name.sub=3", "name: expected a string"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(Top, None, [override])


def test_override_into_a_value_fails():
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        load_config(Top, None, ["name=x", "name.sub=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Top, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Top, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Top, tmp_path / "bad.yaml")
    # The safe loader refuses Python object tags instead of running them.
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Top, tmp_path / "evil.yaml")


def test_help_lists_every_leaf_key():
    keys = {row[0]: row for row in config_help(Top)}
    assert set(keys) == {"name", "steps", "mode", "out", "sizes", "optim.lr", "optim.betas"}
    assert keys["optim.lr"][2] == "peak learning rate"


def test_every_shipped_config_loads_and_validates():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert files, "configs/ holds no YAML files"
    for path in files:
        command = path.stem.split("_")[0]
        assert command in CONFIG_COMMANDS, f"{path.name}: no command {command!r} (name configs <command>_*.yaml)"
        cls, _ = CONFIG_COMMANDS[command][1]()
        load_config(cls, path)


def test_backend_section_is_chosen_by_kind_or_by_its_keys():
    """One `backend:` section for every model family, told apart by `kind`; on the command line a
    key that only one family has picks it; an older config's `hf:` section gets a pointer."""
    from visual_opsd.backends import BagelLoadOptions, HFOptions, MiniOptions
    from visual_opsd.train import TrainConfig

    assert load_config(TrainConfig, None, []).backend is None
    hf = load_config(TrainConfig, None, ["backend.lora=true", "backend.lora_r=4"]).backend
    assert isinstance(hf, HFOptions) and hf.lora and hf.lora_r == 4
    assert isinstance(load_config(TrainConfig, None, ["backend.kind=bagel"]).backend, BagelLoadOptions)
    assert isinstance(load_config(TrainConfig, None, ["backend.kind=mini"]).backend, MiniOptions)
    with pytest.raises(ConfigError, match=r"backend.kind: 'gpt' is not one of \['bagel', 'hf', 'mini'\]"):
        load_config(TrainConfig, None, ["backend.kind=gpt"])
    with pytest.raises(ConfigError, match="say which kind"):
        load_config(TrainConfig, None, ["backend.device=cpu"])  # hf and bagel both have `device`
    with pytest.raises(ConfigError, match="unknown config key 'backend.lora'"):
        load_config(TrainConfig, None, ["backend.kind=bagel", "backend.lora=true"])
    with pytest.raises(ConfigError, match="it is now backend"):
        load_config(TrainConfig, None, ["hf.lora=true"])
