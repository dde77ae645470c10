"""The study's report: the paper-style main table, the Pareto plot and training curves.

`report.json` shape (the contract other tools read):
    {"systems": {NAME: {"accuracy": pct, "latency_s": s, "tokens": n,
                        "tasks": {TASK: {"accuracy": pct, "ci95": [lo, hi], "n": n, "latency_s": s, "tokens": n}}}},
     "kl": {"headline": "closure" | "closure_student_samples",
            "closure": {"completions": "data", "same_tokens": bool, "teacher_side": "base" | "self",
                        "k_pre": x, "k_post": {NAME: x}, "per_model": {NAME: fraction}},
            "closure_student_samples": {... the same fields, "completions": "student"}},
     "premise": {"interleaved" | "text_only" | "teacher_context":
                     {"accuracy": pct, "ci95": [lo, hi], "n": n, "by_size": {SIZE: {"accuracy", "ci95", "n"}}},
                 "k_pre": x},   # the base model before distillation; k_pre on the data's traces
     "targets": [{"name": str, "value": x, "target": str, "met": bool}],
     "decomposition": {"start_vs_text_sft": pp, "opsd_vs_start": pp, "noise_vs_start": pp,
                       "headroom_vs_text_sft": pp},   # Visual-OPSD - text SFT, split (demo.decomposition_of)
     "interventions": {MODE: {"accuracy": pct}},
     "timing_s": {STAGE: s}}
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

REFERENCE_SYSTEM = "teacher_interleaved"


def main_table(report: dict, reference: str | None = REFERENCE_SYSTEM) -> str:
    """Markdown: system x task accuracy [95% CI], mean, latency, speed-up vs `reference` (the interleaved
    teacher; no speed-ups when it is None or absent), tokens."""
    systems = report["systems"]
    tasks = sorted({t for s in systems.values() for t in s["tasks"]})
    ref = systems.get(reference, {}).get("latency_s") if reference else None
    head = ["system", *[f"{t} acc % [95% CI]" for t in tasks], "mean acc %", "latency s/sample", "speed-up", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in systems.items():
        cells = [name]
        for t in tasks:
            r = s["tasks"].get(t)
            cells.append(f"{r['accuracy']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" if r else "-")
        speed = f"{ref / s['latency_s']:.1f}x" if ref and s["latency_s"] > 0 else "-"
        cells += [f"{s['accuracy']:.1f}", f"{s['latency_s']:.3f}", speed, f"{s['tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(report: dict, path: Path) -> None:
    """Accuracy against latency (log scale): the speed/accuracy trade-off of every system."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in report["systems"].items():
        lo, hi = _mean_ci(s)
        ax.errorbar(s["latency_s"], s["accuracy"], yerr=[[s["accuracy"] - lo], [hi - s["accuracy"]]],
                    fmt="o", capsize=3)
        ax.annotate(name, (s["latency_s"], s["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    latencies = [s["latency_s"] for s in report["systems"].values() if s["latency_s"] > 0]
    if latencies:  # show at least one decade, so that a labelled power of ten is in view
        lo, hi = min(latencies), max(latencies)
        pad = max(10**0.25, (10 * lo / hi) ** 0.5)
        ax.set_xlim(lo / pad, hi * pad)
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on narrow ranges
    ax.set_xlabel("latency per sample (s, batch size 1, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(runs: dict[str, Path], path: Path) -> None:
    """Loss and validation accuracy per step of each training run (from its metrics.jsonl)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, metrics in runs.items():
        if not metrics.is_file():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows if "loss" in r]
        ax_loss.plot(steps, [r["loss"] for r in rows if "loss" in r], label=name, lw=1)
        acc = [(r["step"], r[k]) for r in rows for k in r if k.startswith("val/accuracy")]
        if acc:
            ax_acc.plot(*zip(*acc, strict=True), marker="o", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path, runs: dict[str, Path], notes: list[str] = ()) -> Path:
    """report.json, report.md, pareto.png and training_curves.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    pareto_plot(report, out / "pareto.png")
    training_curves(runs, out / "training_curves.png")
    md = ["# visual-opsd study report", "", "## Main table", "", main_table(report), ""]
    md += premise_section(report.get("premise"))
    md += targets_section(report.get("targets"))
    md += decomposition_section(report.get("decomposition"))
    if report.get("interventions"):
        md += ["## VT interventions (teacher)", "", "| mode | accuracy % |", "|---|---|"]
        md += [f"| {m} | {v['accuracy']:.1f} |" for m, v in report["interventions"].items()] + [""]
    md += kl_section(report.get("kl", {}))
    md += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in report.get("timing_s", {}).items()] + [""]
    md += ["![accuracy vs latency](pareto.png)", "", "![training curves](training_curves.png)", ""]
    md += [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


PREMISE_MODES = {
    "interleaved": "interleaved: generates its own VT, reads it back",
    "text_only": "text-only: one text round from the student context, no image skip",
    "teacher_context": "privileged teacher context: the data's VTs in context, then text (the distillation signal)",
}


def premise_section(premise: dict | None) -> list[str]:
    """report.md's premise table: the base model before distillation in its three modes, per size."""
    if not premise:
        return []
    modes = [m for m in PREMISE_MODES if m in premise]
    sizes = sorted({k for m in modes for k in premise[m].get("by_size", {})}, key=lambda v: (len(v), v))
    head = ["base model mode", "acc % [95% CI]", *[f"size {v}" for v in sizes], "n"]
    md = ["## The premise: the base model before distillation", "",
          "The paper's regime: text-only close to interleaved, the privileged VT context clearly better.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in modes:
        r = premise[m]
        by = r.get("by_size", {})
        per_size = [f"{by[v]['accuracy']:.0f}" if v in by else "-" for v in sizes]
        cells = [PREMISE_MODES[m], _acc(r), *per_size, str(r["n"])]
        md.append("| " + " | ".join(cells) + " |")
    if premise.get("k_pre") is not None:
        md += ["", "K_pre on the data's traces (identical tokens under both contexts): "
               f"{premise['k_pre']:.3f} nats/token."]
    return md + [""]


def targets_section(targets: list[dict] | None) -> list[str]:
    """report.md's checklist of the study's targets, each with its measured value, met or missed."""
    if not targets:
        return []
    md = ["## Targets", "", "| target | measured | wanted | |", "|---|---|---|---|"]
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.1f}"
        md.append(f"| {t['name']} | {value} | {t['target']} | {'met' if t['met'] else '**missed**'} |")
    return md + [""]


DECOMPOSITION_ROWS = {
    "start_vs_text_sft": "the student's start (base model, text-only) - text-only SFT",
    "opsd_vs_start": "Visual-OPSD - its start (what distillation added)",
    "noise_vs_start": "noise-VT control - its start",
    "headroom_vs_text_sft": "privileged context - text-only SFT (a student that matched its teacher)",
}


def decomposition_section(parts: dict | None) -> list[str]:
    """report.md's split of the headline (Visual-OPSD - text-only SFT) into the start's gap and the
    distillation's own gain, with the headroom the privileged context leaves."""
    if not parts:
        return []
    md = ["## Where Visual-OPSD - text-only SFT comes from", "",
          "Visual-OPSD - text SFT = (start - text SFT) + (Visual-OPSD - start). In the paper (means over 9 "
          "benchmarks) the start's part is +6.15 pp (ThinkMorph text-only 69.90 vs text SFT 63.75) and "
          "distillation's +4.13 (74.03).", "", "| part | pp |", "|---|---|"]
    md += [f"| {label} | {parts[k]:+.1f} |" for k, label in DECOMPOSITION_ROWS.items() if k in parts]
    headroom = parts.get("headroom_vs_text_sft")
    if headroom is not None and headroom < 10:
        md += ["", f"The headroom ({headroom:+.1f} pp) is below the +10 pp target: only a student that outdid its "
                   "privileged teacher could meet it."]
    return md + [""]


def _acc(r: dict) -> str:
    return f"{r['accuracy']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"


# how report.md describes the two KL-closure entries (diagnostics.run.report_fields)
KL_COMPLETIONS = {
    "data": "on identical tokens: the data's text-only traces, the same ids scored before and after training",
    "student": "on student samples: K_pre on the base model's own samples, K_post on each trained model's own",
}
KL_TEACHER_SIDES = {
    "base": "the frozen base model (the SFT teacher) with the data's VTs",
    "self": "each trained model itself with the data's VTs",
}


def kl_section(kl: dict) -> list[str]:
    """report.md's KL section: one table per closure entry, the headline first, each saying which
    completions were scored and which weights sat on the teacher side."""
    keys = [k for k in ("closure", "closure_student_samples") if isinstance(kl.get(k), dict)]
    if not keys:
        return []
    keys.sort(key=lambda k: k != kl.get("headline", "closure"))  # stable: the headline first
    md = ["## KL diagnostic and gap closure", "",
          "K = mean over completions of the mean per-token KL(p(. | teacher context with VTs) || "
          "p(. | student context)), nats/token; closure = 1 - K_post / K_pre.", ""]
    for i, key in enumerate(keys):
        entry = kl[key]
        role = "headline" if i == 0 else "beside it"
        md += [f"### Closure {KL_COMPLETIONS.get(entry['completions'], entry['completions'])} (`kl.{key}`, {role})",
               "", f"Teacher side: {KL_TEACHER_SIDES.get(entry['teacher_side'], entry['teacher_side'])}. "
               f"K_pre = {entry['k_pre']:.4f}.", "", "| system | K_post | closure |", "|---|---|---|"]
        md += [f"| {n} | {entry['k_post'][n]:.4f} | {100 * entry['per_model'][n]:.1f}% |" for n in entry["k_post"]]
        md.append("")
    return md


def _mean_ci(system: dict) -> tuple[float, float]:
    tasks = list(system["tasks"].values())
    return (sum(t["ci95"][0] for t in tasks) / len(tasks), sum(t["ci95"][1] for t in tasks) / len(tasks))
