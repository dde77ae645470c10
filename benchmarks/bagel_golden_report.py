"""Every BAGEL golden check as one table: case, output, measured error, tolerance, pass.

Runs the golden-case tests of tests/test_bagel.py (cases a-i of tests/data/bagel-golden, computed by
the official BAGEL code on tiny random weights) in a pytest subprocess, reads the measurements each
check records (`golden:<case>.<output>` properties in a JUnit XML file) and prints them next to the
tolerance of the case's `outputs.json` (`tolerance.suggested_pass`). It also lists any tolerance
entry that no check measured. Needs the dev extra (pytest) and the bagel extra (diffusers).

    python benchmarks/bagel_golden_report.py              # markdown table on stdout (~30 s on one CPU thread)
    python benchmarks/bagel_golden_report.py --json out.json

The exit status is 1 when a check failed or a tolerance entry went unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "tests" / "data" / "bagel-golden"
GOLDEN_TESTS = " or ".join(f"test_{c}_" for c in "abcdefghi")
SHOWN = (
    "rel",
    "max_abs",
    "cos",
    "argmax_agree",
    "top5_agree",
    "max_levels",
    "within1",
    "exact_frac",
    "equal",
    "checks",
    "mismatches",
)


def run_tests(xml_path: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "test_bagel.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        GOLDEN_TESTS,
        f"--junitxml={xml_path}",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode


def read_checks(xml_path: Path) -> list[dict]:
    """The recorded checks, in test order: name, case folder, tolerance key, measured, tolerance, pass."""
    cases = sorted(p.name for p in (GOLD / "cases").iterdir() if p.is_dir())
    rows = []
    for tc in ET.parse(xml_path).getroot().iter("testcase"):
        for prop in tc.iter("property"):
            name = prop.get("name", "")
            if not name.startswith("golden:"):
                continue
            check = name[len("golden:") :]
            prefix, key = check.split(".", 1)
            case = next(c for c in cases if c.startswith(prefix[0] + "_"))
            rows.append(
                {"check": check, "case": case, "key": key, "test": tc.get("name"), **json.loads(prop.get("value"))}
            )
    return rows


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:.7g}" if 0.99 <= v < 1 else f"{v:.3g}"  # cosines: show the 9s
    return str(v)


def markdown(rows: list[dict], unmeasured: list[str]) -> str:
    out = ["| case | output | measured | tolerance | pass |", "|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]
        measured = ", ".join(f"{k} {fmt(m[k])}" for k in SHOWN if k in m)
        tol = ", ".join(f"{k} {fmt(v)}" for k, v in r["tolerance"].items())
        out.append(f"| {r['case']} | {r['key']} | {measured} | {tol} | {'PASS' if r['pass'] else 'FAIL'} |")
    n_pass = sum(r["pass"] for r in rows)
    out.append("")
    out.append(
        f"{n_pass}/{len(rows)} checks within tolerance; tolerance entries without a check: "
        + (", ".join(unmeasured) if unmeasured else "none")
    )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "golden.xml"
        rc = run_tests(xml)
        if not xml.is_file():
            print(f"pytest produced no report (exit status {rc})", file=sys.stderr)
            return 1
        rows = read_checks(xml)
    measured = {(r["case"], r["key"]) for r in rows}
    unmeasured = []
    for d in sorted((GOLD / "cases").iterdir()):
        tol = json.loads((d / "outputs.json").read_text())["tolerance"]["suggested_pass"]
        unmeasured += [f"{d.name}/{k}" for k in tol if (d.name, k) not in measured]
    print(markdown(rows, unmeasured))
    if args.json:
        args.json.write_text(json.dumps({"checks": rows, "unmeasured": unmeasured}, indent=1))
    return int(rc != 0 or not rows or unmeasured or not all(r["pass"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
