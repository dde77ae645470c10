"""Benchmark-level numbers from our scoring next to VLMEvalKit's, on the same predictions.

    python benchmarks/scoring_vs_vlmevalkit.py --vlmevalkit-python PATH

Writes small benchmark files in VLMEvalKit's layout (MMVP with its image pairs, a circular SAT set,
a BLINK-like set with categories, CV-Bench-2D with two sources), gives every row a prediction in a
form both extractors read alike ("Answer: B", "(B)", "B", the option's text, or no answer), and
scores them twice:

- ours: `visual-opsd`'s loader and `multiple_choice` task, then `vlmeval.headline` (the rule per
  benchmark) and the per-category accuracy;
- VLMEvalKit's: `mcq_vanilla_eval` / `mcq_circular_eval` under the exact-matching policy, then
  `report_acc`, `report_acc_MMVP` and `CVBench.report_accuracy`, in the environment of
  `--vlmevalkit-python` (a Python with `pip install ms-vlmeval`).

Prints one row per number with both values; they should be equal. docs/benchmarks.md has the output.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from PIL import Image  # noqa: E402

from visual_opsd.data import load_dataset  # noqa: E402
from visual_opsd.tasks import get_task  # noqa: E402
from visual_opsd.vlmeval import headline  # noqa: E402

LETTERS = "ABCD"


def _image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 60)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def benchmarks() -> dict[str, list[dict]]:
    """Rows of each benchmark (VLMEvalKit's columns), generated with a fixed seed."""
    rng = random.Random(0)
    img = _image()
    mmvp = [{"index": i + 1, "image": img, "question": f"Is the dog facing left? (image pair {i // 2})", "A": "yes",
             "B": "no", "answer": "AB"[i % 2], "category": ["orientation", "color", "count"][i // 2 % 3]}
            for i in range(24)]
    sat = []
    for q in range(10):
        options = ["chair", "table", "lamp"]
        right = rng.randrange(3)
        for k in range(3):  # rotation k: the options shifted k places
            shifted = options[k:] + options[:k]
            sat.append({"index": q + k * 1_000_000, "image": img, "question": f"Which is closest? ({q})",
                        "A": shifted[0], "B": shifted[1], "C": shifted[2],
                        "answer": LETTERS[shifted.index(options[right])]})
    blink = [{"index": i, "image": img, "question": "Which point is closer?", "A": "point A", "B": "point B",
              "answer": rng.choice("AB"), "category": ["Jigsaw", "Relative_Depth", "Counting"][i % 3]}
             for i in range(30)]
    cv2d = [{"index": i, "image": img, "question": "How many chairs?", "A": "2", "B": "3", "C": "4",
             "answer": rng.choice("ABC"), "source": "ADE20K" if i < 8 else "COCO", "split": "2D"} for i in range(28)]
    return {"MMVP": mmvp, "SAT_circular": sat, "BLINK": blink, "CV-Bench-2D": cv2d}


def predictions(rows: list[dict], seed: int, right: float) -> list[str]:
    """A prediction per row, right with probability about `right`, in one of the forms both read alike."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        letters = [c for c in LETTERS if r.get(c)]
        pick = r["answer"] if rng.random() < right else rng.choice(letters)
        form = rng.randrange(5)
        forms = [f"Answer: {pick}", f"({pick})", pick, str(r[pick]), "I cannot tell from the image."]
        out.append(forms[form] if form < 4 or right < 0.9 else forms[0])
    return out


def ours(name: str, rows: list[dict], preds: list[str], folder: Path) -> dict[str, float]:
    header = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(header)] + ["\t".join(str(r.get(c, "")) for c in header) for r in rows]
    path = folder / f"{name}.tsv"
    path.write_text("\n".join(lines) + "\n")
    task = get_task("multiple_choice")
    records = [{"correct": task.is_correct(s, p), **{k: s.metadata.get(k) for k in ("index", "category", "source")}}
               for s, p in zip(load_dataset(path), preds, strict=True)]
    h = headline(name, records)
    out = {"overall": h["accuracy"] / 100}
    if "pairs" in h:
        out["pairs"] = h["pairs"]["accuracy"] / 100
    for key in ("category", "source"):
        for value in sorted({r[key] for r in records if r.get(key)}):
            hits = [r["correct"] for r in records if r.get(key) == value]
            out[value] = sum(hits) / len(hits)
    return out


_VLMEVALKIT = """
import json, sys, tempfile, os
import pandas as pd
from vlmeval.dataset.utils.multiple_choice import mcq_circular_eval, mcq_vanilla_eval, report_acc, report_acc_MMVP
from vlmeval.dataset.image_mcq import CVBench
job = json.load(sys.stdin)
out = {}
for name, (rows, preds) in job.items():
    meta = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows])
    data = meta.copy()
    data["prediction"] = preds
    data = data.sort_values(by="index")
    result = os.path.join(tempfile.mkdtemp(), "result.pkl")
    if "circular" in name.lower():
        data["index"] = [int(x) for x in data["index"]]
        scored = mcq_circular_eval(None, data, meta, 1, result, name)
    else:
        scored = mcq_vanilla_eval(None, data, meta, 1, result, name)
    if name == "MMVP":
        acc = report_acc_MMVP(scored.reset_index(drop=True))
        out[name] = {"overall": float(acc["Average"][0]), "pairs": float(acc["Overall"][0])}
        acc = report_acc(scored.copy())
    elif name.startswith("CV-Bench-2D"):
        acc = CVBench.report_accuracy(None, scored)
    else:
        acc = report_acc(scored)
    row = {k: float(v[0]) for k, v in acc.items() if k != "split"}
    res = out.setdefault(name, {})
    res.setdefault("overall", row.pop("Overall"))
    res.update({k: v for k, v in row.items() if k not in res})
json.dump(out, sys.stdout)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlmevalkit-python", metavar="PATH", required=True,
                        help="a Python with VLMEvalKit (ms-vlmeval) installed")
    args = parser.parse_args()
    job, mine = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rows) in enumerate(benchmarks().items()):
            preds = predictions(rows, seed=i, right=0.95 if "circular" in name else 0.65)
            job[name] = (rows, preds)
            mine[name] = ours(name, rows, preds, Path(tmp))
    done = subprocess.run([args.vlmevalkit_python, "-c", _VLMEVALKIT], input=json.dumps(job), capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"VLMEvalKit's side failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print("| benchmark | number | ours | VLMEvalKit |")
    print("|---|---|---|---|")
    for name, values in mine.items():
        for key, value in values.items():
            other = theirs.get(name, {}).get(key)
            shown = "-" if other is None else f"{100 * other:.2f}"
            print(f"| {name} | {key} | {100 * value:.2f} | {shown} |")


if __name__ == "__main__":
    main()
