"""Writers: each diagnostic's flat metrics as `<what>.json`, a readable `<what>.md` (with the exact
definition used) and a `<what>.png` plot; the KL diagnostic also writes `kl_tokens.html`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from visual_opsd.diagnostics.attention import ATTENTION_SPANS, VT_KINDS  # noqa: E402
from visual_opsd.diagnostics.interventions import INTERVENTION_MODES  # noqa: E402
from visual_opsd.diagnostics.kl import sources_of  # noqa: E402

DEFINITIONS = {
    "interventions": (
        "Greedy decoding from the student context (question + problem image); at each `<image_start>` "
        "the model gets: `interleaved` its own generated VT; `text_only` nothing (image skip, at most once); "
        "`noise` an image of the generated VT's shape with N(0,1) pixels in [-1,1]-normalised space (clamped, "
        "8-bit); `shuffled` the VT it generated for another sample (same size where possible); `oracle` the "
        "ground-truth VT. Accuracy = % of samples correct under the task's scorer; 95% Wilson intervals."
    ),
    "attention": (
        "frac_l(Q -> K) = 1/(H |Q|) sum_h sum_{q in Q} sum_{k in K} A_l[h, q, k], A_l[h, q, :] = head h's "
        "softmax attention of query q over all keys in layer l (layers from 0): the fraction of attention "
        "mass the text span Q sends to the image span K, averaged over heads and query tokens. Sequences are "
        "the model's own greedy interleaved traces. Spans: input_image = the problem image's positions; "
        "vt = the VT image's positions; text_before_vt / text_after_vt = generated text tokens before / after "
        "the first VT (the question and image markers excluded). `generated`: the model's own VT; `noise`: "
        "a Gaussian-noise VT of the same shape, the model continuing after it. Mean and spread (std, "
        "95% normal interval of the mean) over samples."
    ),
    "kl": (
        "K = mean over completions y of [ mean over the sampled tokens t of y of "
        "KL( p_T(. | C_T, y<t) || p_S(. | C_S, y<t) ) ] in nats/token, the same completion ids scored under "
        "both contexts, full vocabulary (no top-k, no clip), via losses.generalized_jsd(beta=0). C_S = "
        "question + problem image; C_T = C_S + framing + VT images + transition. K_pre: base weights W0 on both "
        "sides. K_post (trained W1): teacher=base puts W0 with VTs on the teacher side; teacher=self puts W1 "
        "with VTs there; the student side is W1 on C_S. Completions y, per source: data = the data's text-only "
        "traces, the same ids for K_pre and K_post (identical tokens); student = y ~ W0(. | C_S) for K_pre and "
        "y ~ W1(. | C_S) for K_post (different tokens). Gap closure = 1 - K_post / K_pre within one source."
    ),
}


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def write_json(path: Path, what: str, metrics: dict[str, float], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"diagnostic": what, "definition": DEFINITIONS[what], "meta": meta,
                                "metrics": metrics}, indent=2, default=str))


def _header(what: str, title: str, meta: dict[str, Any]) -> list[str]:
    lines = [f"# {title}", "", f"**Definition.** {DEFINITIONS[what]}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()] + [""]
    return lines


def _timing(metrics: dict[str, float]) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k.startswith("time/")]
    return ["## Runtime", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in rows], ""]


def _tasks(metrics: dict[str, float], head: str) -> list[str]:
    """Task names present under `head/<task>/...`, in order of appearance."""
    return list(dict.fromkeys(k[len(head) + 1 :].split("/")[0] for k in metrics if k.startswith(head + "/")))


# ---------------------------------------------------------------------------------------------
# interventions


def interventions_markdown(metrics: dict[str, float], meta: dict[str, Any]) -> str:
    lines = _header("interventions", "VT interventions", meta)
    lines += ["| task | mode | accuracy % [95% CI] | correct / n | VTs per sample | tokens |",
              "|---|---|---|---|---|---|"]
    for task in [t for t in _tasks(metrics, "interventions") if t not in INTERVENTION_MODES]:
        for mode in INTERVENTION_MODES:
            key = f"interventions/{task}/{mode}"
            if f"{key}/accuracy" not in metrics:
                continue
            lines.append(
                f"| {task} | {mode} | {metrics[f'{key}/accuracy']:.1f} [{metrics[f'{key}/ci95_lo']:.1f}, "
                f"{metrics[f'{key}/ci95_hi']:.1f}] | {metrics[f'{key}/correct']} / {metrics[f'{key}/n']} | "
                f"{metrics[f'{key}/vts']:.2f} | {metrics[f'{key}/tokens']:.0f} |"
            )
    fallback = {k: v for k, v in metrics.items() if k.endswith("/fallback_images") and v}
    if fallback:
        lines += ["", "Noise images stood in for missing VTs: " + ", ".join(f"{k} = {v}" for k, v in fallback.items())]
    lines += ["", "![interventions](interventions.png)", ""]
    return "\n".join(lines + _timing(metrics))


def interventions_plot(metrics: dict[str, float], path: Path) -> None:
    tasks = [t for t in _tasks(metrics, "interventions") if t not in INTERVENTION_MODES]
    modes = [m for m in INTERVENTION_MODES if any(f"interventions/{t}/{m}/accuracy" in metrics for t in tasks)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(modes) * max(1, len(tasks)) / 2, 3.8))
    width = 0.8 / max(1, len(tasks))
    for j, task in enumerate(tasks):
        acc = [metrics[f"interventions/{task}/{m}/accuracy"] for m in modes]
        lo = [a - metrics[f"interventions/{task}/{m}/ci95_lo"] for a, m in zip(acc, modes, strict=True)]
        hi = [metrics[f"interventions/{task}/{m}/ci95_hi"] - a for a, m in zip(acc, modes, strict=True)]
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(modes))]
        ax.bar(xs, acc, width, yerr=[lo, hi], capsize=3, label=task)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("accuracy % (95% Wilson CI)")
    ax.set_ylim(0, 100)
    ax.set_title("VT interventions")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# attention


def _layer_series(metrics: dict[str, float], kind: str, span: str, stat: str) -> list[float]:
    n = int(metrics.get("attention/n_layers", 0))
    return [metrics.get(f"attention/{kind}/{span}/layer_{layer:02d}/{stat}", float("nan")) for layer in range(n)]


def attention_markdown(metrics: dict[str, float], meta: dict[str, Any]) -> str:
    lines = _header("attention", "Attention fractions per layer", meta)
    kinds = [k for k in VT_KINDS if f"attention/{k}/no_vt" in metrics]
    for kind in kinds:
        lines += [f"## {kind} VTs ({metrics['attention/n_samples'] - metrics[f'attention/{kind}/no_vt']} samples "
                  f"with a VT, {metrics[f'attention/{kind}/no_vt']} without)", "",
                  "Percent of attention mass, mean +- std over samples (n).", "",
                  "| layer | " + " | ".join(name for name, _, _ in ATTENTION_SPANS) + " |",
                  "|---|" + "---|" * len(ATTENTION_SPANS)]
        for layer in range(int(metrics["attention/n_layers"])):
            cells = []
            for name, _, _ in ATTENTION_SPANS:
                key = f"attention/{kind}/{name}/layer_{layer:02d}"
                if f"{key}/mean" not in metrics:
                    cells.append("-")
                    continue
                cells.append(f"{100 * metrics[f'{key}/mean']:.2f} +- {100 * metrics[f'{key}/std']:.2f} "
                             f"({metrics[f'{key}/n']})")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![attention per layer](attention.png)", ""]
    return "\n".join(lines + _timing(metrics))


def attention_plot(metrics: dict[str, float], path: Path) -> None:
    """One line per (span, VT kind) over layers, shaded +- 1 std over samples: solid = generated VTs,
    dashed = noise VTs (the paper's figure)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = list(range(int(metrics.get("attention/n_layers", 0))))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (name, _, _) in enumerate(ATTENTION_SPANS):
        for kind, style in zip(VT_KINDS, ("-", "--"), strict=True):
            mean = _layer_series(metrics, kind, name, "mean")
            if not mean or all(math.isnan(m) for m in mean):
                continue
            std = _layer_series(metrics, kind, name, "std")
            m = [100 * x for x in mean]
            ax.plot(layers, m, style, marker="o", ms=3, color=colours[c % len(colours)], label=f"{name} ({kind})")
            ax.fill_between(layers, [max(0.0, 100 * (a - s)) for a, s in zip(mean, std, strict=True)],
                            [100 * (a + s) for a, s in zip(mean, std, strict=True)],
                            color=colours[c % len(colours)], alpha=0.12, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass to the image span (%)")
    ax.set_title("Text-to-image attention per layer (solid: generated VT, dashed: noise VT)")
    ax.set_xticks(layers)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:  # e.g. a model that never opened an image: say so rather than draw empty axes
        ax.text(0.5, 0.5, "no VT was generated in these samples", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# kl


# what each completion source scores, for the markdown
SOURCE_TEXT = {
    "data": "the data's text-only traces, the same ids for K_pre and every K_post (identical tokens before and "
            "after)",
    "student": "each measured model's own samples y ~ p(. | C_S) at the configured temperature (K_pre: the base "
               "model's; K_post: the trained model's), so K_pre and K_post are in general taken on different tokens",
}


def kl_markdown(metrics: dict[str, float], meta: dict[str, Any], tokens: list[dict] | None = None) -> str:
    """One section per completion source, the headline first: K_pre and K_post per task, then the
    gap closure per trained model and teacher side; then the sanity check and the token table."""
    lines = _header("kl", "KL diagnostic", meta)
    sources = sources_of(metrics)

    def row(label: str, teacher: str, student: str, prefix: str, tasks: list[str]) -> str:
        cells = [f"{metrics[f'{prefix}/{t}/mean']:.4f} [{metrics[f'{prefix}/{t}/ci95_lo']:.4f}, "
                 f"{metrics[f'{prefix}/{t}/ci95_hi']:.4f}] ({metrics[f'{prefix}/{t}/n']})" for t in tasks]
        return f"| {label} | {teacher} | {student} | " + " | ".join(cells) + " |"

    for i, source in enumerate(sources):
        head = f"kl/{source}"
        tasks = _tasks(metrics, f"{head}/pre")
        role = "headline" if i == 0 else "beside the headline"
        same = "yes" if metrics.get(f"{head}/same_tokens") == 1.0 else "no"
        lines += [f"## Completions: {source} ({role})", "", f"Completions scored: {SOURCE_TEXT[source]}. "
                  f"Identical ids for K_pre and every K_post: {same}.", "",
                  "| measure | teacher side | student side | "
                  + " | ".join(f"{t}: K [95% CI] (n)" for t in tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
        lines.append(row("K_pre", "base + VTs (C_T)", "base (C_S)", f"{head}/pre", tasks))
        names = _tasks(metrics, f"{head}/post")
        for name in names:
            lines.append(row(f"K_post {name}", "base + VTs (C_T)", f"{name} (C_S)",
                             f"{head}/post/{name}/teacher=base", tasks))
            lines.append(row(f"K_post {name}", f"{name} + VTs (C_T)", f"{name} (C_S)",
                             f"{head}/post/{name}/teacher=self", tasks))
        if names:
            lines += ["", f"Gap closure 1 - K_post / K_pre ({source} completions):", "",
                      "| model | teacher side | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
            for name in names:
                for side in ("base", "self"):
                    cells = [f"{100 * metrics[f'{head}/closure/{name}/teacher={side}/{t}']:.1f}%" for t in tasks]
                    lines.append(f"| {name} | {side} | " + " | ".join(cells) + " |")
        lines.append("")
    if "kl/sanity/passed" in metrics:
        ok = "PASSED" if metrics["kl/sanity/passed"] == 1.0 else "FAILED"
        lines += [f"**Sanity {ok}**: identical contexts max |KL| = {metrics['kl/sanity/identical/max_abs']:.3g} "
                  f"(must be exactly 0); swapped contexts vs reverse KL (beta=1) max |diff| = "
                  f"{metrics['kl/sanity/swapped/max_abs_diff']:.3g} (reverse KL up to "
                  f"{metrics['kl/sanity/reverse/max']:.3g})."]
    if tokens:
        headline = sources[0] if sources else "data"
        lines += ["", f"## Which tokens carry the KL (K_pre, {headline} completions)", "",
                  "Share = the token's part of the total KL mass over all scored tokens. Highlighted text: "
                  "[kl_tokens.html](kl_tokens.html).", "",
                  "| token | count | mean KL (nats) | share of KL mass |", "|---|---|---|---|"]
        lines += [f"| `{r['token']!r}` | {r['count']} | {r['mean_kl']:.4f} | {100 * r['share']:.1f}% |" for r in tokens]
    lines += ["", "![KL](kl.png)", ""]
    return "\n".join(lines + _timing(metrics))


def kl_plot(metrics: dict[str, float], path: Path, records: list[dict] | None = None) -> None:
    """Left: K per (source, task) for every measure with 95% intervals. Right: histogram of the
    headline source's K_pre per-token KL."""
    fig, (ax, ax_hist) = plt.subplots(1, 2, figsize=(10, 4))
    sources = sources_of(metrics)
    groups = [(source, task) for source in sources for task in _tasks(metrics, f"kl/{source}/pre")]
    names = list(dict.fromkeys(n for source in sources for n in _tasks(metrics, f"kl/{source}/post")))
    measures = [("K_pre", "pre")]
    for name in names:
        measures += [(f"{name} (teacher=base)", f"post/{name}/teacher=base"),
                     (f"{name} (teacher=self)", f"post/{name}/teacher=self")]
    width = 0.8 / len(measures)
    for j, (label, measure) in enumerate(measures):
        keys = [f"kl/{source}/{measure}/{task}" for source, task in groups]
        mean = [metrics.get(f"{k}/mean", float("nan")) for k in keys]
        err = [[m - metrics.get(f"{k}/ci95_lo", m) for m, k in zip(mean, keys, strict=True)],
               [metrics.get(f"{k}/ci95_hi", m) - m for m, k in zip(mean, keys, strict=True)]]
        ax.bar([i + (j - (len(measures) - 1) / 2) * width for i in range(len(groups))], mean, width, yerr=err,
               capsize=3, label=label)
    ax.set_xticks(range(len(groups)), [f"{task}\n{source} completions" for source, task in groups])
    ax.set_ylabel("K (nats / token)")
    ax.set_title("KL(p(.|C_T, y<t) || p(.|C_S, y<t))")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    headline = f"{sources[0]}/pre" if sources else "data/pre"
    values = [v for r in records or [] if r["measure"] == headline
              for v, f in zip(r["kl"], r["scored"], strict=True) if f]
    if values:
        ax_hist.hist(values, bins=50)
        ax_hist.set_yscale("log")
    ax_hist.set_xlabel(f"per-token KL (nats), K_pre, {headline.split('/')[0]} completions")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title("Where the KL sits: per-token distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_diagnostic(
    what: str,
    metrics: dict[str, float],
    out: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    records: list[dict] | None = None,
    backend: Any = None,
    top_tokens: int = 20,
    show: int = 8,
) -> dict[str, Path]:
    """Write `<what>.json`, `<what>.md`, `<what>.png` (and for kl `kl_tokens.html` and per-token
    records `kl_records.jsonl`; for the others `<what>_records.jsonl`) under `out`; returns the paths.
    The KL token views need `backend` (to turn ids into text) and `records`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    paths = {"json": out / f"{what}.json", "md": out / f"{what}.md", "png": out / f"{what}.png"}
    write_json(paths["json"], what, metrics, meta)
    if what == "interventions":
        paths["md"].write_text(interventions_markdown(metrics, meta) + "\n")
        interventions_plot(metrics, paths["png"])
    elif what == "attention":
        paths["md"].write_text(attention_markdown(metrics, meta) + "\n")
        attention_plot(metrics, paths["png"])
    elif what == "kl":
        from visual_opsd.diagnostics.kl import highlight_html, token_table

        sources = sources_of(metrics)
        measure = f"{sources[0] if sources else 'data'}/pre"  # the headline source's K_pre
        tokens = token_table(backend, records, measure, top_tokens) if records and backend is not None else None
        paths["md"].write_text(kl_markdown(metrics, meta, tokens) + "\n")
        kl_plot(metrics, paths["png"], records)
        if records and backend is not None:
            paths["html"] = out / "kl_tokens.html"
            paths["html"].write_text(highlight_html(backend, records, measure, show))
    else:
        raise ValueError(f"unknown diagnostic {what!r}")
    if records:
        paths["records"] = out / f"{what}_records.jsonl"
        with open(paths["records"], "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return paths
