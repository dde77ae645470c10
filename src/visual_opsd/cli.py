"""The command line: `visual-opsd <command>`. Each command is a thin shell around a library function.

Config-driven commands (`sft`, `train`, ...) take `--config FILE.yaml` plus `key.sub=value`
overrides; their `--help` lists every key with its default and meaning. Heavy modules are imported
inside the handlers so that `visual-opsd --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from visual_opsd import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # key=value items may follow the flags (`data make maze --out D sizes=[3,6]`); argparse leaves
    # those it met after a flag unparsed, so they are appended to the command's key=value list here
    target = next((name for name in ("options", "overrides") if hasattr(args, name)), None)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and target is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if target:
        setattr(args, target, getattr(args, target) + extra)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    from visual_opsd.errors import ConfigError, DataError, RunError

    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"visual-opsd: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # names the file, row and field
        print(f"visual-opsd: data error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # checkpoint unusable, budget exceeded, training aborted: the message says why
        print(f"visual-opsd: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("visual-opsd: interrupted", file=sys.stderr)
        return 130


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `argv` tells which config command's (torch-importing) help to load."""
    chosen = next((a for a in argv or [] if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="visual-opsd",
        description="Distil a unified model's visual thoughts into fast text-only reasoning (Visual-OPSD).",
    )
    parser.add_argument("--version", action="version", version=f"visual-opsd {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="<command>")

    # data -------------------------------------------------------------------------------------
    data = commands.add_parser("data", help="make and validate datasets")
    data_cmds = data.add_subparsers(title="data commands", metavar="<data command>")
    make = data_cmds.add_parser(
        "make",
        help="generate a task dataset in the native format (data.jsonl + images)",
        description="Generate a dataset. Extra task options go as key=value, e.g. sizes=[3,6] cell_px=8.",
    )
    make.add_argument("task", help="task name (maze, jigsaw)")
    make.add_argument("--out", required=True, help="output folder (written atomically)")
    make.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    make.add_argument("--split", choices=["train", "val", "test"], default="train", help="split (default train)")
    make.add_argument("options", nargs="*", metavar="key=value", help="task options, e.g. sizes=[3,6]")
    make.set_defaults(handler=_data_make)
    validate = data_cmds.add_parser(
        "validate",
        help="check every row of a dataset; one line per bad row, non-zero exit if any",
        description="Accepts a native dataset (folder or data.jsonl), a ThinkMorph parquet, a VSP folder or a "
        "VLMEvalKit benchmark .tsv.",
    )
    validate.add_argument("path", help="dataset folder, data.jsonl, .parquet file, VSP folder or VLMEvalKit .tsv")
    validate.add_argument("--max-vts", type=int, default=8, help="most VT images allowed per row (default 8)")
    validate.set_defaults(handler=_data_validate)

    # score ------------------------------------------------------------------------------------
    score = commands.add_parser("score", help="score any model's outputs on a benchmark")
    score_cmds = score.add_subparsers(title="benchmarks", metavar="<benchmark>")
    vsp = score_cmds.add_parser(
        "vsp",
        help="score predictions on the VSP maze task",
        description=(
            "Score predictions against VSP maps in the upstream layout level{L}/{img,table,pure_text}/{i}.*. "
            'ANSWERS is JSONL of {"level": L, "index": i, "prediction": "..."}; per-item results are '
            "written next to it as <stem>.scored.jsonl."
        ),
    )
    vsp.add_argument("--maps", required=True, help="VSP folder (levelL/table/i.txt, levelL/img/i.png)")
    vsp.add_argument("--answers", required=True, help="JSONL file of predictions")
    vsp.add_argument(
        "--rule",
        choices=["strict", "vsp"],
        default="strict",
        help="strict: last valid \\boxed{} must end on the goal (ThinkMorph's numbers); "
        "vsp: the original 'Action plan:' rule with gym semantics (default strict)",
    )
    vsp.set_defaults(handler=_score_vsp)

    # demo -------------------------------------------------------------------------------------
    demo = commands.add_parser(
        "demo",
        help="the whole miniature study on a CPU: data, SFT teacher, baseline, Visual-OPSD, controls, report",
        description=(
            "Runs the paper's study in miniature and writes report.md, report.json and plots under --out. "
            "Finished stages are cached: running it again resumes where it stopped."
        ),
    )
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run of the whole pipeline (under a minute on 2 cores)")
    demo.add_argument(
        "--preset",
        choices=["default", "quick", "full"],
        default="default",
        help="default: <= 15 minutes on 2 cores; quick: same as --quick; full: larger model, mazes 3..8, "
        "longer training (about 90 minutes on 2 cores)",
    )
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of every stage's initialisation, batches and sampling (the data stay the same); "
                           "docs/miniature.md gives the spread over seeds 0, 1, 2")
    demo.add_argument("--configs", metavar="DIR", help="folder of the *_demo.yaml configs (default: the checkout's)")
    demo.set_defaults(handler=_demo)

    # export -----------------------------------------------------------------------------------
    export = commands.add_parser(
        "export",
        help="turn a training checkpoint (sharded or whole) into a model folder that eval, diagnose and train open",
        description=(
            "Writes the student of CHECKPOINT (e.g. runs/opsd/last) in its model family's folder layout (Hugging "
            "Face save_pretrained, BAGEL's released layout, mini). A sharded checkpoint (FSDP2 runs: "
            "torch.distributed.checkpoint shards) is loaded into the model folder its run started from; a whole "
            "one's model/ is copied. One process, no launcher."
        ),
    )
    export.add_argument("checkpoint", help="a training checkpoint folder (last/); falls back to last.prev/ if corrupt")
    export.add_argument("--out", required=True, help="the model folder to write (must not exist or be empty)")
    export.add_argument("--model-from", metavar="DIR",
                        help="the model folder the run started from (default: the one the checkpoint records)")
    export.set_defaults(handler=_export)

    # config-driven commands -------------------------------------------------------------------
    for name, (help_text, loader) in CONFIG_COMMANDS.items():
        if name == "diagnose":  # a config command with its own positional and flags
            _add_diagnose_command(commands, help_text, loader, load=chosen == name)
            continue
        if name == "eval":  # likewise: --system, --out, --vsp, ... flags
            _add_eval_command(commands, help_text, loader, load=chosen == name)
            continue
        _add_config_command(commands, name, help_text, loader, load=chosen == name)
    return parser


def _add_config_command(commands, name: str, help_text: str, loader: Callable[[], tuple], load: bool) -> None:
    """A command that takes --config FILE plus key=value overrides; --help lists every key.

    The config class is imported only when this command was chosen (`load`), keeping start-up fast.
    """
    cmd = commands.add_parser(
        name,
        help=help_text,
        description=f"{help_text}. Settings come from --config FILE.yaml, then key.sub=value overrides.",
        epilog=("config keys (default, meaning):\n" + _format_config_help(loader()[0])) if load else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--config", help="YAML config file (see configs/)")
    cmd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cmd.add_argument("--resume", metavar="DIR", help="resume from a checkpoint folder (sets resume=DIR)")
    cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cmd.set_defaults(handler=lambda args: _run_config_command(args, *loader()))


def _format_config_help(cls) -> str:
    from visual_opsd.config import config_help

    lines = []
    for key, default, help_text in config_help(cls):
        lines.append(f"  {key} = {default}\n      {help_text}" if help_text else f"  {key} = {default}")
    return "\n".join(lines)


def _run_config_command(args, cls, run) -> int:
    import yaml

    from visual_opsd.config import load_config, to_dict

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    cfg = load_config(cls, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    result = run(cfg)
    return result if isinstance(result, int) else 0


def _config_train():
    from visual_opsd.train import TrainConfig, run_train

    return TrainConfig, run_train


def _config_sft():
    from visual_opsd.sft import SFTConfig, run_sft

    return SFTConfig, run_sft


def _config_diagnose():
    from visual_opsd.diagnostics.run import DiagnoseConfig, run_diagnose

    return DiagnoseConfig, run_diagnose


def _config_eval():
    from visual_opsd.evaluate import EvaluateConfig, run_eval

    return EvaluateConfig, run_eval


# command -> (help, loader returning (config class, run function)). A YAML file under configs/
# named `<command>_*.yaml` holds a config for that command (the test suite validates them all).
CONFIG_COMMANDS: dict[str, tuple[str, Callable[[], tuple]]] = {
    "sft": ("supervised fine-tuning (interleaved teacher or text-only baseline)", _config_sft),
    "train": ("Visual-OPSD: on-policy self-distillation from the privileged-VT teacher", _config_train),
    "diagnose": ("diagnostics: VT interventions, attention fractions, KL diagnostic and gap closure",
                 _config_diagnose),
    "eval": ("evaluate systems on tasks and VSP maps: accuracy with Wilson intervals (batched, per size), "
             "latency at batch size 1, tokens",
             _config_eval),
}


def _add_diagnose_command(commands, help_text: str, loader: Callable[[], tuple], load: bool) -> None:
    """`diagnose {interventions,attention,kl,all} --model DIR [--post CKPT]... [--config FILE] [key=value]`.

    The positional and the flags become config overrides (what=, model=, post=), so a YAML file may
    set them too; the positional is checked by the config (a typo gets a "did you mean" hint)."""
    cmd = commands.add_parser(
        "diagnose",
        help=help_text,
        description=(
            f"{help_text}. Writes <what>.json, <what>.md and <what>.png under out_dir (kl also kl_tokens.html). "
            "Settings come from --config FILE.yaml, then key.sub=value overrides. Exit status 1: KL sanity failed."
        ),
        epilog=("config keys (default, meaning):\n" + _format_config_help(loader()[0])) if load else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("what", nargs="?", metavar="{interventions,attention,kl,all}", help="the diagnostic to run")
    cmd.add_argument("--model", metavar="DIR",
                     help="the unified model to diagnose (e.g. the SFT teacher's final/, or a Hub id org/name)")
    cmd.add_argument("--post", metavar="[NAME=]CKPT", action="append", default=[],
                     help="kl: a trained model for K_post and the gap closure (repeatable)")
    cmd.add_argument("--config", help="YAML config file (see configs/diagnose_demo.yaml)")
    cmd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cmd.set_defaults(handler=_diagnose)


def _diagnose(args) -> int:
    import json

    import yaml

    from visual_opsd.config import load_config, to_dict

    overrides = list(args.overrides)
    if args.what is not None:  # argparse puts a first key=value item here when no diagnostic is named
        overrides.insert(0, args.what if "=" in args.what else f"what={args.what}")
    if args.model is not None:
        overrides.append(f"model={json.dumps(args.model)}")
    if args.post:
        overrides.append(f"post={json.dumps(args.post)}")
    cls, run = _config_diagnose()
    cfg = load_config(cls, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        return run(cfg)
    except FileNotFoundError as e:
        print(f"visual-opsd diagnose: {e}", file=sys.stderr)
        return 2


def _add_eval_command(commands, help_text: str, loader: Callable[[], tuple], load: bool) -> None:
    """`eval --system NAME=MODEL_DIR[:MODE]... [--task T] [--n N --sizes LO HI --seed S | --data DIR] [--vsp DIR]
    [--rule R] --out DIR [--config FILE] [key=value]`: the flags become config overrides (systems=, data.*=, ...)."""
    cmd = commands.add_parser(
        "eval",
        help=help_text,
        description=(
            f"{help_text}. Writes results.json, results.md, pareto.png and records/<system>_<task>.jsonl under "
            "--out. Held-out data is generated from the test split unless --data is given. "
            "Settings come from --config FILE.yaml, then key.sub=value overrides, then the flags."
        ),
        epilog=("config keys (default, meaning):\n" + _format_config_help(loader()[0])) if load else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--system", metavar="NAME=MODEL_DIR[:MODE]", action="append", default=[],
                     help="a model folder (or Hub id org/name[@rev]) and how to ask it; MODE: interleaved, "
                     "given_vt, text (default) or "
                     "teacher_context (repeatable)")
    cmd.add_argument("--task", action="append", default=[], help="task to generate held-out data for (repeatable; "
                     "default maze, or none with --vsp)")
    cmd.add_argument("--n", type=int, help="samples per task (default 100 generated, or all of --data)")
    cmd.add_argument("--sizes", type=int, nargs=2, metavar=("LO", "HI"), help="maze sizes (default 3 6)")
    cmd.add_argument("--seed", type=int, help="seed of the generated data (default 2, the demo's test set)")
    cmd.add_argument("--data", metavar="PATH", action="append", default=[],
                     help="evaluate on this dataset instead of generated data: a VLMEvalKit TSV, ThinkMorph "
                     "parquet, native JSONL or folder, or a Hub dataset id org/name[@rev]; repeatable, one results "
                     "column per file, named by it")
    cmd.add_argument("--vsp", metavar="DIR", help="evaluate on the VSP maps of DIR (level{L}/{img,table}/{i}.*), "
                     "reported per level with both rules (add --task maze for generated mazes as well)")
    cmd.add_argument("--rule", choices=["strict", "vsp"], help="VSP headline rule; both are reported (default strict)")
    cmd.add_argument("--out", metavar="DIR", help="output folder (default runs/eval)")
    cmd.add_argument("--batch-size", type=int, metavar="B",
                     help="rows per decoding batch of the accuracy pass (default 32)")
    cmd.add_argument("--latency-n", type=int, metavar="N",
                     help="samples per task timed at batch size 1, evenly spaced (default 16)")
    cmd.add_argument("--warmup", type=int, metavar="K", help="untimed samples before timing (default 2)")
    cmd.add_argument("--image-skips", type=int, metavar="S", help="text modes: image skips allowed per answer "
                     "(default 0: one text round, an emitted <image_start> ends the answer)")
    cmd.add_argument("--max-new-tokens", type=int, metavar="M", help="token budget of an answer (default 160)")
    cmd.add_argument("--vt-steps", type=int, metavar="V", help="denoising steps per generated VT (default 50)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    cmd.add_argument("--config", help="YAML config file")
    cmd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cmd.set_defaults(handler=_eval)


def _eval(args) -> int:
    import json

    import yaml

    from visual_opsd.config import load_config, to_dict

    flags = {"systems": args.system or None, "data.tasks": args.task or None, "data.n": args.n,
             "data.sizes": args.sizes, "data.seed": args.seed, "data.paths": args.data or None, "vsp": args.vsp,
             "rule": args.rule, "out_dir": args.out, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens,
             "batch_size": args.batch_size, "latency_n": args.latency_n, "image_skips": args.image_skips,
             "vt_steps": args.vt_steps, "progress": False if args.no_progress else None}
    overrides = list(args.overrides) + [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cls, run = _config_eval()
    cfg = load_config(cls, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    run(cfg)
    return 0


def _parse_task_options(items: list[str]) -> dict:
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"visual-opsd: task option {item!r} is not key=value")
        options[key] = yaml.safe_load(value)
    return options


def _demo(args) -> int:
    from visual_opsd.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress, config_dir=args.configs, preset=args.preset,
             seed=args.seed)
    return 0


def _export(args) -> int:
    from visual_opsd.sharded_checkpoint import export

    print(f"export: {export(args.checkpoint, args.out, args.model_from)}")
    return 0


def _data_make(args) -> int:
    from visual_opsd.data import make_command

    return make_command(args.task, args.out, args.n, args.seed, args.split, **_parse_task_options(args.options))


def _data_validate(args) -> int:
    from visual_opsd.data import validate_command

    return validate_command(args.path, args.max_vts)


def _score_vsp(args) -> int:
    from visual_opsd.vsp import score_command

    return score_command(args.maps, args.answers, args.rule)


if __name__ == "__main__":
    sys.exit(main())
