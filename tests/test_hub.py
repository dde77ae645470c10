"""Hugging Face Hub ids where a folder is accepted (`hub.py`), offline against a cache the tests lay
out as huggingface_hub does (`hub/models--org--name/snapshots/<commit>/` with `refs/<revision>`,
files as links into `blobs/`): `eval --system`, `train init_from`, `sft model.init_from`, diagnose's
model, `data.path` and eval's `--data` take `org/name[@revision]`; an id not in the cache is one
config-error line with the `hf download` command, exit 2, nothing written; a local folder wins over
an id; a LoRA adapter records the id it was trained from, not this machine's cache path."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import SHORT_RUN, metrics_rows, run_overrides

from visual_opsd import hub
from visual_opsd.cli import main
from visual_opsd.config import load_config
from visual_opsd.errors import ConfigError
from visual_opsd.train import TrainConfig, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_EVAL = ["--n", "2", "--sizes", "3", "3", "--latency-n", "1", "--warmup", "0", "--max-new-tokens", "4",
             "--no-progress", "threads=1"]
TRAIN_RUN = {**SHORT_RUN, "optim.steps": "1", "eval.every": "1"}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline: the variables for child processes, and the constants
    huggingface_hub read from them at its import for this one."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_RESOLVED", {})  # ids resolved by earlier tests, against their caches
    monkeypatch.setattr(hub, "_GIVEN", {})
    return home


def cache_repo(home: Path, repo: str, folder: Path, kind: str = "model", revision: str = "main") -> Path:
    """`folder`'s files laid out as the snapshot of `repo` at `revision` in the cache of `home`, as
    `hf download` leaves them (each file a link into the repository's blobs/); the snapshot folder."""
    storage = home / "hub" / f"{kind}s--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()  # 40 hex digits, as a commit hash
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = snapshot / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        target.symlink_to(Path("..", *[".."] * len(file.relative_to(folder).parts), "blobs", blob.name))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def cached_model(hf_home, tiny_model) -> Path:
    """The tiny mini model as the Hub model `org/tiny` in the offline cache; its snapshot folder."""
    return cache_repo(hf_home, "org/tiny", tiny_model)


@pytest.fixture
def cached_mazes(hf_home, tmp_path) -> Path:
    """Ten small mazes (native format) as the Hub dataset `org/mazes` in the offline cache; its snapshot."""
    from visual_opsd.data import write_dataset
    from visual_opsd.tasks import get_task

    write_dataset(get_task("maze").generate(10, seed=3, split="test", sizes=(3, 3), cell_px=4), tmp_path / "mazes")
    return cache_repo(hf_home, "org/mazes", tmp_path / "mazes", kind="dataset")


def test_ids_and_paths_are_told_apart(tmp_path, monkeypatch, hf_home, cached_model):
    assert hub.parse_id("org/name") == ("org/name", None)
    assert hub.parse_id("Qwen/Qwen2.5-VL-7B-Instruct@refs/pr/1") == ("Qwen/Qwen2.5-VL-7B-Instruct", "refs/pr/1")
    for not_an_id in ("runs/sft/final", "/abs/model", "./org/name", "../org/name", "model", "org/name@", "a--b/c",
                      "org/na..me", "C:/model", "~/org"):
        assert hub.parse_id(not_an_id) is None, not_an_id
        assert hub.resolve_folder(not_an_id) == Path(not_an_id)  # the caller's "no such folder" follows
    assert hub.resolve_folder("org/tiny") == cached_model
    assert hub.given_name(cached_model) == "org/tiny" and hub.given_name(tmp_path) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    hub._RESOLVED.clear()
    assert hub.resolve_folder("org/tiny") == Path("org/tiny")  # a local folder wins over the id


def test_a_revision_picks_its_snapshot(hf_home, tiny_model, cached_model):
    v1 = cache_repo(hf_home, "org/tiny", tiny_model, revision="v1")
    assert v1 != cached_model and hub.resolve_folder("org/tiny@v1") == v1
    assert hub.resolve_folder(f"org/tiny@{v1.name}") == v1  # a commit hash needs no ref


def test_eval_and_diagnose_take_a_model_id(hf_home, cached_model, tmp_path):
    from visual_opsd.diagnostics.common import model_folder

    out = tmp_path / "eval"
    assert main(["eval", "--system", "m=org/tiny:text", "--task", "maze", "--out", str(out), *FAST_EVAL]) == 0
    assert json.loads((out / "results.json").read_text())["m"]["tasks"]["maze"]["n"] == 2
    assert model_folder("org/tiny") == cached_model


def test_train_starts_from_a_model_id_on_a_dataset_id(hf_home, cached_model, cached_mazes, tmp_path):
    out = tmp_path / "run"
    args = run_overrides(Path("org/tiny"), out, TRAIN_RUN, **{"data.path": "org/mazes", "data.n_val": 2})
    run_train(load_config(TrainConfig, None, args))
    assert [r["step"] for r in metrics_rows(out)][-1] == 1
    assert json.loads((out / "config.json").read_text())["init_from"] == "org/tiny"  # as given


def test_sft_and_eval_take_a_dataset_id(hf_home, cached_model, cached_mazes, tmp_path):
    sft = ["sft", "model.init_from=org/tiny", "data.path=org/mazes", "data.n_val=2", "data.trace=text_only",
           "optim.steps=1", "optim.batch_size=2", "eval.every=1", "eval.max_new_tokens=4", "progress=false",
           "threads=1", f"out_dir={tmp_path / 'sft'}"]
    assert main(sft) == 0 and (tmp_path / "sft" / "final").is_dir()
    out = tmp_path / "eval"
    assert main(["eval", "--system", "m=org/tiny", "--data", "org/mazes@main", "--out", str(out), *FAST_EVAL]) == 0
    assert set(json.loads((out / "results.json").read_text())["m"]["tasks"]) == {"mazes"}  # the repo's name


def test_a_cached_dataset_reads_its_blobs_and_no_file_outside_its_repo(cached_mazes, tmp_path):
    """A snapshot's files are links into the repository's blobs/: they count as inside the dataset;
    a link that leaves the repository's cache folder is refused as before (data.allow_outside)."""
    from visual_opsd.data import load_dataset
    from visual_opsd.errors import DataError

    assert len(list(load_dataset(cached_mazes))) == 10
    image = next((cached_mazes / "images").iterdir())
    shutil.copyfile(image, tmp_path / "outside.png")
    image.unlink()
    image.symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match="leaves the dataset folder through a symbolic link"):
        list(load_dataset(cached_mazes))


@pytest.mark.parametrize(("argv", "key", "command"), [
    (["train", "init_from=org/missing"], "init_from", "hf download org/missing"),
    (["sft", "model.init_from=org/missing@v2"], "model.init_from", "hf download org/missing --revision v2"),
    (["eval", "--system", "m=org/missing", *FAST_EVAL], "system 'm'", "hf download org/missing"),
    (["train", "init_from={model}", "data.path=org/nodata"], "data.path",
     "hf download org/nodata --repo-type dataset"),
    (["eval", "--system", "m={model}", "--data", "org/nodata", *FAST_EVAL], "data.paths",
     "hf download org/nodata --repo-type dataset"),
])
def test_an_id_not_in_the_cache_is_one_line_and_writes_nothing(hf_home, tiny_model, tmp_path, capsys, argv, key,
                                                               command):
    out = tmp_path / "runs" / "out"
    argv = [a.format(model=tiny_model) for a in argv]
    assert main([*argv, *(["--out", str(out)] if argv[0] == "eval" else [f"out_dir={out}"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"visual-opsd: config error: {key}: no such folder")
    assert "not in the Hugging Face cache" in err and f"`{command}`" in err
    assert not out.parent.exists()


def test_online_failure_is_one_line_too(monkeypatch):
    """Online, a download that fails (here: no such repo) is the same one line with the reason."""
    import huggingface_hub

    def refuse(repo, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: no network\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError) as e:
        hub.resolve_folder("org/elsewhere", "dataset", key="data.path")
    assert str(e.value) == ("data.path: no such folder org/elsewhere, and the Hub dataset org/elsewhere cannot be "
                            "downloaded from the Hugging Face Hub (LocalEntryNotFoundError: Got: ConnectError: no "
                            "network); fetch it with `hf download org/elsewhere --repo-type dataset`")


def test_a_lora_adapter_records_the_id_it_was_trained_from(hf_home, tmp_path):
    """An HF model given as `org/vlm`, trained with LoRA: the adapter's base_model_name_or_path is
    the id (portable: transformers and a resume resolve it through the cache), not the cache path."""
    pytest.importorskip("peft")
    from visual_opsd.backends.hf import HFBackend
    from visual_opsd.backends.hf_config import HFOptions
    from visual_opsd.sft import open_model

    HFBackend.tiny("qwen2_vl").save(tmp_path / "vlm")
    snapshot = cache_repo(hf_home, "org/vlm", tmp_path / "vlm")
    backend = open_model("init_from", "org/vlm", HFOptions(lora=True, lora_r=4, save_merged=False))
    backend.save(tmp_path / "out")
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/vlm"
    assert json.loads((tmp_path / "out" / "visual_opsd.json").read_text())["source"] == "org/vlm"
    resumed = open_model("resume", tmp_path / "out", HFOptions(lora=True, lora_r=4), resume=True)
    assert Path(resumed.source) == snapshot and hub.given_name(resumed.source) == "org/vlm"
