"""`visual-opsd demo`: the paper's study in miniature, end to end on a CPU.

    data -> pretraining (the BAGEL analogue: describe a map with a drawn path)
         -> SFT teacher (ThinkMorph analogue: interleaved + text-only modes) | text-only SFT baseline
         -> Visual-OPSD (real VTs) | noise-VT control
         -> diagnostics (VT interventions, attention, KL pre/post and closure)
         -> evaluation of every system on held-out test mazes -> report (main table, premise, targets)

After the pretraining, the stages run on both cores as processes of one thread each, every stage
as soon as the ones it needs are done (`_run_graph`; docs/miniature.md).

Each stage writes its folder under --out and a `DONE.json` marker last; a second run (or a run
after a crash) skips finished stages, and a training stage that died resumes from its `last/`.
The settings of each stage are the shipped configs (configs/*_demo.yaml) and the dataclass
defaults; `--quick` shrinks everything to a smoke test of the whole pipeline (under a minute) and
`--preset full` grows it (larger model, sizes 3..8, longer training; about 90 minutes on 2 cores).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from visual_opsd.config import load_config, to_dict

# A stage's work: a module-level function and its arguments (picklable, for spawned processes).
Job = tuple[Callable[..., None], tuple]

# The full demo runs the shipped configs as they are; `--quick` overrides them down to a smoke test.
DEMO_CONFIGS = {
    "pretrain": "sft_pretrain_demo.yaml",
    "sft_teacher": "sft_demo.yaml",
    "sft_text": "sft_text_demo.yaml",
    "opsd": "train_demo.yaml",
    "opsd_noise": "train_demo.yaml",
    "diagnose": "diagnose_demo.yaml",
}
# configs/ of a source checkout (the README's set-up installs the package from one, editable)
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "default": {
        "test": {"n": 200, "sizes": [3, 6], "seed": 2, "path": "random"},
        "pretrain": {},
        "sft_teacher": {},
        "sft_text": {},
        "opsd": {},
        "diagnose": {},
        "eval": {"warmup": 2, "max_new_tokens": 160},
    },
    "quick": {
        "test": {"n": 8, "sizes": [3, 4], "seed": 2, "path": "random"},
        # the model's size is the pretraining's; the SFT stages start from it
        "pretrain": {"optim.steps": 20, "data.n_train": 200, "data.n_val": 4, "data.sizes": [3, 4],
                     "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "eval.every": 20,
                     "eval.max_new_tokens": 48},
        "sft_teacher": {"optim.steps": 30, "data.n_train": 200, "data.n_val": 4, "data.sizes": [3, 4],
                        "eval.every": 30, "eval.vt_steps": 5, "eval.max_new_tokens": 48},
        "sft_text": {"optim.steps": 30, "data.n_train": 200, "data.n_val": 4,
                     "data.sizes": [3, 4], "eval.every": 30, "eval.max_new_tokens": 48},
        "opsd": {"optim.steps": 3, "optim.prompts_per_step": 4, "data.n_train": 50, "data.n_val": 4,
                 "data.sizes": [3, 4], "eval.every": 3, "save_every": 2, "rollout.max_new_tokens": 48,
                 "eval.max_new_tokens": 48},
        "diagnose": {"data.n": 4, "attention.n": 2, "interventions.vt_steps": 5, "attention.vt_steps": 5,
                     "kl.sanity_samples": 2, "interventions.max_new_tokens": 48, "attention.max_new_tokens": 48,
                     "kl.max_new_tokens": 48},
        "eval": {"warmup": 1, "max_new_tokens": 48},
    },
}
# `--preset full`: the same pipeline at the larger CPU scale (configs/sft_cpu_large.yaml's model) on
# VSP's sizes 3..8, sized to about 80 minutes on 2 cores (per-step costs in docs/miniature.md); the
# default demo's settings otherwise.
_FULL_SFT = {"data.n_train": 20000, "data.n_val": 64, "data.sizes": [3, 8], "optim.steps": 350,
             "optim.batch_size": 32, "optim.lr": 2.0e-3, "eval.every": 175, "eval.max_new_tokens": 320}
PRESETS["full"] = {
    "test": {"n": 300, "sizes": [3, 8], "seed": 2, "path": "random"},
    "pretrain": {"data.n_train": 20000, "data.n_val": 64, "data.sizes": [3, 8], "model.d_model": 192,
                 "model.n_layers": 6, "model.n_heads": 6, "optim.steps": 1000, "optim.batch_size": 32,
                 "optim.lr": 2.0e-3, "optim.warmup_steps": 50, "eval.every": 1000, "eval.max_new_tokens": 320},
    "sft_teacher": _FULL_SFT,
    "sft_text": _FULL_SFT,
    "opsd": {"data.sizes": [3, 8], "optim.steps": 100, "eval.every": 50, "rollout.max_new_tokens": 320,
             "eval.max_new_tokens": 320},
    "diagnose": {"data.sizes": [3, 8], "data.n": 96, "interventions.max_new_tokens": 320,
                 "attention.max_new_tokens": 320, "kl.max_new_tokens": 320},
    "eval": {"warmup": 2, "max_new_tokens": 320},
}
# (system name, model stage, evaluation mode)
SYSTEMS = [
    ("teacher_interleaved", "sft_teacher", "interleaved"),
    ("teacher_text_only", "sft_teacher", "text"),
    ("text_sft", "sft_text", "text"),
    ("opsd", "opsd", "text"),
    ("opsd_noise", "opsd_noise", "text"),
    # not a system one can deploy (it is shown the data's VTs): the premise's third row, the ceiling
    # of the distillation signal
    ("teacher_privileged", "sft_teacher", "teacher_context"),
]
# evaluated while the Visual-OPSD runs go on, and after them
BASE_SYSTEMS = tuple(name for name, stage, _ in SYSTEMS if stage in ("sft_teacher", "sft_text"))
TRAINED_SYSTEMS = tuple(name for name, stage, _ in SYSTEMS if stage.startswith("opsd"))
# report.json's premise: the base model (the SFT teacher) before distillation, by mode
PRIVILEGED = "teacher_privileged"
PREMISE = {"interleaved": "teacher_interleaved", "text_only": "teacher_text_only", "teacher_context": PRIVILEGED}


def stage_configs(preset: str, out: Path, config_dir: Path = DEFAULT_CONFIG_DIR, seed: int = 0) -> dict[str, object]:
    """The resolved config of every stage of `preset` (shipped YAML + preset overrides), writing under `out`;
    `seed` (when not 0) replaces every stage's seed (initialisation, batches, sampling; not the data's)."""
    from visual_opsd.diagnostics.run import DiagnoseConfig
    from visual_opsd.sft import SFTConfig
    from visual_opsd.train import TrainConfig

    missing = [name for name in set(DEMO_CONFIGS.values()) if not (config_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo configs {sorted(missing)} not found in {config_dir}; run from a source checkout "
            "(make demo) or pass --configs DIR"
        )
    p = PRESETS[preset]
    teacher_final = str(out / "sft_teacher" / "final")
    pretrained = {"model.init_from": str(out / "pretrain" / "final")}  # both SFT stages start from it

    def build(stage: str, cls, preset_key: str, **extra) -> object:
        items = {**p[preset_key], "out_dir": str(out / stage), **({"seed": seed} if seed else {}), **extra}
        return load_config(cls, config_dir / DEMO_CONFIGS[stage], [f"{k}={json.dumps(v)}" for k, v in items.items()])

    return {
        "pretrain": build("pretrain", SFTConfig, "pretrain"),
        "sft_teacher": build("sft_teacher", SFTConfig, "sft_teacher", **pretrained),
        "sft_text": build("sft_text", SFTConfig, "sft_text", **pretrained),
        "opsd": build("opsd", TrainConfig, "opsd", init_from=teacher_final),
        "opsd_noise": build("opsd_noise", TrainConfig, "opsd", init_from=teacher_final, **{"teacher.vt_mode": "noise"}),
        # `post` (the Visual-OPSD checkpoints) is filled in when the stage runs, once they exist
        "diagnose": build("diagnose", DiagnoseConfig, "diagnose", what="all", model=teacher_final,
                          **{"data.path": str(out / "data" / "test")}),
    }


def run_demo(
    out: str | Path = "demo_out",
    quick: bool = False,
    progress: bool = True,
    config_dir: str | Path | None = None,
    preset: str = "default",
    seed: int = 0,
) -> Path:
    """Run (or finish) the whole study under `out` with `preset` (default, quick, full; `quick=True`
    is preset quick); returns the report's path."""
    preset = "quick" if quick else preset
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = stage_configs(preset, out, Path(config_dir) if config_dir else DEFAULT_CONFIG_DIR, seed)
    for cfg in configs.values():
        cfg.progress = progress
    timing: dict[str, float] = _load_json(out / "timing.json")

    def train_stage(name: str) -> Job:
        return (_train_job, (name, configs[name]))

    def done(name: str) -> bool:
        return (out / name / "DONE.json").is_file()

    def record(name: str, seconds: float) -> None:
        timing[name] = seconds
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "DONE.json").write_text(json.dumps({"seconds": seconds}))
        (out / "timing.json").write_text(json.dumps(timing, indent=2))
        print(f"  {name}: {seconds:.0f} s (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)

    t_start = time.perf_counter()
    # The test data, then the pretraining alone (two threads: nothing else can run yet).
    for name, (fn, args) in [
        ("data", (_make_test_data, (out, PRESETS[preset]["test"], configs["pretrain"].model.patch_size))),
        ("pretrain", train_stage("pretrain")),
    ]:
        if done(name):
            print(f"{name}: done earlier ({timing.get(name, 0):.0f} s), skipped")
            continue
        print(f"{name} ... (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        fn(*args)
        record(name, time.perf_counter() - t0)
    # Then the rest on both cores: each stage as a process of one thread (the miniature's matrices are
    # too small to keep two threads of one process busy), started as soon as the stages it needs are
    # done and a core is free, in this order. The base systems are evaluated while the Visual-OPSD
    # runs finish (progress bars off: two bars would garble each other).
    evaluation = PRESETS[preset]["eval"]
    graph: list[tuple[str, Job, tuple[str, ...]]] = [
        ("sft_teacher", train_stage("sft_teacher"), ()),
        ("sft_text", train_stage("sft_text"), ()),
        ("opsd", train_stage("opsd"), ("sft_teacher",)),
        ("opsd_noise", train_stage("opsd_noise"), ("sft_teacher",)),
        ("eval_base", (_evaluate_systems, (out, evaluation, BASE_SYSTEMS)), ("sft_teacher", "sft_text")),
        ("diagnose", (_diagnose, (out, configs["diagnose"])), ("opsd", "opsd_noise")),
        ("eval", (_evaluate_systems, (out, evaluation, TRAINED_SYSTEMS)), ("opsd", "opsd_noise", "eval_base")),
    ]
    for name, _, _ in graph:
        if done(name):
            print(f"{name}: done earlier ({timing.get(name, 0):.0f} s), skipped")
    _run_graph([(n, job, deps) for n, job, deps in graph if not done(n)], done, record, t_start)
    report_path = _write_report(out, configs, timing)
    print()
    print((out / "report.md").read_text().split("## VT interventions")[0].split("## KL")[0].split("## Stage")[0])
    print(f"report: {report_path} (and report.json, pareto.png, training_curves.png)")
    return report_path


def _train_job(name: str, cfg) -> None:
    """Run (or finish) one training stage. Visual-OPSD stages that died resume from their `last/`."""
    from visual_opsd.sft import run_sft
    from visual_opsd.train import run_train

    last = Path(cfg.out_dir) / "last" / "trainer_state.json"
    if name.startswith("opsd") and last.is_file():
        cfg.resume = str(last.parent)  # a previous attempt died mid-training: continue it
    (run_train if name.startswith("opsd") else run_sft)(cfg)


def _job_entry(name: str, job: Job, results) -> None:
    import torch

    torch.set_num_threads(1)  # so the evaluation's latencies are one thread's
    t0 = time.perf_counter()
    fn, args = job
    fn(*args)
    results[name] = time.perf_counter() - t0


def _run_graph(stages: list[tuple[str, Job, tuple[str, ...]]], done: Callable[[str], bool],
               record: Callable[[str, float], None], t_start: float, slots: int = 2) -> None:
    """Run `stages` as spawned processes (no forked torch state), at most `slots` at a time, each one
    once the stages it needs are `done`, in list order; `record` each as it ends. Fails (after the
    running ones end) when any of them fails: a rerun resumes from the stages that finished."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        waiting, running, failed = list(stages), {}, []
        while waiting or running:
            for stage in [st for st in waiting if not failed and all(done(d) for d in st[2])]:
                if len(running) >= slots:
                    break
                name, (fn, args), _ = stage
                for arg in args:  # training and diagnostics configs: one thread, no progress bar
                    if hasattr(arg, "threads"):
                        arg.threads, arg.progress = 1, False
                proc = ctx.Process(target=_job_entry, args=(name, (fn, args), results), name=name)
                proc.start()
                print(f"  {name} ... (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
                running[name] = proc
                waiting.remove(stage)
            if not running:
                break  # nothing can start: a stage it needs failed
            wait([p.sentinel for p in running.values()])
            for name, proc in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[name]
                if proc.exitcode == 0:
                    record(name, results[name])
                else:
                    failed.append(f"{name} (exit code {proc.exitcode})")
        if failed or waiting:
            raise RuntimeError(f"demo stage(s) failed: {', '.join(failed) or 'none'}; not run: "
                               f"{', '.join(n for n, _, _ in waiting) or 'none'}; rerun the demo to resume")


def _make_test_data(out: Path, test: dict, patch_size: int) -> None:
    from visual_opsd.data import write_dataset
    from visual_opsd.tasks import get_task

    # the traces (the KL diagnostic's identical tokens) follow the paths the models were trained on
    samples = get_task("maze").generate(test["n"], seed=test["seed"], split="test", sizes=tuple(test["sizes"]),
                                        cell_px=patch_size, path=test.get("path", "first"))
    write_dataset(samples, out / "data" / "test", overwrite=True)


def _evaluate_systems(out: Path, options: dict, names: tuple[str, ...]) -> None:
    """The systems `names` (of SYSTEMS) on the held-out test mazes, with the shared `evaluate_systems`
    (the code behind `visual-opsd eval`). The base systems go to eval_base/ (results.json,
    records/); the trained ones to eval/, which then holds results.json, results.md and pareto.png
    of every system."""
    from visual_opsd.data import load_dataset
    from visual_opsd.evaluate import Benchmark, System, evaluate_systems, write_results
    from visual_opsd.tasks import get_task

    # the test mazes were rendered once, at the teacher's patch size, for every system
    test = [Benchmark("maze", get_task("maze"), list(load_dataset(out / "data" / "test")))]
    systems = [System(name, str(_selected_model(out, stage)), mode) for name, stage, mode in SYSTEMS if name in names]
    folder = out / ("eval" if names == TRAINED_SYSTEMS else "eval_base")
    results = evaluate_systems(systems, lambda backend: test, folder, warmup=options["warmup"],
                               max_new_tokens=options["max_new_tokens"], progress=False)
    if names == TRAINED_SYSTEMS:
        results = {**_load_json(out / "eval_base" / "results.json"), **results}
        write_results({name: results[name] for name, _, _ in SYSTEMS if name in results}, folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results, indent=2))


def _diagnose(out: Path, cfg) -> None:
    """VT interventions, attention and the KL diagnostic of the SFT teacher on the test mazes, with the
    gap closure of both Visual-OPSD checkpoints (teacher side: the frozen base with VTs)."""
    from visual_opsd.diagnostics.run import diagnose

    cfg.post = [f"{name}={_selected_model(out, name)}" for name in ("opsd", "opsd_noise")]
    results = diagnose(cfg)
    (out / "diagnose" / "results.json").write_text(json.dumps(results, indent=2))


def _selected_model(out: Path, stage: str) -> Path:
    """SFT stages: the final model; Visual-OPSD stages: the validation-best checkpoint."""
    if stage.startswith("opsd"):
        best = out / stage / "best" / "model"
        return best if best.is_dir() else out / stage / "last" / "model"
    return out / stage / "final"


def _write_report(out: Path, configs: dict, timing: dict[str, float]) -> Path:
    from visual_opsd.report import write_report

    results = _load_json(out / "eval" / "results.json")
    systems = {
        name: {"accuracy": r["accuracy"], "latency_s": r["latency_s"], "tokens": r["tokens"],
               # an eval stage cached by an older version stored the maze numbers flat
               "tasks": r.get("tasks") or {"maze": {k: r[k] for k in ("accuracy", "ci95", "n", "latency_s", "tokens")}}}
        for name, r in results.items() if name != PRIVILEGED  # premise only: it is shown the answer's VTs
    }
    from visual_opsd.diagnostics.run import report_fields

    diagnostics = report_fields(_load_json(out / "diagnose" / "results.json"))
    premise = premise_of(results, diagnostics["kl"])
    report = {"systems": systems, "premise": premise, "targets": targets_of(systems, premise, diagnostics["kl"]),
              "decomposition": decomposition_of(systems, premise), "kl": diagnostics["kl"],
              "interventions": diagnostics["interventions"], "timing_s": timing,
              "configs": {k: to_dict(v) for k, v in configs.items()}}
    runs = {name: out / name / "metrics.jsonl" for name in configs if name not in ("diagnose", "pretrain")}
    notes = ["Accuracies: strict VSP scorer on held-out test mazes; 95% Wilson intervals; greedy decoding.",
             "Latency: batch size 1 after warm-up, whole pipeline per sample, one CPU thread.",
             "Visual-OPSD checkpoints are selected on the validation split, never on test."]
    return write_report(report, out, runs, notes)


def premise_of(results: dict, kl: dict) -> dict:
    """The base model's maze accuracy in its three modes (report.json's `premise`), and K_pre on the
    data's traces (identical tokens under both contexts) when the diagnostics measured it."""
    premise: dict = {}
    for mode, name in PREMISE.items():
        r = results.get(name, {}).get("tasks", {}).get("maze")
        if r is not None:
            premise[mode] = {k: r[k] for k in ("accuracy", "ci95", "n", "by_size") if k in r}
    closure = kl.get("closure", {})
    if closure.get("completions") == "data":
        premise["k_pre"] = closure["k_pre"]
    return premise


def targets_of(systems: dict, premise: dict, kl: dict) -> list[dict]:
    """The study's targets (the paper's regime and its results, scaled to the miniature), measured."""
    acc = {name: s["tasks"]["maze"]["accuracy"] for name, s in systems.items() if "maze" in s["tasks"]}
    out: list[dict] = []

    def add(name: str, value: float | None, target: str, met: bool) -> None:
        out.append({"name": name, "value": value, "target": target, "met": bool(met)})

    if {"interleaved", "text_only", "teacher_context"} <= premise.keys():
        inter, text, ctx = (premise[m]["accuracy"] for m in ("interleaved", "text_only", "teacher_context"))
        ratio = text / inter if inter > 0 else 0.0
        add("premise: text-only / interleaved (x100)", 100 * ratio, ">= 80", ratio >= 0.8)
        add("premise: privileged context - interleaved (pp)", ctx - inter, ">= +10", ctx - inter >= 10)
    if {"opsd", "text_sft", "teacher_interleaved"} <= acc.keys():
        add("Visual-OPSD - text-only SFT (pp)", acc["opsd"] - acc["text_sft"], ">= +10",
            acc["opsd"] - acc["text_sft"] >= 10)
        add("Visual-OPSD - interleaved teacher (pp)", acc["opsd"] - acc["teacher_interleaved"], ">= 0",
            acc["opsd"] >= acc["teacher_interleaved"])
    if {"opsd", "opsd_noise", "teacher_text_only"} <= acc.keys():
        start = acc["teacher_text_only"]  # both controls start from the base model's text-only mode
        real, noise = acc["opsd"] - start, acc["opsd_noise"] - start
        # no real-VT gain: the ratio has no meaning and the target is missed
        add("noise-VT gain / real-VT gain over the start (x100)", 100 * noise / real if real > 0 else None,
            "<= 25", real > 0 and noise <= real / 4)
    closure = kl.get("closure", {}).get("per_model", {})
    if "opsd" in closure:
        add("KL closure on identical tokens, Visual-OPSD (%)", 100 * closure["opsd"], ">= 40", closure["opsd"] >= 0.4)
    if "opsd_noise" in closure:
        add("KL closure on identical tokens, noise control (%)", 100 * closure["opsd_noise"], "<= 10",
            closure["opsd_noise"] <= 0.1)
    return out


def decomposition_of(systems: dict, premise: dict) -> dict:
    """Visual-OPSD - text-only SFT split into what the base model brings and what distillation adds
    (report.json's `decomposition`, pp): `start_vs_text_sft` (the base model's text-only mode, the
    student's start, against the baseline), `opsd_vs_start` and `noise_vs_start` (the two runs' own
    gains), and `headroom_vs_text_sft` (the privileged context, what a student that matched its
    teacher would score, against the baseline): the headline can exceed the headroom only if the
    student outdoes its teacher."""
    acc = {name: s["tasks"]["maze"]["accuracy"] for name, s in systems.items() if "maze" in s["tasks"]}
    if not {"opsd", "text_sft", "teacher_text_only"} <= acc.keys():
        return {}
    start = acc["teacher_text_only"]
    out = {"start_vs_text_sft": start - acc["text_sft"], "opsd_vs_start": acc["opsd"] - start}
    if "opsd_noise" in acc:
        out["noise_vs_start"] = acc["opsd_noise"] - start
    if "teacher_context" in premise:
        out["headroom_vs_text_sft"] = premise["teacher_context"]["accuracy"] - acc["text_sft"]
    return out


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
