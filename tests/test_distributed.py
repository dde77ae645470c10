"""Scale-out under `accelerate launch`: 2 CPU processes (gloo) reproduce 1 process exactly.

Deterministic mode (rollout.source=data): completions are the samples' own traces, of uneven
lengths across ranks, so the only difference between the runs is how the global batch is split
(2 ranks x 2 micro-batches of 1 prompt vs 1 process x 1 micro-batch of 4). Also: a 2-process
checkpoint resumed in 1 process, a non-finite loss on one rank skipped on both, and every shipped
accelerate config resolved by accelerate's own launcher code to the engine it claims, and FSDP2
(shard_weights=true, or configs/accelerate/fsdp.yaml) matching the same one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    DIST_STEPS,
    ROOT,
    bagel_tiny_folder,
    dist_overrides,
    launch,
    max_diff,
    one_process,
    optimizer_state,
    step_rows,
    weights,
)
from safetensors.torch import load_file

from visual_opsd import sharded_checkpoint
from visual_opsd.backends import open_backend
from visual_opsd.backends.bagel_model import is_generation_param
from visual_opsd.backends.hf import HFBackend
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.config import load_config
from visual_opsd.faults import DUMP_ENV, ENV
from visual_opsd.train import TrainConfig, run_train


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model, single, tmp_path):
    out = tmp_path / "ddp"
    launch(2, dist_overrides(tiny_model, out, **{"optim.grad_accum": 2}), **{DUMP_ENV: str(out / "grads")})
    # the summed gradient of every step, then the weights (student and EMA teacher) after k steps
    for step in range(1, DIST_STEPS + 1):
        a, b = (load_file(str(d / "grads" / f"grads-{step}.safetensors")) for d in (single, out))
        assert max_diff(a, b) < 1e-6, f"step {step}"
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    ref, ddp = step_rows(single), step_rows(out)
    assert [r["step"] for r in ddp] == list(range(1, DIST_STEPS + 1))
    per_rank = [r["tokens/per_rank"] for r in ddp]
    assert any(a != b for a, b in per_rank), f"ranks got equal token counts {per_rank}: not an uneven test"
    for a, b in zip(ref, ddp, strict=True):
        assert a["tokens"] == b["tokens"] == sum(b["tokens/per_rank"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7)
        # rollout statistics: each rank's means, averaged over ranks = the global means
        stats = sorted(k for k in a if k.startswith("rollout/"))
        assert stats and stats == sorted(k for k in b if k.startswith("rollout/"))
        assert [b[k] for k in stats] == pytest.approx([a[k] for k in stats], abs=1e-12)
    # validation is sharded over ranks and its correct answers summed
    val = [
        [
            (r["step"], r["val/accuracy"])
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if "val/accuracy" in r
        ]
        for d in (single, out)
    ]
    assert val[0] == val[1] and [s for s, _ in val[0]] == [0, DIST_STEPS]
    # rank 0 alone wrote: one metrics file, one checkpoint, no temporaries
    written = sorted(p.name for p in out.iterdir())
    assert written == ["best", "config.json", "grads", "last", "last.prev", "metrics.jsonl"]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(tiny_model, single, tmp_path):
    out = tmp_path / "mixed"
    launch(2, dist_overrides(tiny_model, out, stop_at_step=1))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 1
    run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, out, resume=out / "last")))
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_model, tmp_path, monkeypatch):
    """A NaN loss on rank 1 alone at step 2: the loss sum and the gradient norm are reduced before the
    check, so both ranks skip the step (no rank hangs or diverges), and the run ends with the weights of
    one process that skipped step 2."""
    ref = tmp_path / "single"
    monkeypatch.setenv(ENV, "nan:loss@2")
    run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, ref)))
    monkeypatch.delenv(ENV)
    out = tmp_path / "ddp"
    launch(2, dist_overrides(tiny_model, out, **{"optim.grad_accum": 2}), **{ENV: "nan:loss@2/1"})
    rows, ref_rows = step_rows(out), step_rows(ref)
    assert [r["step"] for r in rows if "skipped" in r] == [2] == [r["step"] for r in ref_rows if "skipped" in r]
    assert rows[1]["samples"] == ref_rows[1]["samples"] and len(rows[1]["samples"]) == 4  # the global batch
    assert [r["step"] for r in rows] == list(range(1, DIST_STEPS + 1))
    assert max_diff(weights(ref / "last"), weights(out / "last")) < 1e-6


def test_split_must_divide_the_global_batch(tiny_model, tmp_path):
    from visual_opsd.errors import ConfigError
    from visual_opsd.train import prompts_per_rank

    cfg = load_config(TrainConfig, None, dist_overrides(tiny_model, tmp_path, **{"optim.grad_accum": 2}))
    assert prompts_per_rank(cfg.optim, 2) == 2
    with pytest.raises(ConfigError, match="multiple of processes x optim.grad_accum = 4 x 2 = 8"):
        prompts_per_rank(cfg.optim, 4)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    """Each config loads with accelerate's own config reader (as `accelerate launch --config_file` does)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type.value == raw["distributed_type"]
    assert "accelerate launch" in path.read_text().splitlines()[0] or "accelerate launch" in path.read_text()


SHIPPED = {  # file: (accelerate distributed type, machines, processes)
    "single_gpu.yaml": ("NO", 1, 1),
    "ddp.yaml": ("MULTI_GPU", 1, 8),
    "fsdp.yaml": ("FSDP", 1, 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8),
    "multi_node.yaml": ("MULTI_GPU", 2, 16),
}


def launcher_env(path: Path):
    """What `accelerate launch --config_file PATH ...` resolves before it spawns the workers: its
    arguments and the workers' environment (accelerate's own launcher code; no GPU needed)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "visual_opsd.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def test_the_six_configs_are_shipped():
    assert sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_accelerate_configs_resolve_to_their_engine(name, monkeypatch):
    """Each config goes through accelerate's launcher and, for FSDP and DeepSpeed, builds accelerate's
    plugin from the workers' environment: the settings the docs promise are the ones a run gets."""
    engine, machines, processes = SHIPPED[name]
    args, env = launcher_env(ROOT / "configs" / "accelerate" / name)
    assert (args.num_machines, args.num_processes) == (machines, processes)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert bool(args.multi_gpu) == (engine == "MULTI_GPU")
    assert bool(args.use_fsdp) == (engine == "FSDP") and bool(args.use_deepspeed) == (engine == "DEEPSPEED")
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if engine == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and plugin.activation_checkpointing is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints resumable on any count
        assert plugin.transformer_cls_names_to_wrap == ["Qwen2_5_VLDecoderLayer"]
    elif engine == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        stage = 2 if "zero2" in name else 3
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == stage == zero["stage"]
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
        assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)  # full weights on save
        assert plugin.gradient_accumulation_steps == 1  # accumulation stays with optim.grad_accum
        assert plugin.zero3_init_flag is False  # weights load whole, partitioned when the engine starts
        # the training loop accepts this plugin and runs its ZeRO stage (any backend)
        from types import SimpleNamespace

        from visual_opsd.distributed import Dist

        dist = Dist(_fake_accelerator("DEEPSPEED", plugin=plugin))
        assert dist.check_engine(SimpleNamespace(supports_sharding=False)) == f"zero{stage}"


def _fake_accelerator(engine: str, zero_stage: int = 3, offload: str = "none", plugin=None):
    """What `Dist` reads of an accelerate Accelerator of 2 processes with this distributed type (and,
    for DeepSpeed, this plugin, or one with `zero_stage` and `offload`)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = plugin or SimpleNamespace(
        zero_stage=zero_stage,
        deepspeed_config={
            "zero_optimization": {
                "stage": zero_stage,
                "offload_optimizer": {"device": offload},
                "offload_param": {"device": "none"},
            }
        },
    )
    return SimpleNamespace(
        process_index=0,
        num_processes=2,
        device=torch.device("cpu"),
        distributed_type=DistributedType[engine],
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU"])
def test_engines_shard_only_what_can_be_sharded(tiny_model, engine):
    """An accelerate FSDP config shards the mini backend (FSDP2); one that cannot be sharded by FSDP2
    stops at start pointing to ZeRO-3 or ddp.yaml (no silent replication); an accelerate DeepSpeed
    config runs its ZeRO stage for every backend; data-parallel engines run everything unsharded
    unless shard_weights or deepspeed_stage asks."""
    from types import SimpleNamespace

    from visual_opsd.distributed import Dist
    from visual_opsd.errors import ConfigError

    dist, backend = Dist(_fake_accelerator(engine)), MiniBackend.load(tiny_model)
    unshardable = SimpleNamespace(supports_sharding=False)
    assert dist.engine == engine
    if engine == "DEEPSPEED":
        assert dist.check_engine(backend) == dist.check_engine(unshardable) == "zero3"
        assert dist.check_engine(backend, deepspeed_stage=3) == "zero3"
        with pytest.raises(ConfigError, match="deepspeed_stage=2 contradicts the accelerate config's ZeRO stage 3"):
            dist.check_engine(backend, deepspeed_stage=2)
        with pytest.raises(ConfigError, match="both FSDP .* and DeepSpeed ZeRO"):
            dist.check_engine(backend, shard_weights=True)
        with pytest.raises(ConfigError, match="offloads \\(offload_optimizer\\).*set the offload devices to none"):
            Dist(_fake_accelerator(engine, offload="cpu")).check_engine(backend)
        return
    assert dist.check_engine(backend) == ("fsdp" if engine == "FSDP" else "torch")
    assert dist.check_engine(backend, shard_weights=True) == "fsdp"
    if engine != "FSDP":
        assert dist.check_engine(unshardable) == "torch"
        for stage in (1, 2, 3):
            assert dist.check_engine(unshardable, deepspeed_stage=stage) == f"zero{stage}"
        assert Dist(None).check_engine(backend, deepspeed_stage=3) == "torch"  # one process: nothing to split
    for ask in (False, True) if engine == "FSDP" else (True,):
        with pytest.raises(ConfigError, match="SimpleNamespace backend .*deepspeed_zero3.yaml.* or data parallel"):
            dist.check_engine(unshardable, shard_weights=ask)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tiny_model, single, tmp_path):
    """FSDP2 (weights, gradients, optimizer state and EMA shadow sharded over 2 gloo processes, 2
    micro-batches each) reproduces one unsharded process: gradients, losses, and after 3 steps the
    weights, the EMA teacher and the optimizer state."""
    out = tmp_path / "fsdp"
    launch(
        2,
        dist_overrides(tiny_model, out, shard_weights="true", **{"optim.grad_accum": 2}),
        **{DUMP_ENV: str(out / "grads")},
    )
    for step in range(1, DIST_STEPS + 1):
        a, b = (load_file(str(d / "grads" / f"grads-{step}.safetensors")) for d in (single, out))
        assert max_diff(a, b) < 1e-6, f"step {step}"
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert max_diff(weights(single / "best"), weights(out / "best")) < 1e-6  # gathered after validation
    # last/ holds each rank's shards (DCP); read whole, in torch's layout
    assert sharded_checkpoint.is_sharded(out / "last") and not (out / "last" / "model").exists()
    opt_a, opt_b = (optimizer_state(d / "last") for d in (single, out))
    assert opt_a.keys() == opt_b.keys()
    for i, state in opt_a.items():
        assert state.keys() == opt_b[i].keys()
        for k, v in state.items():
            assert v.shape == opt_b[i][k].shape and float((v - opt_b[i][k]).abs().max()) < 1e-6
    for a, b in zip(step_rows(single), step_rows(out), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["best", "config.json", "grads", "last", "last.prev", "metrics.jsonl"]


@pytest.mark.slow
def test_fsdp_shards_the_bagel_backend_as_one_process(tmp_path):
    """The BAGEL backend (tiny golden weights, released folder layout) under FSDP2 on 2 processes
    reproduces one process: its scoring runs inside BagelModel.forward, so FSDP gathers the weights for
    it and reduces every gradient it makes (the generation side, frozen, gets none)."""
    model = bagel_tiny_folder(tmp_path / "bagel")  # the same tiny checkpoint folder as the BAGEL tests
    one, two = one_process(model, tmp_path / "one"), tmp_path / "two"
    args = dist_overrides(model, two, shard_weights="true", **{"optim.grad_accum": 2})
    launch(2, args, **{DUMP_ENV: str(two / "grads")})
    for step in range(1, DIST_STEPS + 1):
        a, b = (load_file(str(d / "grads" / f"grads-{step}.safetensors")) for d in (one, two))
        assert a and max_diff(a, b) < 1e-6, f"step {step}"
        assert not any(is_generation_param(k) for k in a)  # the generation side is frozen
    assert max_diff(weights(one / "last"), weights(two / "last")) < 1e-6
    assert max_diff(weights(one / "best"), weights(two / "best")) < 1e-6


@pytest.mark.slow
def test_fsdp_shards_the_hugging_face_backend_as_one_process(tmp_path):
    """The HF backend (tiny Qwen2.5-VL, vision tower frozen) under FSDP2 on 2 processes, launched with
    the shipped configs/accelerate/fsdp.yaml, reproduces one process: a unit per decoder layer and per
    ViT block, the root (embeddings, merger, output head) gathered around the scoring by
    `in_forward`; gradients, losses, gradient norms, and after 3 steps weights, EMA teacher and the
    validation-best model (measured: docs/scale.md)."""
    model = tmp_path / "model"
    HFBackend.tiny("qwen2_5_vl").save(model)
    one, two = one_process(model, tmp_path / "one"), tmp_path / "two"
    args = dist_overrides(model, two, **{"optim.grad_accum": 2})
    proc = launch(2, args, config="fsdp.yaml", **{DUMP_ENV: str(two / "grads")})
    assert "train: 2 processes, engine fsdp" in proc.stdout
    for step in range(1, DIST_STEPS + 1):
        a, b = (load_file(str(d / "grads" / f"grads-{step}.safetensors")) for d in (one, two))
        assert a and max_diff(a, b) < 1e-6, f"step {step}"
        assert not any(".visual." in f".{k}" for k in a)  # the vision tower is frozen
    for a, b in zip(step_rows(one), step_rows(two), strict=True):
        assert b["tokens"] == a["tokens"] == sum(b["tokens/per_rank"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7)
    assert max_diff(weights(one / "last"), weights(two / "last")) < 1e-6
    assert max_diff(weights(one / "best"), weights(two / "best")) < 1e-6
    # last/ holds each rank's shards; exported, it is a Hugging Face folder again (save_pretrained layout)
    assert sharded_checkpoint.is_sharded(two / "last")
    exported = sharded_checkpoint.export(two / "last", tmp_path / "exported")
    assert (exported / "config.json").is_file() and type(open_backend(exported)).__name__ == "HFBackend"


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_unsharded_and_back(tiny_model, single, tmp_path):
    """Step 1 under FSDP on 2 processes, step 2 in one plain process, step 3 under FSDP again (from
    configs/accelerate/fsdp.yaml): the same weights as one uninterrupted process (checkpoints hold
    whole tensors either way)."""
    out = tmp_path / "mixed"
    launch(2, dist_overrides(tiny_model, out, shard_weights="true", stop_at_step=1))
    run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, out, resume=out / "last", stop_at_step=2)))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 2
    # the last part through the shipped FSDP config: on a CPU accelerate resolves it to MULTI_CPU, and
    # the run still shards, from the launcher's environment
    proc = launch(2, dist_overrides(tiny_model, out, resume=out / "last"), config="fsdp.yaml")
    assert "train: 2 processes, engine fsdp" in proc.stdout
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))
