"""The study's report: the paper-style main table, the Pareto plot and training curves.

`report.json` shape (the contract other tools read):
    {"systems": {NAME: {"accuracy": pct, "latency_s": s, "tokens": n,
                        "tasks": {TASK: {"accuracy": pct, "ci95": [lo, hi], "n": n, "latency_s": s, "tokens": n}}}},
     "kl": {"pre": x, "post": {NAME: x}, "closure": {NAME: fraction}},
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
    if report.get("interventions"):
        md += ["## VT interventions (teacher)", "", "| mode | accuracy % |", "|---|---|"]
        md += [f"| {m} | {v['accuracy']:.1f} |" for m, v in report["interventions"].items()] + [""]
    if report.get("kl", {}).get("pre") is not None:
        kl = report["kl"]
        md += ["## KL diagnostic (nats/token)", "", f"K_pre = {kl['pre']:.4f}", "",
               "| system | K_post | closure |", "|---|---|---|"]
        md += [f"| {n} | {kl['post'][n]:.4f} | {100 * kl['closure'][n]:.1f}% |" for n in kl["post"]] + [""]
    md += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in report.get("timing_s", {}).items()] + [""]
    md += ["![accuracy vs latency](pareto.png)", "", "![training curves](training_curves.png)", ""]
    md += [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


def _mean_ci(system: dict) -> tuple[float, float]:
    tasks = list(system["tasks"].values())
    return (sum(t["ci95"][0] for t in tasks) / len(tasks), sum(t["ci95"][1] for t in tasks) / len(tasks))
