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

from visual_opsd.config import load_config
from visual_opsd.data import NATIVE_FILE, load_dataset
from visual_opsd.errors import ConfigError, DataError
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


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_parquet_image_paths_cannot_escape_the_dataset(tmp_path, kind):
    """The same rule for image cells of a ThinkMorph parquet file that hold a path instead of bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    rel = {"dotdot": "../secret.png", "absolute": str(secret), "symlink": "images/link.png"}[kind]
    if kind == "symlink":
        os.symlink(secret, folder / "images" / "link.png")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"pid": ["p0"], "question": ["q?"], "answer": ["<answer>\\boxed{B}</answer>"],
                      "problem_image_0": pa.array([{"bytes": None, "path": rel}], type=image)})
    pq.write_table(table, folder / "train.parquet")
    with pytest.raises(DataError, match=r"row p0: problem_image_0: .*(leaves the dataset folder|absolute path)"):
        load_dataset(folder)
    assert len(load_dataset(folder, allow_outside=True)) == 1


@pytest.mark.parametrize("kind", ["image", "table", "level"])
def test_vsp_files_linked_from_outside_are_refused(tmp_path, kind):
    """A VSP folder has no path strings, but its tables, images or level folders can be symbolic links
    to elsewhere: refused before reading unless allowed (the scorer's own reader keeps following them)."""
    from visual_opsd.vsp import load_vsp_folder

    outside = tmp_path / "outside" / "level3"
    root = tmp_path / "vsp"
    for base in (outside, root / "level3"):
        (base / "table").mkdir(parents=True)
        (base / "img").mkdir()
        (base / "table" / "0.txt").write_text("| | Col 1 | Col 2 | Col 3 |\n| Row 1 | @ | _ | _ |\n"
                                              "| Row 2 | _ | _ | _ |\n| Row 3 | _ | _ | * |\n")
        Image.new("RGB", (24, 24)).save(base / "img" / "0.png")
    if kind == "level":
        for p in sorted((root / "level3").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "level3").rmdir()
        os.symlink(outside, root / "level3")
    else:
        target = root / "level3" / ("img/0.png" if kind == "image" else "table/0.txt")
        target.unlink()
        os.symlink(outside / target.relative_to(root / "level3"), target)
    with pytest.raises(DataError, match=r"vsp-L3-0: (img|table): .*leaves the dataset folder through a symbolic link"):
        load_dataset(root)
    assert len(load_dataset(root, allow_outside=True)) == 1 == len(load_vsp_folder(root))
