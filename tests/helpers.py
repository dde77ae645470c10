"""Plain helpers shared by more than one test module (the fixtures are in conftest.py).

Test modules import these as `from helpers import ...` (pytest puts tests/ on sys.path); no test
module imports another test module.

- tiny models: `maze_tokenizer`, `tiny_mini`, `save_tiny_mini` (the 2-layer mini model the training tests start
  from), `bagel_tiny_folder` (the tiny golden BAGEL checkpoint in the released folder layout);
- short training runs: `run_overrides` (key=value overrides on a base such as `SHORT_RUN`;
  `dist_overrides` on `DIST_RUN`), `train_dumping_grads`, `one_process`, `cli` (`visual-opsd train` as a child process,
  optionally with a fault from `visual_opsd.faults` armed) and `launch` (`accelerate launch`);
- what a run leaves: `metrics_rows`, `step_rows`, `weights`, `optimizer_state` (whole or sharded checkpoints),
  `max_diff`, `assert_same`;
- data: `VSP_EXAMPLES` (the shipped VSP maps), `random_image`, `pixels`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visual_opsd import sharded_checkpoint
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.config import load_config
from visual_opsd.faults import DUMP_ENV, ENV
from visual_opsd.tokenizer import Tokenizer, build_tokenizer_for_tasks
from visual_opsd.train import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
VSP_EXAMPLES = ROOT / "tests" / "data" / "vsp-examples"  # six VSP maze maps, levels 3-8 (MIT, see its LICENSE)

# --- tiny models ------------------------------------------------------------------------------------

TINY_MINI = dict(d_model=32, n_layers=2, n_heads=2, patch_size=4, max_grid=4)


@functools.cache
def maze_tokenizer() -> Tokenizer:
    """The word-level tokenizer of the maze task's texts (built once; not modified by its users)."""
    return build_tokenizer_for_tasks(["maze"], n_per_task=40)


def tiny_mini(seed: int = 0) -> MiniBackend:
    """An untrained two-layer mini model (d_model 32) with `maze_tokenizer()`."""
    return MiniBackend.new(maze_tokenizer(), seed=seed, **TINY_MINI)


def save_tiny_mini(path: Path) -> Path:
    """`tiny_mini()` saved at `path` like an SFT result (weights + tokenizer + config)."""
    tiny_mini().save(path)
    return path


GOLD = ROOT / "tests" / "data" / "bagel-golden"
BAGEL_TINY_MODEL = dict(
    vit_max_patches_per_side=8,
    max_latent_size=8,
    z_channels=4,
    vae_downsample=2,
    bos_id=250,
    eos_id=251,
    vision_start_id=252,
    vision_end_id=253,
)
BAGEL_TINY_BACKEND = dict(
    vit_transform=[32, 16, 4], vae_transform=[32, 16, 4], framing_text="VT refs:", transition_text="Now reason."
)


def bagel_tiny_folder(root: Path) -> Path:
    """A checkpoint folder in the released BAGEL layout holding the tiny golden model."""
    root.mkdir(parents=True, exist_ok=True)
    for f in ("llm_config.json", "vit_config.json"):
        shutil.copyfile(GOLD / "configs" / "tiny" / f, root / f)
    for f in ("ema.safetensors", "ae.safetensors"):
        shutil.copyfile(GOLD / "weights" / f, root / f)
    ae = json.loads((GOLD / "configs" / "tiny" / "ae_config.json").read_text())
    extra = {"model": BAGEL_TINY_MODEL, "ae": ae, "tokenizer": "toy", "backend": BAGEL_TINY_BACKEND}
    (root / "bagel_config.json").write_text(json.dumps(extra))
    return root


# --- short training runs ----------------------------------------------------------------------------

# A few steps of Visual-OPSD on the tiny mini model (test_train.py, test_faults.py).
SHORT_RUN = {
    "progress": "false",
    "threads": "1",
    "data.sizes": "[3,3]",
    "data.n_train": "12",
    "data.n_val": "2",
    "rollout.max_new_tokens": "12",
    "eval.max_new_tokens": "4",
    "eval.every": "100",
    "optim.steps": "4",
    "optim.prompts_per_step": "4",
    "optim.lr": "0.01",
    "optim.warmup_steps": "1",
    "save_every": "1",
    "teacher.ema_decay": "0.5",
}

# The deterministic set-up of the multi-process tests (test_distributed.py, test_deepspeed.py):
# completions are the samples' own traces (rollout.source=data), of uneven lengths across ranks.
DIST_STEPS = 3
DIST_RUN = {
    "progress": "false",
    "threads": "1",
    "data.sizes": "[3,4]",
    "data.n_train": "12",
    "data.n_val": "2",
    "rollout.source": "data",
    "eval.max_new_tokens": "4",
    "eval.every": "100",
    "optim.steps": str(DIST_STEPS),
    "optim.prompts_per_step": "4",
    # Adam divides by sqrt(v): an entry whose gradient nearly cancels (fp32 summation order differs
    # between splits) moves by up to ~lr x 1e-3 differently; lr 3e-4 keeps that below 1e-6
    "optim.lr": "0.0003",
    "optim.warmup_steps": "1",
    "save_every": "1",
    "teacher.ema_decay": "0.5",
    "loss.top_k": "null",
}


def run_overrides(model: Path, out: Path, base: dict[str, str], **extra) -> list[str]:
    """`key=value` overrides of a `visual-opsd train` run from `model` into `out`: `base`, then `extra`."""
    values = {"init_from": str(model), "out_dir": str(out), **base}
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def dist_overrides(model: Path, out: Path, **extra) -> list[str]:
    """`run_overrides` on `DIST_RUN`."""
    return run_overrides(model, out, DIST_RUN, **extra)


def train_dumping_grads(args: list[str], out: Path) -> Path:
    """`run_train` in this process on the overrides `args`, writing every step's synced gradients
    under out/grads (the `VISUAL_OPSD_DUMP_GRADS` hook)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(DUMP_ENV, str(out / "grads"))
    try:
        run_train(load_config(TrainConfig, None, args))
    finally:
        mp.undo()
    return out


def one_process(model: Path, out: Path) -> Path:
    """A plain one-process `DIST_RUN` from `model` into `out` that dumps its gradients under out/grads."""
    return train_dumping_grads(dist_overrides(model, out), out)


def cli(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m visual_opsd.cli ARGS` as a child process (one OpenMP thread); `fault` arms
    `VISUAL_OPSD_FAULT` in the child only (e.g. "kill:optimizer@4", see visual_opsd.faults)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "visual_opsd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    n: int, args: list[str], timeout: float = 120, config: str | None = None, command: str = "train",
    check: bool = True, **env_extra: str
) -> subprocess.CompletedProcess:
    """`accelerate launch` N CPU processes (torchrun underneath, gloo) running `visual-opsd <command>`
    (train by default), with a shipped accelerate `config` (configs/accelerate/) when given (fp32:
    --mixed_precision no). Fails the test unless the launch exits 0 (`check`; off for killed runs)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **env_extra}
    engine = ["--config_file", str(ROOT / "configs" / "accelerate" / config)] if config else ["--multi_gpu"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *engine,
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "visual_opsd.cli",
        command,
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- what a run leaves ------------------------------------------------------------------------------


def metrics_rows(out: Path) -> list[dict]:
    """Every row of out/metrics.jsonl (step rows and validation rows)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    """The training-step rows of out/metrics.jsonl (those with a learning rate)."""
    return [r for r in metrics_rows(out) if "lr" in r]


def weights(folder: Path, teacher: bool | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's student weights plus its teacher's as `teacher/NAME`: the teacher when it has
    one (`teacher=None`), or required (`True`). A sharded checkpoint (FSDP2 runs) is exported to a
    temporary model folder first (`visual-opsd export`), its shadow read whole."""
    if sharded_checkpoint.is_sharded(folder):
        exported = sharded_checkpoint.export(folder, Path(tempfile.mkdtemp()) / "model")
        out = load_file(str(exported / "model.safetensors"))
        shadow = sharded_checkpoint.read_whole(folder, "teacher/")
        assert shadow or not teacher, f"{folder}: no teacher shadow"
        out.update({f"teacher/{k}": v for k, v in shadow.items()})
        return out
    out = load_file(str(folder / "model" / "model.safetensors"))
    shadow = folder / "teacher.safetensors"
    if teacher or (teacher is None and shadow.is_file()):
        out.update({f"teacher/{k}": v for k, v in load_file(str(shadow)).items()})
    return out


def optimizer_state(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """A checkpoint's AdamW state as whole tensors in torch's layout ({parameter index: {key: tensor}}),
    from `optimizer.pt` or from a sharded checkpoint's shards."""
    if not sharded_checkpoint.is_sharded(folder):
        return torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    names = json.loads((folder / sharded_checkpoint.INFO).read_text())["names"]
    moments = sharded_checkpoint.read_whole(folder, "optim/")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, item = key.rpartition("/")
        state.setdefault(names.index(name), {})[item] = value
    return state


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts are bit-identical."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- images -----------------------------------------------------------------------------------------


def pixels(img: Image.Image) -> np.ndarray:
    """An image's RGB pixels as a (height, width, 3) uint8 array."""
    return np.asarray(img.convert("RGB"))


def random_image(seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Image.Image:
    """Uniform random pixels, `size` = (width, height), converted to `mode`."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).convert(mode)


# --------------------------------------------------------------------------------------------
# stage functions for the demo's scheduler test (module level: spawned processes import them)


def write_after(path: str, *needed: str) -> None:
    """Write `path`; fail when a file it needs is not there yet (a dependency ran too late)."""
    missing = [p for p in needed if not Path(p).is_file()]
    if missing:
        raise RuntimeError(f"ran before {missing}")
    Path(path).write_text("done")


def fail_stage() -> None:
    raise RuntimeError("this stage fails")


# ThinkMorph's parquet layout: an HF Image cell is a {bytes, path} struct
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_cell(img: Image.Image | None, fmt: str = "PNG"):
    return None if img is None else {"bytes": image_bytes(img, fmt), "path": None}


def thinkmorph_table(rows: list[dict]) -> pa.Table:
    """ThinkMorph's columns (problem image, thoughts spelt "resoning", up to 8 VTs) for `rows`."""
    columns = {
        "pid": pa.string(),
        "question": pa.string(),
        "answer": pa.string(),
        "problem_image_0": IMAGE_TYPE,
        "resoning_thought_0": pa.string(),
        "reasoning_image_0": IMAGE_TYPE,
        "resoning_thought_1": pa.string(),
        "task": pa.string(),
        "full_text_only_thought": pa.string(),
    }
    for k in range(1, 8):
        columns[f"reasoning_image_{k}"] = IMAGE_TYPE
        columns[f"resoning_thought_{k + 1}"] = pa.string()
    schema = pa.schema(list(columns.items()))
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
