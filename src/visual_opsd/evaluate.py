"""Evaluation: accuracy with 95% Wilson intervals, latency per sample and tokens per answer, and the
`visual-opsd eval` command that runs it for several systems on several tasks.

    visual-opsd eval --system teacher=runs/sft/final:interleaved --system opsd=runs/opsd/best:text --out runs/eval
    visual-opsd eval --system opsd=runs/opsd/best --vsp path/to/vsp/task-main --out runs/eval_vsp

Two passes per system and task:
- accuracy and tokens: greedy predictions of every sample, decoded `batch_size` (32) at a time,
  left-padded, batches grouped by maze size (`sft.batches`). Batched logits differ from batch-1
  ones by float noise only (about 1e-6: sums in another order), so greedy answers agree unless two
  top ids tie that closely (tests/test_eval.py checks equality; 200 of 200 demo-size mazes agreed);
  interleaved VT noise is drawn per batch, so generated VTs depend on the batch's make-up.
- latency: `latency_n` (16) samples, evenly spaced over the benchmark (`latency_items`; the first
  N would be one VSP level), decoded again at batch size 1 after `warmup` untimed samples, timed
  over the whole pipeline of one sample (context building = preprocessing and image encoding,
  decoding, and VT generation where the mode generates VTs), the same way for every system.
Tokens count the generated answer's ids (with the end-of-sequence id).

Modes (how a model is asked, see `sft.predict`):
- `interleaved`: the unified model generates its own VTs (`vt_steps` denoising steps each);
- `given_vt`: interleaved, with the ground-truth VT inserted at each `<image_start>` (oracle);
- `text`: text-only decoding from the student context, one text round as in the reference's
  inferencer: an emitted `<image_start>` ends the answer (`image_skips` > 0 allows skips instead);
- `teacher_context`: text-only decoding after the privileged teacher context (the data's VTs).

A system is `NAME=MODEL_DIR[:MODE]` (mode `text` by default). Outputs under `out_dir`:
`results.json`, the shape of report.json's "systems":
    {NAME: {"model", "mode", "accuracy", "latency_s", "latency_n", "tokens",
            "tasks": {TASK: {"accuracy", "ci95", "n", "latency_s", "latency_n", "tokens",
                             "by_size": {SIZE: {"accuracy", "ci95", "n"}}}},
            "vsp": {...}}}
(`by_size` where the samples carry metadata["size"], as mazes and VSP maps do; `by_category`,
`by_l2-category`, `by_source`, `by_task` where a benchmark file has several; "vsp": per level, both
rules), `records/<system>_<task>.jsonl` (one line per sample; latency_s null where untimed),
`results.md` (the main table, accuracy per size and per category, VSP per level) and `pareto.png`.
A results column ("task" above) is a generated task, the VSP maps, or a dataset file of `--data`,
named by the file: VLMEvalKit TSVs are scored by their benchmark's rule (`vlmeval.headline`, with
"rule" and its side figures in the entry) and written again to `predictions/<system>_<file>.jsonl`
in VLMEvalKit's prediction layout; a file mixing tasks scores each sample by its own task.
"""

from __future__ import annotations

import json
import os
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from visual_opsd.backends import BackendOptions
from visual_opsd.backends.base import Backend
from visual_opsd.config import to_dict
from visual_opsd.distributed import Dist
from visual_opsd.errors import ConfigError
from visual_opsd.sample import Sample
from visual_opsd.sft import EvalMode, batches, predict
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks.base import Task, get_task
from visual_opsd.vlmeval import BREAKDOWN_KEYS, headline, prediction_row

MODES: tuple[str, ...] = typing.get_args(EvalMode)
DEFAULT_MODE = "text"
VSP = "vsp"  # the benchmark's name in results (a task column of its own)
RULE_NAMES = ("strict", "vsp")
# sample metadata copied into each record and broken down per value in results ("by_size": maze size;
# a benchmark file's categories); `index` is copied too (circular sets group their rows by it)
GROUP_KEYS = ("size", "task", *BREAKDOWN_KEYS)
RECORD_KEYS = (*GROUP_KEYS, "index")


@dataclass
class EvalResult:
    """One system on one task."""

    accuracy: float  # percent
    ci95: tuple[float, float]  # percent, Wilson
    n: int
    latency_s: float | None  # mean seconds per sample over the timed records, batch size 1
    latency_n: int  # timed records
    tokens: float  # mean generated ids per answer, all records
    records: list[dict] = field(default_factory=list)  # per sample
    groups: dict[str, dict[str, dict]] = field(default_factory=dict)  # GROUP_KEYS -> value -> accuracy_block

    def summary(self) -> dict:
        """The result without its records, the groups as `by_<key>` (e.g. by_size)."""
        out = asdict(self)
        out.pop("records")
        out.pop("groups")
        out.update({f"by_{key}": blocks for key, blocks in self.groups.items()})
        return out


def summarize(records: list[dict], correct: Callable[[dict], bool] = lambda r: r["correct"]) -> dict[str, Any]:
    """accuracy (percent), ci95 (Wilson, percent), n, tokens (mean over all records) and latency_s (mean
    over the timed records, those whose latency_s is not None; None when there are none) with latency_n."""
    n = len(records)
    if n == 0:
        raise ValueError("summarize: no records")
    k = sum(bool(correct(r)) for r in records)
    lo, hi = wilson_interval(k, n)
    timed = [r["latency_s"] for r in records if r["latency_s"] is not None]
    return {
        "accuracy": 100.0 * k / n,
        "ci95": (100.0 * lo, 100.0 * hi),
        "n": n,
        "latency_s": sum(timed) / len(timed) if timed else None,
        "latency_n": len(timed),
        "tokens": sum(r["tokens"] for r in records) / n,
    }


def accuracy_block(records: list[dict]) -> dict[str, Any]:
    """accuracy (percent), ci95 (Wilson, percent) and n of `records` (a per-size cell)."""
    out = summarize(records)
    return {"accuracy": out["accuracy"], "ci95": out["ci95"], "n": out["n"]}


def group_by(records: list[dict], key: str, block: Callable[[list[dict]], dict] = accuracy_block) -> dict[str, dict]:
    """`block` of the records sharing each value of `key` (e.g. size, a VSP level), keyed by the value as
    a string, in ascending order of the values; records without `key` (or with None) are left out."""
    values = sorted({r[key] for r in records if r.get(key) is not None})
    return {str(v): block([r for r in records if r.get(key) == v]) for v in values}


def latency_items(n: int, k: int) -> list[int]:
    """Indices of the `k` items (of `n`) timed at batch size 1: evenly spaced over the benchmark, the
    first item included (all of them when k >= n). Not the first k: a VSP benchmark is ordered by level,
    and latency grows with the maze size."""
    if k >= n:
        return list(range(n))
    return sorted({i * n // k for i in range(k)})


def evaluate(
    backend: Backend,
    samples: list[Sample],
    task: Task | None,
    mode: str,
    *,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    batch_size: int = 32,
    latency_n: int = 16,
    warmup: int = 2,
    image_skips: int = 0,
    seed: int = 0,
    desc: str | None = None,
    progress: bool = True,
    score: Callable[[Sample, str], dict] | None = None,
    dist: Dist | None = None,
) -> EvalResult:
    """Accuracy and tokens from greedy predictions of every sample, decoded `batch_size` at a time;
    latency from `latency_n` samples (`latency_items`) decoded again at batch size 1 after `warmup`
    untimed ones. Scored with the task's scorer (`task` None: each sample's own task), or with `score`
    (sample, prediction) -> record fields including "correct" (e.g. both VSP rules). `image_skips`: see
    `sft.predict` (text modes). Under `accelerate launch` (`dist`) every process decodes its share
    of the accuracy pass and the answers are gathered; rank 0 alone times the latency pass."""
    if not samples:
        raise ValueError("evaluate: no samples")
    if batch_size < 1 or latency_n < 1 or warmup < 0 or image_skips < 0:
        raise ValueError(f"evaluate: batch_size ({batch_size}) and latency_n ({latency_n}) must be >= 1, "
                         f"warmup ({warmup}) and image_skips ({image_skips}) >= 0")

    def run(chunk: list[Sample]) -> list[str]:
        return predict(backend, chunk, mode, max_new_tokens, vt_steps, len(chunk), seed, image_skips=image_skips)

    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    mine = list(range(rank, len(samples), world))  # strided: every rank gets all sizes
    texts: dict[int, str] = {}
    latency: dict[int, float] = {}
    bar = tqdm(total=len(mine), desc=desc or f"eval {mode}", disable=not progress or rank > 0, dynamic_ncols=True,
               leave=False)
    with torch.no_grad(), bar:
        for idx in batches([samples[i] for i in mine], batch_size):  # the accuracy pass: batched, greedy
            for j, text in zip(idx, run([samples[mine[j]] for j in idx]), strict=True):
                texts[mine[j]] = text
            bar.update(len(idx))
        if dist is not None and world > 1:
            texts = {i: t for part in dist.gather_objects(texts) for i, t in part.items()}
        if rank == 0:
            for s in samples[:warmup]:  # untimed: first-call allocations and kernel selection at batch size 1
                run([s])
            for i in latency_items(len(samples), latency_n):  # the latency pass: the whole pipeline, batch size 1
                t0 = time.perf_counter()
                run([samples[i]])
                latency[i] = time.perf_counter() - t0
        if dist is not None and world > 1:
            latency = dist.gather_objects(latency)[0]  # rank 0's timings: every rank builds the same records
    records = []
    for i, s in enumerate(samples):
        text = texts[i]
        scorer = task or get_task(s.task)
        record = {"id": s.id, "task": s.task or scorer.name, "mode": mode, "prediction": text,
                  "parsed": scorer.extract_answer(text), "answer": s.answer, "latency_s": latency.get(i),
                  "tokens": len(backend.encode_completion(text))}
        record.update({key: s.metadata[key] for key in RECORD_KEYS if s.metadata.get(key) not in (None, "")})
        record.update(score(s, text) if score else {"correct": bool(scorer.is_correct(s, text))})
        records.append(record)
    # maze sizes always; other breakdowns only where they split the benchmark
    groups = {key: blocks for key in GROUP_KEYS
              if (blocks := group_by(records, key)) and (key == "size" or len(blocks) > 1)}
    return EvalResult(**summarize(records), records=records, groups=groups)


def write_records(result: EvalResult, path: str | Path) -> None:
    """Per-sample JSONL (id, prediction, parsed answer, verdict, latency (null if untimed), tokens, size)."""
    _write_jsonl(result.records, path)


def _write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# --------------------------------------------------------------------------------------------
# Systems x tasks


@dataclass(frozen=True)
class System:
    """A model folder asked one way: `name` in tables, `model` a saved folder, `mode` one of MODES."""

    name: str
    model: str
    mode: str = DEFAULT_MODE


def parse_system(spec: str) -> System:
    """`NAME=MODEL_DIR[:MODE]` as a System; ValueError saying what is wrong with `spec`."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest:
        raise ValueError(f"system {spec!r} is not NAME=MODEL_DIR[:MODE] (e.g. opsd=runs/opsd/best:text)")
    model, colon, mode = rest.rpartition(":")
    if not colon or "/" in mode or "\\" in mode:  # no mode given (a ':' inside the path is the path's)
        model, mode = rest, DEFAULT_MODE
    if mode not in MODES:
        import difflib

        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"system {spec!r}: unknown mode {mode!r}{hint} (modes: {', '.join(MODES)})")
    if not model:
        raise ValueError(f"system {spec!r}: no model folder before ':{mode}'")
    name = name.strip()
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"system {spec!r}: name {name!r} may hold only letters, digits, '-', '_' and '.'")
    return System(name, model, mode)


def model_dir(system: System) -> Path:
    """The folder to load for `system`: its model folder, or the `model/` inside a Visual-OPSD checkpoint
    (`best/`, `last/`); a Hub id `org/name[@rev]` is its snapshot in the Hugging Face cache; ConfigError
    naming the system when there is no loadable model."""
    from visual_opsd.backends import backend_kind
    from visual_opsd.hub import resolve_folder

    path = resolve_folder(system.model, "model", key=f"system {system.name!r}")
    if not path.is_dir():
        raise ConfigError(f"system {system.name!r}: no model folder at {path}")
    if not (path / "config.json").is_file() and (path / "model").is_dir():
        path = path / "model"
    try:
        backend_kind(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"system {system.name!r}: {e}") from None
    return path


@dataclass
class Benchmark:
    """Samples to evaluate on, a column of the results: one task, or (`task` None) each sample's own
    (a dataset file mixing tasks); `score` replaces the task's scorer (VSP: both rules)."""

    name: str
    task: Task | None
    samples: list[Sample]
    score: Callable[[Sample, str], dict] | None = None

    @property
    def from_vlmeval(self) -> bool:
        """Rows of a VLMEvalKit TSV: scored by the benchmark's own rule (`vlmeval.headline`)."""
        return all("vlmeval_row" in s.metadata for s in self.samples)


def vsp_scorer(rule: str) -> Callable[[Sample, str], dict]:
    """Record fields of a VSP map's prediction: both rules' verdicts, "correct" by `rule`, level, index."""
    from visual_opsd.tasks.vsp_rules import RULES

    def score(sample: Sample, text: str) -> dict:
        grid = sample.metadata["grid"]
        verdicts = {name: RULES[name](grid, text).to_dict() for name in RULE_NAMES}
        return {"correct": verdicts[rule]["correct"], "rule": rule, "level": sample.metadata.get("level"),
                "index": sample.metadata.get("index"), "verdicts": verdicts}

    return score


def vsp_summary(records: list[dict], rule: str) -> dict[str, Any]:
    """Per level and overall: n, latency, tokens and both rules' accuracy [95% CI]; `rule` is the headline."""

    def block(rows: list[dict]) -> dict[str, Any]:
        out = summarize(rows)
        del out["accuracy"], out["ci95"]  # per rule below
        for name in RULE_NAMES:
            s = summarize(rows, lambda r, name=name: r["verdicts"][name]["correct"])
            out[name] = {"accuracy": s["accuracy"], "ci95": s["ci95"]}
        return out

    return {"rule": rule, **block(records), "levels": group_by(records, "level", block)}


def evaluate_systems(
    systems: list[System],
    benchmarks: Callable[[Backend], list[Benchmark]],
    out: str | Path,
    *,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    batch_size: int = 32,
    latency_n: int = 16,
    warmup: int = 2,
    image_skips: int = 0,
    seed: int = 0,
    progress: bool = True,
    load: Callable[[Path], Backend] | None = None,
    dist: Dist | None = None,
) -> dict[str, dict]:
    """Every system on every benchmark (`benchmarks(backend)` gives them, e.g. mazes rendered at the
    backend's cell size), with `evaluate`'s options; writes `out/records/<system>_<benchmark>.jsonl`
    and returns results.json's content. A system's accuracy is the mean over its tasks (the paper's
    "mean" column); its tokens are the mean over all its samples, its latency over all its timed ones.
    Under `accelerate launch` (`dist`) the processes share the decoding; rank 0 writes and prints."""
    from visual_opsd.backends import open_backend

    load = load or open_backend
    folders = {s.name: model_dir(s) for s in systems}  # every folder checked before the first (slow) run
    out = Path(out)
    results: dict[str, dict] = {}
    backend, loaded = None, None
    for system in systems:
        if folders[system.name] != loaded:  # consecutive systems on one model share the loaded copy
            backend = None  # let the previous model go before loading the next
            backend, loaded = load(folders[system.name]), folders[system.name]
        entry: dict[str, Any] = {"model": str(loaded), "mode": system.mode, "tasks": {}}
        all_records: list[dict] = []
        for bench in benchmarks(backend):
            result = evaluate(backend, bench.samples, bench.task, system.mode, vt_steps=vt_steps,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, latency_n=latency_n,
                              warmup=warmup, image_skips=image_skips, seed=seed, progress=progress,
                              desc=f"eval {system.name} {bench.name}", score=bench.score, dist=dist)
            main = dist is None or dist.is_main
            if main:
                write_records(result, out / "records" / f"{system.name}_{bench.name}.jsonl")
            entry["tasks"][bench.name] = result.summary()
            if bench.from_vlmeval:  # the benchmark's own rule, and the predictions in VLMEvalKit's layout
                rule = headline(bench.name, result.records)
                entry["tasks"][bench.name].update(rule)
                result.accuracy, result.ci95 = rule["accuracy"], rule["ci95"]
                if main:
                    rows = [prediction_row(s, r["prediction"])
                            for s, r in zip(bench.samples, result.records, strict=True)]
                    _write_jsonl(rows, out / "predictions" / f"{system.name}_{bench.name}.jsonl")
            if bench.name == VSP:
                entry[VSP] = vsp_summary(result.records, result.records[0]["rule"])
            all_records += result.records
            if main:
                print(f"  {system.name:20s} {bench.name:8s} acc {result.accuracy:5.1f}% "
                      f"[{result.ci95[0]:.1f}, {result.ci95[1]:.1f}]  n {result.n}  {result.latency_s:.3f} s/sample  "
                      f"{result.tokens:.0f} tokens", flush=True)
        pooled = summarize(all_records)
        entry.update(accuracy=sum(t["accuracy"] for t in entry["tasks"].values()) / len(entry["tasks"]),
                     latency_s=pooled["latency_s"], latency_n=pooled["latency_n"], tokens=pooled["tokens"])
        results[system.name] = entry
    return results


def speedup_reference(results: dict[str, dict]) -> str | None:
    """The system speed-ups are measured against: `teacher_interleaved` if present, else the first
    system asked in an interleaved mode (it generates VTs), else none."""
    from visual_opsd.report import REFERENCE_SYSTEM

    if REFERENCE_SYSTEM in results:
        return REFERENCE_SYSTEM
    return next((n for n, r in results.items() if r.get("mode") in ("interleaved", "given_vt")), None)


def _acc_cell(b: dict) -> str:
    return f"{b['accuracy']:.1f} [{b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}]"


def group_markdown(results: dict[str, dict], key: str = "size") -> list[str]:
    """Lines of the table of accuracy per value of `key` (the tasks' `by_<key>`): a row per system and
    task, a column per value; empty when no task has the breakdown."""
    rows = [(name, task, t[f"by_{key}"]) for name, r in results.items() for task, t in r["tasks"].items()
            if t.get(f"by_{key}")]
    if not rows:
        return []
    values = sorted({v for _, _, blocks in rows for v in blocks}, key=lambda v: (len(v), v))  # "10" after "9"
    md = [f"| system | task | {' | '.join(f'{key} {v}: acc % [95% CI] (n)' for v in values)} |",
          "|---|---|" + "---|" * len(values)]
    for name, task, blocks in rows:
        cells = [f"{_acc_cell(blocks[v])} ({blocks[v]['n']})" if v in blocks else "-" for v in values]
        md.append(f"| {name} | {task} | {' | '.join(cells)} |")
    return md


def breakdown_markdown(results: dict[str, dict]) -> list[str]:
    """A table per benchmark and breakdown (task, l2-category, category, source, split): a row per
    value (BLINK's 14 subtasks are its categories), a column per system; empty when none has one."""
    md = []
    benches = list(dict.fromkeys(b for r in results.values() for b in r["tasks"]))
    for key in ("task", "l2-category", "category", "source", "split"):
        for bench in benches:
            systems = [(name, r["tasks"][bench][f"by_{key}"]) for name, r in results.items()
                       if r["tasks"].get(bench, {}).get(f"by_{key}")]
            if not systems:
                continue
            values = list(dict.fromkeys(v for _, blocks in systems for v in sorted(blocks)))
            md += ["", f"## {bench}: accuracy per {key}", "",
                   f"| {key} | n | {' | '.join(f'{name} acc % [95% CI]' for name, _ in systems)} |",
                   "|---|---|" + "---|" * len(systems)]
            for v in values:
                n = next(blocks[v]["n"] for _, blocks in systems if v in blocks)
                cells = [_acc_cell(blocks[v]) if v in blocks else "-" for _, blocks in systems]
                md.append(f"| {v} | {n} | {' | '.join(cells)} |")
    return md


def results_markdown(results: dict[str, dict], notes: Iterable[str] = ()) -> str:
    """results.md: the main table, accuracy per maze size, the VSP table per level (both rules) when run,
    the systems, notes."""
    from visual_opsd.report import main_table

    ref = speedup_reference(results)
    md = ["# visual-opsd evaluation", "", main_table({"systems": results}, reference=ref), ""]
    md.append(f"Speed-up: latency of `{ref}` / latency of the system." if ref else
              "Speed-up: no interleaved system to compare with.")
    per_size = group_markdown(results, "size")
    if per_size:
        md += ["", "## Accuracy per maze size", "", *per_size]
    md += breakdown_markdown(results)
    md += _rules_markdown(results)
    vsp_rows = [(name, r[VSP]) for name, r in results.items() if VSP in r]
    if vsp_rows:
        md += ["", "## VSP maze maps, per level", "",
               "| system | level | n | strict acc % [95% CI] | vsp-rule acc % [95% CI] | latency s/sample | tokens |",
               "|---|---|---|---|---|---|---|"]
        for name, v in vsp_rows:
            for level, b in [*v["levels"].items(), ("all", v)]:
                cells = [_acc_cell(b[rule]) for rule in RULE_NAMES]
                latency = "-" if b["latency_s"] is None else f"{b['latency_s']:.3f}"  # no timed map at this level
                md.append(f"| {name} | {level} | {b['n']} | {cells[0]} | {cells[1]} | {latency} | "
                          f"{b['tokens']:.0f} |")
        md += ["", "strict: the last valid \\boxed{} must end on the goal (ThinkMorph's numbers); vsp: the original "
               "'Action plan:' rule with gym semantics. The vsp column of the main table uses the headline rule ("
               f"{vsp_rows[0][1]['rule']})."]
    md += ["", "## Systems", "", "| system | model | mode |", "|---|---|---|"]
    md += [f"| {name} | {r['model']} | {r['mode']} |" for name, r in results.items()]
    md += ["", "![accuracy vs latency](pareto.png)", ""] + [f"- {n}" for n in notes]
    return "\n".join(md) + "\n"


def _rules_markdown(results: dict[str, dict]) -> list[str]:
    """The rule each benchmark file is scored by (`vlmeval.headline`), with its side figures."""
    rows = []
    for name, r in results.items():
        for bench, t in r["tasks"].items():
            if "rule" not in t:
                continue
            side = []
            if t.get("per_row"):
                side.append(f"per row {_acc_cell(t['per_row'])} (n {t['per_row']['n']})")
            if t.get("pairs"):
                side.append(f"pairs both right {_acc_cell(t['pairs'])} (n {t['pairs']['n']})")
            side += [f"{s} {_acc_cell(b)} (n {b['n']})" for s, b in (t.get("sources") or {}).items()]
            rows.append(f"| {name} | {bench} | {t['rule']} | {_acc_cell(t)} (n {t['n']}) | {'; '.join(side) or '-'} |")
    if not rows:
        return []
    return ["", "## Benchmark files: scoring rule", "",
            "| system | benchmark | rule | acc % [95% CI] (n) | beside it |", "|---|---|---|---|---|", *rows,
            "", "Predictions in VLMEvalKit's layout: predictions/<system>_<benchmark>.jsonl."]


def write_results(results: dict[str, dict], out: str | Path, notes: Iterable[str] = ()) -> Path:
    """results.json, results.md and pareto.png under `out`; returns results.md's path."""
    from visual_opsd.report import pareto_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    pareto_plot({"systems": results}, out / "pareto.png")
    (out / "results.md").write_text(results_markdown(results, notes))
    return out / "results.md"


# --------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalDataConfig:
    paths: list[str] = field(
        default_factory=list, metadata={"help": "datasets to evaluate on (VLMEvalKit TSV, ThinkMorph parquet, "
                                                "native JSONL / folder), a results column each, named by the "
                                                "file; --data (repeatable)"})
    tasks: list[str] | None = field(
        default=None, metadata={"help": "tasks to generate (or to keep from paths); --task. null: maze, "
                                        "or none when paths or vsp are set"})
    n: int | None = field(
        default=None, metadata={"help": "samples per task (per file for paths); --n. null: 100 generated, "
                                        "or all of each file"})
    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to generate (held out)"})
    seed: int = field(default=2, metadata={"help": "seed of the generated samples (2: the demo's test set); --seed"})
    sizes: tuple[int, int] = field(default=(3, 6), metadata={"help": "maze sizes lo..hi; --sizes"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra task generator options"})

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"data.n must be >= 1 or null, got {self.n}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("data.tasks must name at least one task, or be null")
        if not 2 <= self.sizes[0] <= self.sizes[1]:
            raise ValueError(f"data.sizes must satisfy 2 <= lo <= hi, got {list(self.sizes)}")


@dataclass
class EvaluateConfig:
    systems: list[str] = field(
        default_factory=list, metadata={"help": "systems NAME=MODEL_DIR[:MODE] (modes: " + ", ".join(MODES)
                                                + f"; default {DEFAULT_MODE}); --system"})
    out_dir: str = field(default="runs/eval", metadata={"help": "output folder; --out"})
    vsp: str | None = field(
        default=None, metadata={"help": "VSP folder (level{L}/{img,table}/{i}.*) evaluated per level; --vsp"})
    rule: Literal["strict", "vsp"] = field(
        default="strict", metadata={"help": "VSP headline rule (both are reported); --rule"})
    vsp_per_level: int | None = field(
        default=None, metadata={"help": "VSP maps per level, the first by index (quick checks); null = all"})
    batch_size: int = field(
        default=32, metadata={"help": "rows per decoding batch of the accuracy pass (greedy); --batch-size"})
    latency_n: int = field(
        default=16, metadata={"help": "samples per system x task timed at batch size 1, evenly spaced; --latency-n"})
    warmup: int = field(default=2, metadata={"help": "untimed samples before timing each system x task; --warmup"})
    image_skips: int = field(
        default=0, metadata={"help": "text modes: image skips per answer (0: one text round, as the reference's "
                                     "inferencer); --image-skips"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of an answer; --max-new-tokens"})
    vt_steps: int = field(default=50, metadata={"help": "denoising steps per generated VT (paper: 50); --vt-steps"})
    seed: int = field(default=0, metadata={"help": "seed of VT generation"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show progress bars; --no-progress"})
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    backend: BackendOptions | None = field(
        default=None, metadata={"help": "how to open the systems' folders (kind mini, hf or bagel, and its options)"}
    )

    def __post_init__(self) -> None:
        try:
            parsed = [parse_system(s) for s in self.systems]
        except ValueError as e:  # the message names the spec; no class-name prefix
            raise ConfigError(str(e)) from None
        names = [s.name for s in parsed]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"system names must be unique, repeated: {', '.join(dup)}")
        if self.warmup < 0 or self.max_new_tokens < 1 or self.vt_steps < 1 or self.threads < 1:
            raise ValueError("warmup >= 0; max_new_tokens, vt_steps, threads >= 1")
        if self.batch_size < 1 or self.latency_n < 1 or self.image_skips < 0:
            raise ValueError(f"batch_size ({self.batch_size}) and latency_n ({self.latency_n}) must be >= 1, "
                             f"image_skips ({self.image_skips}) >= 0")
        if self.vsp_per_level is not None and self.vsp_per_level < 1:
            raise ValueError(f"vsp_per_level must be >= 1 or null, got {self.vsp_per_level}")


def eval_benchmarks(cfg: EvaluateConfig) -> Callable[[Backend], list[Benchmark]]:
    """The benchmarks of `cfg` for a backend: a dataset (path), generated tasks and VSP maps. Generated
    mazes and VSP maps are rendered at the backend's cell size, built once per size; every size gives
    the same maps, so all systems see the same problems."""
    from visual_opsd.errors import DataError
    from visual_opsd.tasks import get_task

    d = cfg.data
    tasks = d.tasks if d.tasks is not None else ([] if d.paths or cfg.vsp else ["maze"])
    try:
        for name in tasks:
            get_task(name)
    except KeyError as e:
        raise ConfigError(f"data.tasks: {e.args[0]}") from None
    from_path = _load_path_benchmarks(d, tasks)
    cache: dict[int, list[Benchmark]] = {}

    def build(backend: Backend) -> list[Benchmark]:
        cell = backend.cell_px
        if cell not in cache:
            benches = list(from_path)
            if not d.paths:
                for name in tasks:
                    options = dict(d.options)
                    if name == "maze":
                        options.setdefault("sizes", tuple(d.sizes))
                        options.setdefault("cell_px", cell)  # one patch per maze cell
                    try:
                        samples = get_task(name).generate(d.n or 100, seed=d.seed, split=d.split, **options)
                    except (TypeError, ValueError, RuntimeError) as e:
                        raise ConfigError(f"cannot generate {name} data: {e}") from None
                    benches.append(Benchmark(name, get_task(name), samples))
            if cfg.vsp:
                maps = _load_vsp(cfg.vsp, cell, cfg.vsp_per_level)
                benches.append(Benchmark(VSP, get_task("maze"), maps, vsp_scorer(cfg.rule)))
            if not benches:
                raise DataError("nothing to evaluate on: pass --task, --data or --vsp")
            cache[cell] = benches
        return cache[cell]

    return build


def benchmark_name(path: str | Path) -> str:
    """A dataset's column name in results: the file's name without its extension (MMVP.tsv -> MMVP),
    or the folder's name."""
    path = Path(path)
    return path.stem if path.is_file() else path.resolve().name


def _load_path_benchmarks(d: EvalDataConfig, tasks: list[str]) -> list[Benchmark]:
    """A benchmark per dataset of `d.paths` (its first `d.n` samples of `tasks`, all tasks when empty);
    a sample without a known task is a DataError naming it and the known tasks."""
    from visual_opsd.data import load_dataset
    from visual_opsd.errors import DataError
    from visual_opsd.hub import repo_name, resolve_folder
    from visual_opsd.tasks import TASKS

    # a Hub dataset id is named by its repository (its snapshot folder's name is a commit hash)
    names = [benchmark_name(p) if Path(p).exists() else repo_name(p) or p for p in d.paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.paths: two datasets named {', '.join(repeated)} (results name a column by its "
                          "file); rename one")
    benches = []
    for path, name in zip(d.paths, names, strict=True):
        path = resolve_folder(path, "dataset", key="data.paths")
        if not Path(path).exists():
            raise DataError("no such file or folder", file=path)
        samples = [s for s in load_dataset(path) if not tasks or s.task in tasks][: d.n]
        if not samples:
            wanted = f" of task {', '.join(tasks)}" if tasks else ""
            raise DataError(f"no samples{wanted} to evaluate on", file=path)
        for s in samples:
            if s.task not in TASKS:
                what = f"task {s.task!r} is unknown" if s.task else "no task"
                raise DataError(f"{what}; known tasks: {', '.join(sorted(TASKS))}", file=path, row=s.id, field="task")
        kinds = {s.task for s in samples}
        benches.append(Benchmark(name, get_task(kinds.pop()) if len(kinds) == 1 else None, samples))
    return benches


def _load_vsp(path: str, cell_px: int, per_level: int | None = None) -> list[Sample]:
    """VSP maps of `path` (the first `per_level` of each level); the first unusable map is a DataError
    naming its file (no silent skipping: a benchmark number over a partial map set would mislead).

    VSP's images (64 px per cell) come resized cell by cell to `cell_px`, the backend's patch per
    cell, so every level reaches the model as L x L patches, as our own renders do."""
    from visual_opsd.errors import DataError
    from visual_opsd.vsp import iter_vsp_items

    samples = []
    try:
        for item in iter_vsp_items(path, cell_px):
            if item.error is not None:
                raise DataError(str(item.error), file=item.file, row=f"level {item.level} map {item.index}",
                                field=item.field)
            if per_level is None or sum(s.metadata["level"] == item.level for s in samples) < per_level:
                samples.append(item.sample)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"not a VSP folder: {e}", file=path) from None
    if not samples:
        raise DataError("no VSP maps (expected level{L}/table/{i}.txt with level{L}/img/{i}.png)", file=path)
    return samples


def run_eval(cfg: EvaluateConfig) -> dict[str, dict]:
    """The command: every system on every benchmark of `cfg`; writes results.json, results.md,
    pareto.png and records/ under `cfg.out_dir`, prints the table; returns the results."""
    if not cfg.systems:
        raise ConfigError("no systems: pass --system NAME=MODEL_DIR[:MODE] (or systems=[...])")
    from visual_opsd.backends import open_backend

    torch.set_num_threads(cfg.threads)
    systems = [parse_system(s) for s in cfg.systems]
    for s in systems:
        model_dir(s)  # a typo in the last system fails now, not after the others ran
    benchmarks = eval_benchmarks(cfg)
    out = Path(cfg.out_dir)
    dist = Dist.create() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None  # under accelerate launch
    t0 = time.perf_counter()
    results = evaluate_systems(systems, benchmarks, out, vt_steps=cfg.vt_steps, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, latency_n=cfg.latency_n, warmup=cfg.warmup,
                               image_skips=cfg.image_skips, seed=cfg.seed, progress=cfg.progress,
                               load=lambda path: open_backend(path, cfg.backend), dist=dist)
    if dist is not None:
        dist.close()
        if not dist.is_main:
            return results
    skips = ("one text round, no image skip" if cfg.image_skips == 0 else
             f"at most {cfg.image_skips} image skip(s) per answer")
    notes = [f"Data: {_data_note(cfg)}.",
             f"Accuracy: greedy decoding in batches of {cfg.batch_size}, 95% Wilson intervals; a system's accuracy "
             f"is the mean over its tasks. Text-only modes: {skips}.",
             *([f"Decoding shared by {dist.world} processes (accelerate launch); latency timed on rank 0."]
               if dist is not None else []),
             f"Latency: batch size 1 on {cfg.latency_n} evenly spaced samples per task after {cfg.warmup} warm-up "
             f"samples, the whole pipeline per sample, {cfg.threads} CPU thread(s) (torch); VTs with "
             f"{cfg.vt_steps} denoising steps. Tokens: all samples.",
             f"Total evaluation time {time.perf_counter() - t0:.0f} s."]
    path = write_results(results, out, notes)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    print()
    print(path.read_text().split("## Systems")[0].strip())
    print(f"\nresults: {path} (and results.json, pareto.png, records/)")
    return results


def _data_note(cfg: EvaluateConfig) -> str:
    d, parts = cfg.data, []
    if d.paths:
        parts.append(", ".join(d.paths) + (f" (the first {d.n} samples of each)" if d.n else ""))
    elif d.tasks or not cfg.vsp:
        parts.append(f"{d.n or 100} generated {d.split} samples per task ({', '.join(d.tasks or ['maze'])}), "
                     f"seed {d.seed}, maze sizes {d.sizes[0]}..{d.sizes[1]}")
    if cfg.vsp:
        first = f"the first {cfg.vsp_per_level} per level of the " if cfg.vsp_per_level else ""
        parts.append(f"{first}VSP maps from {cfg.vsp} (headline rule {cfg.rule})")
    return "; ".join(parts)
