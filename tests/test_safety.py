"""Safe loading: no code runs because of what a file contains.

- weights through safetensors; any `torch.load` with `weights_only=True` (source scan, and a
  malicious pickle refused in tests/test_faults.py);
- no pickle / marshal / unsafe YAML loaders anywhere in the package; YAML configs with the safe loader;
- `trust_remote_code` never passed as a literal True and off by default wherever it is a setting;
- image paths in a dataset cannot leave the dataset folder (`..`, absolute, symbolic links)
  unless `allow_outside=True`.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from visual_opsd.config import ConfigError, load_config
from visual_opsd.data import NATIVE_FILE, DataError, load_dataset
from visual_opsd.train import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "visual_opsd"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialisation_in_source(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, owner, name in _calls(tree):
        where = f"{path.name}:{node.lineno}"
        if owner == "torch" and name == "load":
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
        assert not (owner in ("pickle", "marshal", "dill", "cloudpickle") and name in ("load", "loads")), where
        assert not (owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all")), where
        for k in node.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), f"{where}: literal True"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_trust_remote_code_defaults_to_false(path):
    """Wherever `trust_remote_code` is a parameter or a config field, its default is False."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.target.id == "trust_remote_code" and node.value is not None:
            default = node.value
            if isinstance(default, ast.Call):  # field(default=False, ...)
                default = next((k.value for k in default.keywords if k.arg == "default"), None)
            assert isinstance(default, ast.Constant) and default.value is False, f"{path.name}:{node.lineno}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code":
                    assert isinstance(default, ast.Constant) and default.value is False, f"{path.name}:{node.lineno}"


def test_yaml_config_is_read_with_the_safe_loader(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, cfg)
    assert not marker.exists()


def _dataset_with_image(folder: Path, rel: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    row = {"id": "a", "question": "q?", "answer": "B", "problem_images": [rel]}
    (folder / NATIVE_FILE).write_text(json.dumps(row) + "\n")
    return folder


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_paths_cannot_escape_the_dataset(tmp_path, kind):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    folder = tmp_path / "ds"
    if kind == "dotdot":
        _dataset_with_image(folder, "../secret.png")
    elif kind == "absolute":
        _dataset_with_image(folder, str(secret))
    else:
        _dataset_with_image(folder, "images/link.png")
        (folder / "images").mkdir()
        os.symlink(secret, folder / "images" / "link.png")
    with pytest.raises(DataError, match=r"row a: problem_images\[0\]: .*(leaves the dataset folder|absolute path)"):
        load_dataset(folder)
    assert len(load_dataset(folder, allow_outside=True)) == 1  # the user can allow it explicitly
