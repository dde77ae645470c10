"""Our multiple-choice answer extraction next to VLMEvalKit's, on the forms models write.

    python benchmarks/answer_extraction_vs_vlmevalkit.py [--vlmevalkit-python PATH]

Prints a markdown table: each model output, the option letter our `multiple_choice` task reads
(`tasks.choice.extract_choice` with `text_match`), the one VLMEvalKit's exact-matching policy
reads (its `extract_answer_from_item` with no judge model: `can_infer` on the whole output, else
"Z"), and that of ThinkMorph's VLMEvalKit fork, which then tries the content of
`<answer>...</answer>` or `\\boxed{...}` (there: `can_infer` on that content). VLMEvalKit has heavy dependencies, so it
runs in its own environment: `--vlmevalkit-python` names a Python where `pip install ms-vlmeval`
(or VLMEvalKit from source) was done; without it only our column is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visual_opsd.tasks.choice import extract_choice  # noqa: E402

CHOICES = {"A": "cat", "B": "dog", "C": "car", "D": "cup"}
QUESTION = "Which animal is on the left?"
OUTPUTS = [
    "B",
    "(B)",
    "B.",
    "Answer: B",
    "The answer is (B).",
    "\\boxed{B}",
    "<answer>B</answer>",
    "<answer>(B) dog</answer>",
    "dog",
    "It is a dog.",
    "The left animal has floppy ears and a tail, so it is the dog. Answer: B",
    "Looking at the image, option B matches. The cat (A) is on the right, the car and cup are not animals.\n"
    "<answer>B</answer>",
    "<think>A or B? The ears say dog.</think>\n\\boxed{B}",
    "Both A and B look plausible.",
    "A cat sits on the right; the answer is B",
    "",
]

_VLMEVALKIT = """
import json, re, sys
from vlmeval.dataset.utils.multiple_choice import extract_answer_from_item
from vlmeval.utils.matching_util import can_infer
data = json.load(sys.stdin)
out = []
for text in data["outputs"]:
    item = {"question": data["question"], "prediction": text, **data["choices"]}
    upstream = extract_answer_from_item(None, item)["opt"]
    # ThinkMorph's fork: can_infer on the whole output, else on the <answer> / \\\\boxed{} content
    fork = can_infer(text, dict(data["choices"]))
    if not fork:
        inner = None
        if "<answer>" in text and "</answer>" in text:
            inner = text.split("<answer>")[1].split("</answer>")[0]
        elif "boxed" in text:
            m = re.search(r"\\\\boxed\\{([^}]*)\\}", text)
            inner = m.group(1).strip() if m else None
        fork = (can_infer(inner, dict(data["choices"])) if inner else False) or "Z"
    out.append([upstream, fork])
json.dump(out, sys.stdout)
"""


def vlmevalkit_verdicts(python: str) -> list[list[str]]:
    """VLMEvalKit's (upstream, ThinkMorph fork) letters for OUTPUTS, computed in its own environment."""
    payload = json.dumps({"outputs": OUTPUTS, "choices": CHOICES, "question": QUESTION})
    done = subprocess.run([python, "-c", _VLMEVALKIT], input=payload, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlmevalkit-python", metavar="PATH", help="a Python with VLMEvalKit (ms-vlmeval) installed")
    args = parser.parse_args()
    ours = [extract_choice(text, choices=list(CHOICES.values()), text_match=True) or "none" for text in OUTPUTS]
    theirs = vlmevalkit_verdicts(args.vlmevalkit_python) if args.vlmevalkit_python else None
    head = "| model output | ours |" + (" VLMEvalKit (exact matching) | ThinkMorph's fork |" if theirs else "")
    print(head)
    print("|---|---|" + ("---|---|" if theirs else ""))
    for i, text in enumerate(OUTPUTS):
        shown = text.replace("\n", "\\n").replace("|", "\\|") or "(empty)"
        row = f"| `{shown}` | {ours[i]} |"
        if theirs:
            row += f" {theirs[i][0]} | {theirs[i][1]} |"
        print(row)
    print(f"\noptions: {', '.join(f'{k}. {v}' for k, v in CHOICES.items())}; the right answer is B. "
          "'Z' / 'none': no option read (counted wrong).")


if __name__ == "__main__":
    main()
